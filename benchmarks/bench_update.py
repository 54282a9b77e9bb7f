"""Cost of one EMA update against the memory-bandwidth floor and the peers' update styles, measured in one run.

Tensors shaped like a decoder LLM's (embeddings, attention and MLP matrices, norms) are averaged by:

- floor: one `lerp_` over a single flat tensor of the same size (reads w and ema, writes ema: the least any
  implementation can move);
- hf-ema: `hf_ema.core.UpdatePlan.run`, the update the store runs (fused `torch._foreach_*` kernels grouped by
  device and dtype, built once);
- per-tensor loop: `ema.mul_(s).add_(w, alpha=1 - s)` tensor by tensor (the style of Composer's `compute_ema`, timm's
  ModelEmaV2 and diffusers' EMAModel without foreach);
- torch AveragedModel: `torch.optim.swa_utils.get_ema_multi_avg_fn` (foreach lerp, same dtype only).

Ratios are times divided by the floor's, all from the same run. Results are appended to docs/benchmarks.md with
`--write`.

    python benchmarks/bench_update.py                 # CPU, ~100M parameters
    python benchmarks/bench_update.py --device cuda --params 1e9 --write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from report import publish  # noqa: E402

import hf_ema.core as core  # noqa: E402
from hf_ema.core import UpdatePlan  # noqa: E402


def model_like(params: float, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Tensors with the shapes of a decoder LLM of about `params` parameters."""
    hidden = 2048 if params >= 5e8 else 768
    vocab = 32000
    per_layer = 12 * hidden * hidden + 2 * hidden
    layers = max(1, int((params - 2 * vocab * hidden) // per_layer))
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden), (hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    torch.manual_seed(0)
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def timed(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of each `fn()` over `repeats` rounds after two warm-ups.

    The implementations take turns within each round, so a change in machine load affects all of them alike.
    """
    for _ in range(2):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                # Five calls back to back between two events, after a synchronisation: the GPU is busy throughout.
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / 1000 / 5)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(params: float, param_dtype: torch.dtype, shadow_dtype: torch.dtype, device: str, repeats: int) -> list[dict]:
    live = model_like(params, param_dtype, device)
    shadow = [t.to(shadow_dtype, copy=True) for t in live]  # never the same storage as `live`
    numel = sum(t.numel() for t in live)
    moved = numel * (2 * shadow[0].element_size() + live[0].element_size())  # read ema and w, write ema
    flat_live = torch.cat([t.reshape(-1) for t in live]).to(shadow_dtype)
    flat_shadow = torch.cat([t.reshape(-1) for t in shadow])
    s = 0.999

    def floor():
        flat_shadow.lerp_(flat_live, 1 - s)

    plan = UpdatePlan([shadow], live)

    def ours():
        plan.run([s])

    def loop():
        with torch.no_grad():
            for e, w in zip(shadow, live, strict=True):
                e.mul_(s).add_(w, alpha=1 - s)

    def foreach_mul_add():
        torch._foreach_mul_(shadow, s)
        torch._foreach_add_(shadow, live, alpha=1 - s)

    rows = [("floor (one flat lerp)", floor), ("hf-ema UpdatePlan", ours), ("per-tensor mul_/add_ loop", loop)]
    if param_dtype != shadow_dtype:  # the ways hf-ema can do it; the plan picks one per device type
        rows.append(("  candidate: foreach mul_ + mixed-dtype add_ (hf-ema's choice on CUDA)", foreach_mul_add))
        default = core.SCRATCH_NUMEL
        for numel in (2**18, 2**20, 2**22):
            core.SCRATCH_NUMEL = numel  # read when a plan is built
            staged = UpdatePlan([shadow], live, mixed="upcast")
            chosen = " (hf-ema's choice on CPU)" if numel == default else ""
            name = f"  candidate: upcast through {numel * 4 >> 20} MiB of scratch + foreach lerp{chosen}"
            rows.append((name, lambda staged=staged: staged.run([s])))
        core.SCRATCH_NUMEL = default
    if param_dtype == shadow_dtype:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        avg = get_ema_multi_avg_fn(s)
        rows.append(("torch AveragedModel multi_avg_fn", lambda: avg(shadow, live, None)))
    times = timed(dict(rows), device, repeats)
    base = times["floor (one flat lerp)"]
    return [
        {
            "params": numel,
            "param_dtype": str(param_dtype).removeprefix("torch."),
            "shadow_dtype": str(shadow_dtype).removeprefix("torch."),
            "impl": name,
            "ms": 1000 * t,
            "ratio": t / base,
            "GBps": moved / t / 1e9,
            "tensors": len(live),
        }
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    cases = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    rows = []
    for param_dtype, shadow_dtype in cases:
        rows += run(args.params, param_dtype, shadow_dtype, args.device, args.repeats)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    if args.device == "cuda":
        # A device-to-device copy as a second yardstick: it moves 2 bytes per byte copied.
        big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        other = torch.empty_like(big)
        seconds = timed({"copy": lambda: other.copy_(big)}, "cuda", args.repeats)["copy"]
        print(f"device-to-device copy of 1 GiB: {2 * 2**30 / seconds / 1e9:.0f} GB/s counting read and write")
    header = (
        f"### Update cost, {args.device} ({device_name}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"{rows[0]['params'] / 1e6:.0f}M parameters in {rows[0]['tensors']} tensors, "
        f"{datetime.date.today().isoformat()}\n\n"
        f"Command: `python benchmarks/bench_update.py --device {args.device} --params {args.params:g}`\n\n"
        "| params | average | implementation | ms / update | x floor | GB/s moved |\n| --- | --- | --- | --- | --- | --- |\n"
    )
    table = "".join(
        f"| {r['param_dtype']} | {r['shadow_dtype']} | {r['impl']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
        f"{r['GBps']:.0f} |\n"
        for r in rows
    )
    publish(header + table, args.write)


if __name__ == "__main__":
    main()
