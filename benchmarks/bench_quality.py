"""What each average buys on a language model: eval loss of the training weights, two half-life EMAs and BEMA.

One run of `examples/run_clm_ema.py` (a 0.46M-parameter Llama trained from a config on the Python standard library's
source, byte-level, everything offline; its defaults otherwise) with two half-life averages and BEMA kept side by
side in one callback, all updated every step, and `--ema_eval_training_weights`: every evaluation scores the
training weights and the three averages on the same held-out blocks, from the same trajectory, in one log line.
The half-lives default to 10% and 25% of the steps; BEMA keeps its defaults (kappa 0.5, eta 0.2, rho 10, gamma 1).
The example runs in a fresh process per seed; its `trainer_state.json` log history gives the tables.

    python benchmarks/bench_quality.py            # about 4 minutes on 2 idle CPU cores (3 seeds x 600 steps)
    python benchmarks/bench_quality.py --write    # also replaces its table in docs/benchmarks.md

Prints eval loss per evaluation and method for the first seed, then each method's final and best loss against the
training weights' (difference in loss, and the perplexity ratio exp(difference)), then the final difference for
every seed, and writes a plot of the first seed (`--plot`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import publish  # noqa: E402

EXAMPLE = os.path.join(ROOT, "examples", "run_clm_ema.py")
PLOT = os.path.join(ROOT, "docs", "images", "quality_clm.png")
SECTION = "### Quality: language-model fine-tune"  # the heading --write replaces (its date and machine follow)


def run_example(out: str, steps: int, eval_steps: int, half_lives: list[str], seed: int) -> tuple[list[str], float]:
    """Runs the example in a fresh process; returns its command line (as a user types it) and the wall time."""
    flags = [
        "--max_steps", str(steps), "--eval_steps", str(eval_steps), "--logging_steps", str(eval_steps),
        "--half_life", *half_lives, "--bema", "True", "--update_interval", "1ba",
        "--ema_eval_training_weights", "True", "--seed", str(seed), "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])  # this checkout's hf_ema
    start = time.perf_counter()
    with open(os.path.join(out, "run.log"), "w", encoding="utf-8") as log:
        result = subprocess.run(
            [sys.executable, EXAMPLE, "--output_dir", os.path.join(out, "run"), *flags],
            env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - start
    if result.returncode != 0:
        with open(os.path.join(out, "run.log"), encoding="utf-8") as log:
            sys.exit(f"examples/run_clm_ema.py failed (exit {result.returncode}):\n{log.read()[-6000:]}")
    return flags, wall


def eval_losses(out: str, half_lives: list[str]) -> tuple[dict[str, str], dict[str, dict[int, float]]]:
    """({method: metric key}, {method: {step: eval loss}}) from the run's log history."""
    keys = {"training weights": "eval_training_loss", f"EMA half-life {half_lives[0]}": "eval_loss"}  # the primary
    keys |= {f"EMA half-life {label}": f"eval_ema_{label}_loss" for label in half_lives[1:]}
    keys["BEMA"] = "eval_ema_bema_loss"
    with open(os.path.join(out, "run", "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    return keys, {method: {entry["step"]: entry[key] for entry in evals} for method, key in keys.items()}


def tables(losses: dict[str, dict[int, float]]) -> str:
    methods = list(losses)
    steps = sorted(losses["training weights"])
    lines = ["| step | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 1) + "|"]
    for step in steps:
        row = [losses[m][step] for m in methods]
        best = min(row)
        cells = [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in row]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    reference = losses["training weights"]
    final_ref, best_ref = reference[steps[-1]], min(reference.values())
    lines += [
        "",
        f"At the last evaluation (step {steps[-1]}) and at each method's best evaluation, against the training "
        "weights' final and best (difference in eval loss; perplexity ratio = exp(difference)):",
        "",
        "| method | final eval loss | final - training | perplexity ratio | best eval loss (step) | "
        "best - training's best | perplexity ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        final = losses[method][steps[-1]]
        best_step = min(losses[method], key=losses[method].get)
        best = losses[method][best_step]
        lines.append(
            f"| {method} | {final:.4f} | {final - final_ref:+.4f} | {2.718281828459045 ** (final - final_ref):.3f}x "
            f"| {best:.4f} ({best_step}) | {best - best_ref:+.4f} | {2.718281828459045 ** (best - best_ref):.3f}x |"
        )
    return "\n".join(lines)


def seed_table(runs: list[dict[str, dict[int, float]]], seeds: list[int]) -> str:
    """Final eval loss minus the training weights' in each seed's run (the same command with `--seed` changed)."""
    last = max(runs[0]["training weights"])
    lines = [
        f"Final (step {last}) eval loss minus the training weights' in the same run, one run per seed "
        f"(`--seed {' / '.join(map(str, seeds))}`):",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "| --- " * (len(seeds) + 2) + "|",
    ]
    for method in runs[0]:
        diffs = [run[method][last] - run["training weights"][last] for run in runs]
        cells = [f"{d:+.4f}" for d in diffs] + [f"{sum(diffs) / len(diffs):+.4f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(losses: dict[str, dict[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(losses["training weights"])
    reference = losses["training weights"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, series in losses.items():
        style = {"color": "black", "linestyle": "--"} if method == "training weights" else {}
        left.plot(steps, [series[s] for s in steps], marker="o", markersize=3, label=method, **style)
        right.plot(steps, [series[s] - reference[s] for s in steps], marker="o", markersize=3, label=method, **style)
    left.set(xlabel="optimizer step", ylabel="eval loss (nats per byte)", title="eval loss")
    right.set(
        xlabel="optimizer step", ylabel="eval loss - training weights' eval loss", title="against the training weights"
    )
    low = min(min(series[s] - reference[s] for s in steps[len(steps) // 4 :]) for series in losses.values())
    high = max(max(series[s] - reference[s] for s in steps[len(steps) // 4 :]) for series in losses.values())
    pad = 0.1 * (high - low or 1.0)
    right.set_ylim(
        low - pad, high + pad
    )  # the first quarter (averages still holding the start) would flatten the rest
    right.axhline(0.0, color="black", linewidth=0.5)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (the example's default)")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluate every this many steps")
    parser.add_argument("--half-lives", nargs="+", help="half-lives to keep (default: 10%% and 25%% of --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run each; the first is tabled")
    parser.add_argument("--plot", default=PLOT, help="where the plot goes (default: docs/images/quality_clm.png)")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/benchmarks.md")
    cli = parser.parse_args()
    half_lives = cli.half_lives or [f"{round(cli.steps * 0.10)}ba", f"{round(cli.steps * 0.25)}ba"]

    import torch
    import transformers

    runs, walls = [], []
    for seed in cli.seeds:
        with tempfile.TemporaryDirectory() as out:
            flags, wall = run_example(out, cli.steps, cli.eval_steps, half_lives, seed)
            runs.append(eval_losses(out, half_lives)[1])
            walls.append(wall)
        if seed == cli.seeds[0]:
            command = "python examples/run_clm_ema.py " + " ".join(flags)
    losses = runs[0]
    load = os.getloadavg()
    date = datetime.date.today().isoformat()
    cores = os.cpu_count()
    title = f"run_clm_ema.py, {cli.steps} steps, Llama 0.46M from a config, Python stdlib source (bytes), {date}"
    plot(losses, cli.plot, f"{title}, seed {cli.seeds[0]}")
    plot_link = os.path.relpath(cli.plot, os.path.join(ROOT, "docs")).replace(os.sep, "/")
    text = "\n".join(
        [
            f"{SECTION}, cpu ({cores} cores, {platform.machine()}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {date}",
            "",
            f"Command: `python benchmarks/bench_quality.py{' --steps ' + str(cli.steps) if cli.steps != 600 else ''}`,"
            f" which runs `{command}` (the example's other defaults: batch 8 x 128 bytes, AdamW at learning rate "
            "3e-3, constant after 30 warm-up steps; 256 held-out blocks of 128 bytes). One run, seed "
            f"{cli.seeds[0]}: every evaluation scores all four on the same blocks. Run time {walls[0] / 60:.1f} min "
            f"wall clock per run (load average at the end {load[0]:.1f}). Bold: the lowest loss at that step.",
            "",
            tables(losses),
            "",
            seed_table(runs, cli.seeds),
            "",
            f"![Eval loss of the training weights, the half-life EMAs and BEMA against the step]({plot_link})",
            "",
        ]
    )
    publish(text, cli.write, replace=SECTION)


if __name__ == "__main__":
    main()
