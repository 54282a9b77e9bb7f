"""Three EMAs of the weights (half-lives 10, 30 and 100 steps) vs. the training weights, on 8x8 handwritten digits.

A tiny ResNet (built from a config, nothing is downloaded) is trained with `EMATrainer` and a deliberately large,
constant learning rate, so that the training weights keep jumping around the optimum from one step to the next. One
callback keeps three exponential moving averages of the weights (`half_life=["30ba", "10ba", "100ba"]`; the first is
the primary), which smooth those jumps out over different lengths. With `ema_eval_training_weights=True`, every
evaluation scores all four sets of weights on the same held-out images, in the same log entry: the primary as
`eval_*`, the other averages as `eval_ema_<half-life>_*`, the training weights as `eval_training_*`.

The script prints one line per evaluation as training goes, then the accuracy table of all four side by side, writes
it to `results.json`, and plots it to `ema_vs_training.png` in `--output-dir`. Everything runs offline, on the CPU:

    python examples/ema_digits.py            # 1200 steps, 30 evaluations of 4 sets of weights: 340 s of CPU time
    python examples/ema_digits.py --fast     # 240 steps, for the test suite: about a fifth of that

(Measured 2026-12-01 with `/usr/bin/time`: 339 s user time for the default run, which took 9 min 52 s of wall time on
a 2-core machine busy with other jobs, and about 80 s from a fresh clone on 2 idle cores. It prints a line per
evaluation.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU-only run: DeepSpeed, if installed, warns of its fallback
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
from transformers import (  # noqa: E402
    PrinterCallback,
    ResNetConfig,
    ResNetForImageClassification,
    TrainerCallback,
    TrainingArguments,
)

from hf_ema import EMAArguments, EMATrainer  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "accuracy"

# Two settings of the same run: the default, and a shorter one for the test suite.
MODES = {
    "default": {"max_steps": 1200, "eval_steps": 40},
    "fast": {"max_steps": 240, "eval_steps": 20},
}
HALF_LIVES = ["30ba", "10ba", "100ba"]  # the first is the primary: eval_*, save_model, the model after train()
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


class Progress(TrainerCallback):
    """Prints one line per evaluation while training runs."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        scores = ", ".join(f"EMA {label} {metrics[key]:.3f}" for label, key in accuracy_keys().items())
        print(
            f"step {state.global_step:>5}/{state.max_steps}: accuracy of training weights "
            f"{metrics['eval_training_accuracy']:.3f}, {scores}",
            flush=True,
        )


def accuracy_keys() -> dict[str, str]:
    """The log key of each average's accuracy: the primary's is `eval_accuracy`, the others' `eval_ema_<label>_...`."""
    return {label: "eval_accuracy" if i == 0 else f"eval_ema_{label}_accuracy" for i, label in enumerate(HALF_LIVES)}


def train(output_dir: Path, seed: int, max_steps: int, eval_steps: int) -> list[dict[str, float]]:
    """Trains with `EMATrainer` and returns one row per evaluation, with every average's and the training weights'
    scores."""
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
        ema_args=EMAArguments(half_life=HALF_LIVES, ema_eval_training_weights=True),
        callbacks=[Progress()],
    )
    trainer.remove_callback(PrinterCallback)  # the demo prints its own lines
    trainer.train()
    rows = []
    for entry in trainer.state.log_history:
        if "eval_loss" not in entry:
            continue
        row = {"step": entry["step"], "training_accuracy": entry["eval_training_accuracy"]}
        row.update({f"ema_{label}_accuracy": entry[key] for label, key in accuracy_keys().items()})
        row.update(
            {
                "ema_accuracy": entry["eval_accuracy"],  # the primary's
                "ema_loss": entry["eval_loss"],
                "training_loss": entry["eval_training_loss"],
            }
        )
        rows.append(row)
    return rows


def columns() -> dict[str, str]:
    """Table and plot columns: the training weights, then the averages from the shortest half-life to the longest."""
    ordered = sorted(HALF_LIVES, key=lambda label: int(label.removesuffix("ba")))
    names = {h: f"EMA {h}" + (" (primary)" if h == HALF_LIVES[0] else "") for h in ordered}
    return {"training_accuracy": "training weights", **{f"ema_{h}_accuracy": names[h] for h in ordered}}


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Final and mean accuracy of each column."""
    return {
        column: {"final": rows[-1][column], "mean": float(np.mean([row[column] for row in rows]))}
        for column in columns()
    }


def format_table(rows: list[dict[str, float]]) -> str:
    names = columns()
    header = f"{'step':>6} | " + " | ".join(f"{name:>18}" for name in names.values())
    lines = ["test accuracy", header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['step']:>6} | " + " | ".join(f"{row[column]:>18.4f}" for column in names))
    summary = summarize(rows)
    lines.append("-" * len(header))
    for kind in ("final", "mean"):
        lines.append(f"{kind:>6} | " + " | ".join(f"{summary[column][kind]:>18.4f}" for column in names))
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """Test accuracy of every set of weights against the step (left: the whole run; right: the last half)."""
    steps = [row["step"] for row in rows]
    fig, (acc_ax, zoom_ax) = plt.subplots(1, 2, figsize=(11, 4))
    half = len(rows) // 2
    for column, name in columns().items():
        style = {"color": "0.55", "linewidth": 1} if column == "training_accuracy" else {"marker": "."}
        acc_ax.plot(steps, [row[column] for row in rows], label=name, **style)
        zoom_ax.plot(steps[half:], [row[column] for row in rows[half:]], label=name, **style)
    acc_ax.set_ylabel("test accuracy")
    zoom_ax.set_title("second half of the run", fontsize=10)
    for ax in (acc_ax, zoom_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    fig.suptitle(f"8x8 digits, tiny ResNet, SGD (momentum 0.9) at a constant lr={LEARNING_RATE}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="train for 240 steps instead of 1200")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/ema_digits"), help="where results go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and shuffling")
    cli = parser.parse_args()

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    evaluate.logging.disable_progress_bar()

    mode = MODES["fast" if cli.fast else "default"]
    cli.output_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"training a tiny ResNet on the 8x8 digits for {mode['max_steps']} steps, evaluating every {mode['eval_steps']}"
    )
    rows = train(cli.output_dir, cli.seed, **mode)
    summary = summarize(rows)

    print()
    print(format_table(rows))

    plot(rows, cli.output_dir / "ema_vs_training.png")
    print(f"plot: {cli.output_dir / 'ema_vs_training.png'}, table: {cli.output_dir / 'results.json'}")
    settings = {"half_lives": HALF_LIVES, "learning_rate": LEARNING_RATE, "seed": cli.seed, **mode}
    results = {"settings": settings, "summary": summary, "rows": rows}
    (cli.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
