"""Post-hoc EMA on 8x8 handwritten digits: train once, then choose the EMA length by sweeping it afterwards.

The tiny ResNet of `ema_digits.py` (same data, model and deliberately large constant learning rate) is trained once
with two EDM2 power-function averages, `sigma_rel=[0.05, 0.10]`, whose snapshots are written every 20 steps into
`<output-dir>/ema_snapshots/` (`ema_snapshot_every="20ba"`). Afterwards, `hf_ema.posthoc` synthesises a dozen other
widths from those snapshots, exports each as a folder that `from_pretrained` loads, and the sweep scores every one on
the held-out digits. The plot shows test accuracy and loss against sigma_rel (with the matching half-life at the last
step on the top axis), the two tracked averages marked, and the training weights for reference.

    python examples/posthoc_digits.py train   # 600 steps, 30 snapshots (5.1 MiB): 38 s, 18 s of it training
    python examples/posthoc_digits.py sweep --plot docs/images/posthoc_digits.png   # 12 widths: 22 s, 4 s of it sweeping
    python examples/posthoc_digits.py          # both
    python examples/posthoc_digits.py --fast   # 240 steps, a snapshot every 10, for the test suite: 24 s

Wall-clock times measured on 2 CPU cores shared with other jobs; the rest of each run is Python and torch starting.
Results go to `--output-dir` (default `outputs/posthoc_digits`): `results.json`, `posthoc_digits.png`, and the
exported averages in `posthoc/sigma_rel-<value>/`. Everything runs offline, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU-only run: DeepSpeed, if installed, warns of its fallback
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the data and model of ema_digits.py

import datasets  # noqa: E402
import matplotlib  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from ema_digits import BATCH_SIZE, LEARNING_RATE, build_model, digits_splits  # noqa: E402
from transformers import ResNetForImageClassification, TrainingArguments  # noqa: E402

from hf_ema import EMAArguments, EMATrainer, posthoc  # noqa: E402
from hf_ema.rules import half_life_of_sigma_rel  # noqa: E402
from hf_ema.snapshots import SNAPSHOT_DIR  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = {
    "default": {"max_steps": 600, "snapshot_every": 20},
    "fast": {"max_steps": 240, "snapshot_every": 10},
}
TRACKED = [0.05, 0.10]  # EDM2's choice
SWEEP = [0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.085, 0.10, 0.12, 0.15, 0.20, 0.25]


def build_trainer(
    output_dir: Path, seed: int, max_steps: int, snapshot_every: int, snapshot_dtype: str = "float32", callbacks=()
) -> EMATrainer:
    """The training run: SGD with momentum at a large constant learning rate, two power-function averages, a
    snapshot of both every `snapshot_every` steps."""
    transformers.set_seed(seed)
    train_set, _ = digits_splits(seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH_SIZE,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        eval_strategy="no",
        logging_strategy="no",
        save_strategy="no",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    ema_args = EMAArguments(
        sigma_rel=TRACKED, ema_snapshot_every=f"{snapshot_every}ba", ema_snapshot_dtype=snapshot_dtype
    )
    return EMATrainer(
        model=build_model(), args=args, train_dataset=train_set, ema_args=ema_args, callbacks=list(callbacks)
    )


def train(output_dir: Path, seed: int, max_steps: int, snapshot_every: int) -> dict:
    """Trains once with snapshots; saves the primary average (the model folder exports copy) and the training
    weights, and returns the accuracy of the averages kept during training."""
    trainer = build_trainer(output_dir, seed, max_steps, snapshot_every)
    _, test_set = digits_splits(seed)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model()  # config + the primary average: the folder each export starts from
    with trainer.training_weights():
        trainer.save_model(str(output_dir / "training-weights"))
    kept = {label: evaluate(model, test_set) for label, model in trainer.ema_models.items()}
    return {"train_seconds": seconds, "kept": kept}


@torch.no_grad()
def evaluate(model: torch.nn.Module, test_set: datasets.Dataset) -> dict[str, float]:
    """Accuracy and mean cross-entropy on the held-out digits."""
    model.eval()
    batch = test_set[:]  # the whole test set (450 images) as tensors
    logits = model(pixel_values=batch["pixel_values"]).logits
    labels = batch["labels"]
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def sweep(output_dir: Path, seed: int) -> list[dict]:
    """Synthesises every sigma_rel of `SWEEP` at the last snapshot, exports and scores it."""
    _, test_set = digits_splits(seed)
    rows = []
    for sigma_rel in SWEEP:
        try:
            folder = posthoc.export(output_dir, output_dir / "posthoc" / f"sigma_rel-{sigma_rel}", sigma_rel=sigma_rel)
        except posthoc.PostHocError as error:  # outside what the snapshots support: say so, keep sweeping
            print(f"sigma_rel {sigma_rel}: skipped ({str(error).split(': the best')[0]})")
            continue
        info = json.loads((Path(folder) / posthoc.EXPORT_INFO).read_text(encoding="utf-8"))
        scores = evaluate(ResNetForImageClassification.from_pretrained(folder), test_set)
        rows.append(
            {
                "sigma_rel": sigma_rel,
                "half_life": half_life_of_sigma_rel(sigma_rel, info["t"]),
                "tracked": sigma_rel in TRACKED,
                "residual": info["residual"],
                "step": info["step"],
                "t": info["t"],
                **scores,
            }
        )
        print(
            f"sigma_rel {sigma_rel:<6} (half-life {rows[-1]['half_life']:6.1f} steps): test accuracy "
            f"{scores['accuracy']:.4f}, loss {scores['loss']:.4f}, weighting error {info['residual']:.1e}",
            flush=True,
        )
    return rows


def disk_usage(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def plot(rows: list[dict], training: dict[str, float], step: int, path: Path) -> None:
    """Test accuracy and loss against sigma_rel (log scale), the tracked averages marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sigmas = [row["sigma_rel"] for row in rows]
    steps_per_sigma = half_life_of_sigma_rel(0.1, rows[-1]["t"]) / 0.1  # half-life = ln 2 * sigma_rel * t
    for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(sigmas, [row[key] for row in rows], marker=".", label="synthesised after training")
        tracked = [row for row in rows if row["tracked"]]
        ax.scatter(
            [row["sigma_rel"] for row in tracked],
            [row[key] for row in tracked],
            s=120,
            marker="*",
            color="C3",
            zorder=3,
            label="tracked during training (0.05, 0.10)",
        )
        if key == "accuracy":
            ax.axhline(training[key], color="0.55", linewidth=1, linestyle="--", label="training weights")
        else:  # the training weights' loss is far above: a line would flatten the curve
            ax.set_title(f"training weights: {key} {training[key]:.3f}", fontsize=9, loc="right")
        ax.set_xscale("log")
        ticks = sigmas[:: 2 if len(sigmas) > 8 else 1]
        ax.set_xticks(ticks, [f"{s:g}" for s in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sigma_rel (EMA length relative to training time)")
        ax.set_ylabel(f"test {key}")
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * steps_per_sigma, lambda h: h / steps_per_sigma))
        top.set_xticks([s * steps_per_sigma for s in ticks], [f"{s * steps_per_sigma:.0f}" for s in ticks])
        top.minorticks_off()
        top.set_xlabel(f"matching half-life at step {step} (optimizer steps)", fontsize=9)
    axes[0].legend(loc="lower center", fontsize=8)
    fig.suptitle(f"Post-hoc EMA: one run, EMA length chosen afterwards (8x8 digits, tiny ResNet, lr={LEARNING_RATE})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", choices=["train", "sweep", "all"], default="all", help="what to run")
    parser.add_argument("--fast", action="store_true", help="train for 240 steps, a snapshot every 10")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/posthoc_digits"), help="where results go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and shuffling")
    parser.add_argument("--plot", type=Path, help="where to write the plot (default: <output-dir>/posthoc_digits.png)")
    cli = parser.parse_args()

    # A model this small gains nothing from several threads, and on a busy machine their contention costs a lot
    # (one step: 18 ms on one thread, 740 ms on two, measured on a shared 2-core machine).
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    mode = MODES["fast" if cli.fast else "default"]
    cli.output_dir.mkdir(parents=True, exist_ok=True)
    results_path = cli.output_dir / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}

    if cli.stage in ("train", "all"):
        print(f"training for {mode['max_steps']} steps, a snapshot of both averages every {mode['snapshot_every']}")
        trained = train(cli.output_dir, cli.seed, **mode)
        snapshots = posthoc.list_snapshots(cli.output_dir)
        results = {
            "settings": {"tracked": TRACKED, "seed": cli.seed, "learning_rate": LEARNING_RATE, **mode},
            **trained,
            "snapshots": len(snapshots),
            "snapshot_bytes": disk_usage(cli.output_dir / SNAPSHOT_DIR),
            "model_bytes": (cli.output_dir / "model.safetensors").stat().st_size,
        }
        _, test_set = digits_splits(cli.seed)
        results["training"] = evaluate(
            ResNetForImageClassification.from_pretrained(cli.output_dir / "training-weights"), test_set
        )
        print(
            f"trained in {trained['train_seconds']:.0f} s; {len(snapshots)} snapshots, "
            f"{results['snapshot_bytes'] / 2**20:.2f} MiB in {cli.output_dir / SNAPSHOT_DIR} "
            f"(model.safetensors: {results['model_bytes'] / 2**10:.0f} KiB)"
        )
        for label, scores in trained["kept"].items():
            print(f"kept during training, sigma_rel {label}: test accuracy {scores['accuracy']:.4f}")
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    if cli.stage in ("sweep", "all"):
        if "training" not in results:
            raise SystemExit(f"{results_path} has no training results: run `train` first.")
        started = time.perf_counter()
        rows = sweep(cli.output_dir, cli.seed)
        results["sweep_seconds"] = time.perf_counter() - started
        results["rows"] = rows
        best = max(rows, key=lambda row: row["accuracy"])
        print(
            f"best: sigma_rel {best['sigma_rel']} (test accuracy {best['accuracy']:.4f}); training weights "
            f"{results['training']['accuracy']:.4f}; swept in {results['sweep_seconds']:.0f} s"
        )
        png = cli.plot or cli.output_dir / "posthoc_digits.png"
        plot(rows, results["training"], rows[-1]["step"], png)
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"plot: {png}, table: {results_path}")


if __name__ == "__main__":
    main()
