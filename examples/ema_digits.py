"""EMA of the weights vs. the training weights, on scikit-learn's 8x8 handwritten digits.

A tiny ResNet (built from a config, nothing is downloaded) is trained with `EMATrainer` and a deliberately large,
constant learning rate, so that the training weights keep jumping around the optimum from one step to the next. The
exponential moving average of the weights smooths those jumps out. With `ema_eval_training_weights=True`, every
evaluation scores both sets of weights on the same held-out images, in the same log entry: the EMA as `eval_*`, the
training weights as `eval_training_*`.

At the end the script prints the two accuracy (and loss) curves side by side, writes them to `results.json`, and plots
the accuracies to `ema_vs_training.png` in `--output-dir`. Everything runs offline, on the CPU:

    python examples/ema_digits.py            # about a minute on 2 CPU cores
    python examples/ema_digits.py --fast     # fewer steps, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets  # noqa: E402
import evaluate  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from transformers import PrinterCallback, ResNetConfig, ResNetForImageClassification, TrainingArguments  # noqa: E402

from hf_ema import EMAArguments, EMATrainer  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "accuracy"

# Two settings of the same run: the default, and a shorter one for the test suite.
MODES = {
    "default": {"max_steps": 1200, "eval_steps": 40},
    "fast": {"max_steps": 240, "eval_steps": 20},
}
HALF_LIFE = "30ba"
LEARNING_RATE = 0.3
BATCH_SIZE = 32


def digits_splits(seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The 1,797 digits as (train, test) datasets: `pixel_values` float32 (1, 8, 8) in [0, 1], `labels` int."""
    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
            "labels": datasets.ClassLabel(num_classes=10),
        }
    )

    def to_dataset(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"pixel_values": x, "labels": y}, features=features).with_format("torch")

    return to_dataset(train_x, train_y), to_dataset(test_x, test_y)


def build_model() -> ResNetForImageClassification:
    """A ResNet with two basic stages of 16 and 32 channels (about 20k parameters), randomly initialised."""
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    return ResNetForImageClassification(config)


def accuracy_metric():
    """`compute_metrics` for the Trainer, with the accuracy metric loaded from its local folder (never the Hub)."""
    metric = evaluate.load(str(METRIC_DIR))

    def compute_metrics(eval_pred: transformers.EvalPrediction) -> dict[str, float]:
        logits, labels = eval_pred
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics


def train(output_dir: Path, seed: int, max_steps: int, eval_steps: int) -> list[dict[str, float]]:
    """Trains with `EMATrainer` and returns one row per evaluation, with the EMA and the training weights' scores."""
    transformers.set_seed(seed)
    train_set, test_set = digits_splits(seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=256,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_strategy="steps",
        logging_steps=eval_steps,
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = EMATrainer(
        model=build_model(),
        args=args,
        train_dataset=train_set,
        eval_dataset=test_set,
        compute_metrics=accuracy_metric(),
        ema_args=EMAArguments(half_life=HALF_LIFE, ema_eval_training_weights=True),
    )
    trainer.remove_callback(PrinterCallback)  # the demo prints its own table at the end
    trainer.train()
    return [
        {
            "step": entry["step"],
            "ema_accuracy": entry["eval_accuracy"],
            "training_accuracy": entry["eval_training_accuracy"],
            "ema_loss": entry["eval_loss"],
            "training_loss": entry["eval_training_loss"],
        }
        for entry in trainer.state.log_history
        if "eval_loss" in entry
    ]


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    ema = [row["ema_accuracy"] for row in rows]
    training = [row["training_accuracy"] for row in rows]
    return {
        "final_ema_accuracy": ema[-1],
        "final_training_accuracy": training[-1],
        "mean_ema_accuracy": float(np.mean(ema)),
        "mean_training_accuracy": float(np.mean(training)),
        "evaluations_ema_better": sum(e > t for e, t in zip(ema, training, strict=True)),
        "evaluations_training_better": sum(t > e for e, t in zip(ema, training, strict=True)),
    }


def format_table(rows: list[dict[str, float]]) -> str:
    header = (
        f"{'step':>6} | {'EMA accuracy':>12} | {'training accuracy':>17} | {'EMA loss':>8} | {'training loss':>13}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['step']:>6} | {row['ema_accuracy']:>12.4f} | {row['training_accuracy']:>17.4f} | "
            f"{row['ema_loss']:>8.4f} | {row['training_loss']:>13.4f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """Test accuracy (left) and test loss (right, log scale) of both sets of weights against the step."""
    steps = [row["step"] for row in rows]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for weights, label in (("training", "training weights"), ("ema", f"EMA (half-life {HALF_LIFE})")):
        acc_ax.plot(steps, [row[f"{weights}_accuracy"] for row in rows], marker=".", label=label)
        loss_ax.plot(steps, [row[f"{weights}_loss"] for row in rows], marker=".", label=label)
    acc_ax.set_ylabel("test accuracy")
    loss_ax.set_ylabel("test loss")
    loss_ax.set_yscale("log")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    fig.suptitle(f"8x8 digits, tiny ResNet, SGD (momentum 0.9) at a constant lr={LEARNING_RATE}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="train for fewer steps (about 15 seconds)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/ema_digits"), help="where results go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and shuffling")
    cli = parser.parse_args()

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    evaluate.logging.disable_progress_bar()

    mode = MODES["fast" if cli.fast else "default"]
    cli.output_dir.mkdir(parents=True, exist_ok=True)
    rows = train(cli.output_dir, cli.seed, **mode)
    summary = summarize(rows)

    print(format_table(rows))
    print(
        f"final accuracy: EMA {summary['final_ema_accuracy']:.4f}, training {summary['final_training_accuracy']:.4f}"
        f" | mean over {len(rows)} evaluations: EMA {summary['mean_ema_accuracy']:.4f}, "
        f"training {summary['mean_training_accuracy']:.4f} | EMA better in {summary['evaluations_ema_better']}, "
        f"training better in {summary['evaluations_training_better']}"
    )

    plot(rows, cli.output_dir / "ema_vs_training.png")
    settings = {"half_life": HALF_LIFE, "learning_rate": LEARNING_RATE, "seed": cli.seed, **mode}
    results = {"settings": settings, "summary": summary, "rows": rows}
    (cli.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
