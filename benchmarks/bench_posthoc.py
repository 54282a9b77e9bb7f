"""How exact post-hoc EMA is: synthesised averages against float64 power-function averages of the recorded weights.

Two runs, each with `sigma_rel=[0.05, 0.10]` snapshots in float32 and in bfloat16 (the same training twice):

- `tiny`: the tests' linear model with BatchNorm, 64 steps, a snapshot every 8 (the issue's bounds: a tracked width
  within 1e-4 of its lag, an untracked one within 1%);
- `digits`: the tiny ResNet of examples/posthoc_digits.py (20k parameters), 600 steps, a snapshot every 20.

The error of an average is `||synth - ref|| / ||ref - w_T||`: relative to how far the exact average lags behind the
last training weights `w_T` (all tensors together). `residual` is the relative L2 error of the synthesised
weighting of the steps (`hf_ema.posthoc.plan`), `sum |x|` the sum of the absolute coefficients, which multiplies the
snapshots' own rounding.

    python benchmarks/bench_posthoc.py    # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples")]

from conftest import Recorder, RegressionDataset, TinyConfig, TinyModel, make_args  # noqa: E402

from hf_ema import EMAArguments, EMATrainer, posthoc  # noqa: E402
from hf_ema.rules import gamma_of_sigma_rel  # noqa: E402

SIGMA_RELS = [0.03, 0.04, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25]


def tiny(output_dir: str, dtype: str) -> dict[int, dict[str, torch.Tensor]]:
    recorder = Recorder()
    ema_args = EMAArguments(sigma_rel=[0.05, 0.10], ema_snapshot_every="8ba", ema_snapshot_dtype=dtype)
    trainer = EMATrainer(
        model=TinyModel(TinyConfig(with_norm=True)),
        args=make_args(output_dir, num_train_epochs=8),
        train_dataset=RegressionDataset(32, seed=0),
        callbacks=[recorder],
        ema_args=ema_args,
    )
    trainer.train()
    return recorder.weights


def digits(output_dir: str, dtype: str) -> dict[int, dict[str, torch.Tensor]]:
    from posthoc_digits import build_trainer

    recorder = Recorder()
    build_trainer(output_dir, 0, 600, 20, snapshot_dtype=dtype, callbacks=[recorder]).train()
    return recorder.weights


def reference(weights: dict[int, dict[str, torch.Tensor]], sigma_rel: float, steps: int) -> dict[str, torch.Tensor]:
    """The power-function average of per-step updates in closed form, float64."""
    exponent = gamma_of_sigma_rel(sigma_rel) + 1.0
    out = {name: torch.zeros_like(t) for name, t in weights[steps].items()}
    for k in range(1, steps + 1):
        share = (k / steps) ** exponent - ((k - 1) / steps) ** exponent
        for name in out:
            out[name] += share * weights[k][name]
    return out


def norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def measure(name: str, run, steps: int) -> str:
    lines = [
        f"**{name}** ({steps} steps):",
        "",
        "| sigma_rel | tracked | residual | sum \\|x\\| | error / lag, float32 snapshots | error / lag, bfloat16 snapshots "
        "| lag / \\|w_T\\| |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as f32, tempfile.TemporaryDirectory() as bf16:
        weights = run(f32, "float32")
        weights_bf16 = run(bf16, "bfloat16")
        assert all(torch.equal(weights[steps][n], weights_bf16[steps][n]) for n in weights[steps]), "runs differ"
        last = weights[steps]
        for sigma_rel in SIGMA_RELS:
            ref = reference(weights, sigma_rel, steps)
            lag = norm(ref[n] - last[n] for n in ref)
            try:
                plan = posthoc.plan(f32, sigma_rel)
            except posthoc.PostHocError:
                lines.append(f"| {sigma_rel} | | refused (outside what the snapshots support) | | | | |")
                continue
            errors = []
            for folder in (f32, bf16):
                synth = posthoc.synthesize(folder, sigma_rel)
                errors.append(norm(synth[n].double() - ref[n] for n in ref) / lag)
            tracked = "yes" if sigma_rel in (0.05, 0.10) else ""
            lines.append(
                f"| {sigma_rel} | {tracked} | {plan.residual:.1e} | {plan.amplification:.2f} | {errors[0]:.1e} | "
                f"{errors[1]:.1e} | {lag / norm(last.values()):.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)  # small models: threads only contend
    import transformers

    transformers.logging.set_verbosity_error()
    print(measure("tiny: linear model with BatchNorm, a snapshot every 8", tiny, 64))
    print(measure("digits: tiny ResNet, a snapshot every 20", digits, 600))


if __name__ == "__main__":
    main()
