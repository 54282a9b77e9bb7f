"""Cost of one EMA update by hf-ema's `compute_ema` and by the peers' EMA libraries, side by side in one run.

Per model (BERT-base, a small GPT-2 with tied embeddings, 4000 tiny tensors) and per weight dtype (float32, and
bf16 weights), every implementation below updates its average once per round; the rounds are interleaved (each round
runs every implementation once, starting one further along the list each time, so that a change in machine load
falls on all of them alike), one untimed round first, and the table gives medians over the rounds:

- floor (one flat lerp): `flat_avg.lerp_(flat_weights, w)` over two flat float32 tensors as long as the model's
  trainable parameters (reads both, writes one: 12 bytes per element, the least any update can move; for bf16 weights
  it is still the float32 floor);
- floor (`_foreach_lerp_`): `torch._foreach_lerp_` over the model's own tensors under `torch.no_grad()` (for bf16
  weights, over float32 copies of them: the float32 floor with the model's tensor count);
- hf-ema `compute_ema(model, ema_model, smoothing)`, `ema_model = copy.deepcopy(model)` (for bf16 weights
  `copy.deepcopy(model).float()`, hf-ema's float32 average);
- the peers, each called as its documentation shows, each call a full update with decay `smoothing` (set from their
  sources so that no warm-up schedule, delay or `update_every` gap applies):
  - timm `ModelEmaV3(model, decay=s, exclude_buffers=True)` (foreach on, the default), `.update(model)` without
    `step`, so the decay is `s` from the first call. `exclude_buffers=True` because the default walks `state_dict()`,
    which lists a tied tensor under both of its names, and so averages it twice per update (GPT-2 here); with it, timm
    walks `parameters()`, which lists it once, and none of these models has floating-point buffers to average. bf16
    weights: the default bf16 average with stochastic rounding, and `dtype=torch.float32` as a row of its own;
  - timm `ModelEmaV2(model, decay=s)`, `.update(model)`: per-tensor `decay * e + (1 - decay) * m` over
    `state_dict()`; left out on the tied model for the double update above (it has no option to avoid it);
  - ema-pytorch `EMA(model, beta=s, update_after_step=0, update_every=1, min_value=s, use_foreach=True)`,
    `.update()`: its first call only copies the weights (called once before timing); `min_value=s` pins its
    inverse-gamma warm-up at `s`. bf16 weights: also `ema_model=copy.deepcopy(model).float(), coerce_dtype=True`,
    a float32 average;
  - diffusers `EMAModel(model.parameters(), decay=s, min_decay=s, foreach=True)` and `foreach=False`,
    `.step(model.parameters())`: its default warm-up `(1 + t) / (10 + t)` is pinned at `s` by `min_decay=s`; its first
    call (decay 0, a copy) is made once before timing. bf16 weights: also `.to(dtype=torch.float32)`, a float32
    average;
  - torch-ema `ExponentialMovingAverage(model.parameters(), decay=s, use_num_updates=False)`, `.update()`
    (`use_num_updates=False` turns off its `(1 + n) / (10 + n)` warm-up). bf16 weights: also `.to(dtype=float32)`;
  - torch `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s))`, `.update_parameters(model)`: its first call
    copies the weights (made once before timing). bf16 weights: `AveragedModel(...).float()` is tried for a float32
    average, but its `_foreach_lerp_` refuses mixed dtypes (torch 2.13), so it shows among the rows left out.

Before timing, each implementation (floors aside: they average copies of their own) is checked once: built from the
same start weights A with smoothing 0.75, then one update towards weights B = A + noise, and its average must match
the float64 `0.75 * A + 0.25 * B` within a few units of its own dtype's precision (a smoothing far from 1 makes a
skipped, doubled or warmed-up update show even in bf16). An implementation that fails is left out of the table with
the reason printed. Ratios divide each median by the floors' medians from the same run.

timm's EMA module is loaded from its file when `import timm` fails: timm imports torchvision, and PyPI's torchvision
for torch 2.13 is a CUDA build that cannot load its ops against the CPU torch, so `make bench-peers` leaves it out.

    make bench-peers BENCH_ARGS=--quick                                   # smoke run: 3 rounds, no bert-base
    .venv-bench/bin/python benchmarks/bench_peers.py                      # every model, 15 rounds (7 on bert-base)
    .venv-bench/bin/python benchmarks/bench_peers.py --models tiny-4000 gpt2-small-tied
    .venv-bench/bin/python benchmarks/bench_peers.py --write              # also appends the tables to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from report import publish  # noqa: E402

from hf_ema import compute_ema  # noqa: E402

SMOOTHING = 0.999
CHECK_SMOOTHING = 0.75
MODELS = {"bert-base": 7, "gpt2-small-tied": 15, "tiny-4000": 15}  # default rounds
PEERS = ["timm", "ema-pytorch", "diffusers", "torch-ema"]
FLAT, FOREACH, HF_EMA = "floor (one flat lerp)", "floor (`_foreach_lerp_`)", "hf-ema `compute_ema`"


class Unavailable(Exception):
    """An implementation that cannot run here or cannot be set up to agree with the reference; the message says why."""


@dataclass
class Row:
    name: str
    average_dtype: torch.dtype
    update: Callable[[], object]
    average: Callable[[], list[torch.Tensor]] | None  # the average's tensors, in the order of the model's parameters
    peer: bool = True


def build_model(name: str, dtype: torch.dtype) -> nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "bert-base":
        model = BertModel(BertConfig())
    elif name == "gpt2-small-tied":
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8000, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        if model.lm_head.weight is not model.transformer.wte.weight:
            raise RuntimeError("gpt2-small-tied: lm_head.weight is not tied to transformer.wte.weight")
    elif name == "tiny-4000":
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(2000)])
    else:
        raise ValueError(f"Unknown model {name!r}; choose from {', '.join(MODELS)}.")
    return model.to(dtype)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def by_name(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The tensors of `module` named `names` (a tied tensor once, under the name `named_parameters` gives it)."""
    tensors = dict(module.named_parameters())
    return [tensors[n] for n in names]


def timm_model_ema():
    """timm.utils.model_ema; from its file when `import timm` fails for want of a working torchvision (see above)."""
    try:
        from timm.utils import model_ema

        return model_ema
    except (ImportError, RuntimeError):  # no torchvision, or one whose C++ ops do not load
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("timm is not installed (`make bench-peers` installs it)") from None
        path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
        module_spec = importlib.util.spec_from_file_location("timm_utils_model_ema", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module


def has_tied_tensors(model: nn.Module) -> bool:
    return len(model.state_dict()) > len(dict(model.named_parameters())) + len(dict(model.named_buffers()))


def floors(model: nn.Module) -> list[Row]:
    params = trainable(model)
    flat_weights = torch.cat([p.detach().reshape(-1) for p in params]).float()
    flat_avg = flat_weights.clone()
    live = params if params[0].dtype == torch.float32 else [p.detach().float() for p in params]
    avg = [p.detach().float().clone() for p in params]

    def foreach() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(avg, live, 1 - SMOOTHING)

    return [
        Row(FLAT, torch.float32, lambda: flat_avg.lerp_(flat_weights, 1 - SMOOTHING), None, peer=False),
        Row(FOREACH, torch.float32, foreach, None, peer=False),
    ]


def not_installed(package: str) -> Unavailable:
    return Unavailable(f"{package} is not installed (`make bench-peers` installs it)")


def implementations(model: nn.Module, s: float) -> list[tuple[str, Callable[[], Row]]]:
    """(name, builder) of every row other than the floors; a builder makes its average from `model`'s weights now."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    low = next(model.parameters()).dtype != torch.float32
    dtype_of = lambda module: next(module.parameters()).dtype  # noqa: E731
    rows = []

    def hf_ema() -> Row:
        ema_model = copy.deepcopy(model).float() if low else copy.deepcopy(model)
        update = lambda: compute_ema(model, ema_model, s)  # noqa: E731
        return Row(HF_EMA, torch.float32, update, lambda: by_name(ema_model, names), peer=False)

    rows.append((HF_EMA, hf_ema))

    def timm_v3(name: str, dtype: torch.dtype | None) -> Callable[[], Row]:
        def build() -> Row:
            ema = timm_model_ema().ModelEmaV3(model, decay=s, exclude_buffers=True, dtype=dtype)
            return Row(name, dtype_of(ema.module), lambda: ema.update(model), lambda: by_name(ema.module, names))

        return build

    name = "timm `ModelEmaV3`" + (" (stochastic rounding)" if low else "")
    rows.append((name, timm_v3(name, None)))
    if low:
        name = "timm `ModelEmaV3` (`dtype=float32`)"
        rows.append((name, timm_v3(name, torch.float32)))

    def timm_v2() -> Row:
        if has_tied_tensors(model):
            raise Unavailable(
                "it walks state_dict(), which lists a tied tensor under both names: averaged twice a call"
            )
        ema = timm_model_ema().ModelEmaV2(model, decay=s)
        return Row(
            "timm `ModelEmaV2`", dtype_of(ema.module), lambda: ema.update(model), lambda: by_name(ema.module, names)
        )

    rows.append(("timm `ModelEmaV2`", timm_v2))

    def ema_pytorch(name: str, float32: bool) -> Callable[[], Row]:
        def build() -> Row:
            try:
                from ema_pytorch import EMA
            except ImportError:
                raise not_installed("ema-pytorch") from None
            extra = {"ema_model": copy.deepcopy(model).float(), "coerce_dtype": True} if float32 else {}
            ema = EMA(model, beta=s, update_after_step=0, update_every=1, min_value=s, use_foreach=True, **extra)
            ema.update()  # the first call only copies the weights into the average
            return Row(name, dtype_of(ema.ema_model), ema.update, lambda: by_name(ema.ema_model, names))

        return build

    name = "ema-pytorch `EMA` (`use_foreach=True`)"
    rows.append((name, ema_pytorch(name, False)))
    if low:
        name = "ema-pytorch `EMA` (`use_foreach=True`, float32 `ema_model`, `coerce_dtype=True`)"
        rows.append((name, ema_pytorch(name, True)))

    def diffusers(name: str, foreach: bool, float32: bool) -> Callable[[], Row]:
        def build() -> Row:
            try:
                from diffusers.training_utils import EMAModel
            except ImportError:
                raise not_installed("diffusers") from None
            ema = EMAModel(model.parameters(), decay=s, min_decay=s, foreach=foreach)
            if float32:
                ema.to(dtype=torch.float32)
            ema.step(model.parameters())  # its step 1 has decay 0: a copy of the weights
            return Row(
                name, ema.shadow_params[0].dtype, lambda: ema.step(model.parameters()), lambda: ema.shadow_params
            )

        return build

    for foreach in (True, False):
        name = f"diffusers `EMAModel` (`foreach={foreach}`)"
        rows.append((name, diffusers(name, foreach, False)))
        if low:
            name = f"diffusers `EMAModel` (`foreach={foreach}`, `.to(dtype=float32)`)"
            rows.append((name, diffusers(name, foreach, True)))

    def torch_ema(name: str, float32: bool) -> Callable[[], Row]:
        def build() -> Row:
            try:
                from torch_ema import ExponentialMovingAverage
            except ImportError:
                raise not_installed("torch-ema") from None
            ema = ExponentialMovingAverage(model.parameters(), decay=s, use_num_updates=False)
            if float32:
                ema.to(dtype=torch.float32)
            return Row(name, ema.shadow_params[0].dtype, ema.update, lambda: ema.shadow_params)

        return build

    name = "torch-ema `ExponentialMovingAverage`"
    rows.append((name, torch_ema(name, False)))
    if low:
        name = "torch-ema `ExponentialMovingAverage` (`.to(dtype=float32)`)"
        rows.append((name, torch_ema(name, True)))

    def averaged_model(name: str, float32: bool) -> Callable[[], Row]:
        def build() -> Row:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s))
            if float32:
                averaged.float()
            averaged.update_parameters(model)  # the first call copies the weights
            return Row(
                name, dtype_of(averaged.module), lambda: averaged.update_parameters(model),
                lambda: by_name(averaged.module, names),
            )  # fmt: skip

        return build

    name = "torch `AveragedModel` + `get_ema_multi_avg_fn`"
    rows.append((name, averaged_model(name, False)))
    if low:
        name = "torch `AveragedModel` + `get_ema_multi_avg_fn` (`.float()`)"
        rows.append((name, averaged_model(name, True)))
    return rows


def check(model: nn.Module, build: Callable[[], Row], start: list[torch.Tensor], moved: list[torch.Tensor]) -> None:
    """Builds a row at weights `start`, updates it once towards `moved`, and compares with the float64 reference."""
    params = trainable(model)
    with torch.no_grad():
        torch._foreach_copy_(params, start)
    row = build()
    with torch.no_grad():
        torch._foreach_copy_(params, moved)
    row.update()  # as users call it: each implementation sets no_grad itself
    eps = torch.finfo(row.average_dtype).eps
    worst = 0.0
    for avg, a, b in zip(row.average(), start, moved, strict=True):
        a, b = a.double(), b.double()
        reference = CHECK_SMOOTHING * a + (1 - CHECK_SMOOTHING) * b
        tolerance = 4 * eps * (a.abs() + b.abs()) + 1e-30
        worst = max(worst, ((avg.double() - reference).abs() / tolerance).max().item())
    if worst > 1:
        raise Unavailable(f"after one update its average is {worst:.0f}x the tolerance away from the reference")


def timed(rows: list[Row], rounds: int) -> dict[str, float]:
    """Median milliseconds of one `update()` per row; each round runs every row once, starting one further along."""
    for row in rows:
        row.update()
    samples: dict[str, list[float]] = {row.name: [] for row in rows}
    for i in range(rounds):
        k = i % len(rows)
        for row in rows[k:] + rows[:k]:
            start = time.perf_counter()
            row.update()
            samples[row.name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(model_name: str, dtype: torch.dtype, rounds: int) -> tuple[list[str], list[str], str]:
    """Checks, times and tabulates every row for one model and weight dtype.

    Returns the table rows, the summary lines (the fastest peer, what was left out and why) and the model's size.
    """
    model = build_model(model_name, dtype)
    params = trainable(model)
    numel = sum(p.numel() for p in params)
    weights = "float32" if dtype == torch.float32 else "bf16"
    start = [p.detach().clone() for p in params]
    noise = torch.Generator().manual_seed(1)
    moved = [(a.float() + 0.5 * torch.randn(a.shape, generator=noise)).to(dtype) for a in start]
    # Checked one at a time at CHECK_SMOOTHING, then built afresh at SMOOTHING for timing (the peers take it when built).
    passed, left_out = set(), []
    for name, build in implementations(model, CHECK_SMOOTHING):
        try:
            check(model, build, start, moved)
            passed.add(name)
        except Unavailable as reason:
            left_out.append(f"{weights} weights: left out {name}: {reason}")
        except Exception as error:  # a peer that cannot take these settings, e.g. a dtype it does not support
            left_out.append(f"{weights} weights: left out {name}: it fails with {error!r}")
    for line in left_out:
        print(f"{model_name}, {line}", file=sys.stderr, flush=True)
    with torch.no_grad():
        torch._foreach_copy_(params, start)
    rows = floors(model) + [build() for name, build in implementations(model, SMOOTHING) if name in passed]
    with torch.no_grad():
        torch._foreach_copy_(params, moved)  # the averages now have somewhere to move
    times = timed(rows, rounds)
    flat, foreach = times[FLAT], times[FOREACH]
    table = [
        f"| {weights} | {r.name} | {str(r.average_dtype).removeprefix('torch.')} | {times[r.name]:.2f} | "
        f"{times[r.name] / flat:.2f} | {times[r.name] / foreach:.2f} |"
        for r in rows
    ]
    peers = [r for r in rows if r.peer]
    ours = times[HF_EMA]
    summary = f"{weights} weights: "
    if peers:
        best = min(peers, key=lambda r: times[r.name])
        summary += f"fastest peer {best.name} at {times[best.name]:.2f} ms; hf-ema {ours / times[best.name]:.2f}x that"
        best32 = min((r for r in peers if r.average_dtype == torch.float32), key=lambda r: times[r.name])
        if best32 is not best:
            summary += (
                f"; fastest peer with a float32 average {best32.name} at {times[best32.name]:.2f} ms, "
                f"hf-ema {ours / times[best32.name]:.2f}x that"
            )
    else:
        summary += "no peer ran"
    description = f"{numel / 1e6:.2f}M trainable parameters in {len(params)} tensors"
    return table, [summary + ".", *left_out], description


def versions() -> str:
    found = []
    for package in ["torch", *PEERS]:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), help="default: all (with --quick: all but bert-base)"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per model (default: 15, and 7 on bert-base)")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds and the two small models: a smoke run, not a measurement"
    )
    parser.add_argument("--write", action="store_true", help="append the tables to docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    models = args.models or [
        m for m in MODELS if not (args.quick and m == "bert-base")
    ]  # bert-base: minutes to set up
    options = " ".join(
        [f"--models {' '.join(models)}"] * (models != list(MODELS))
        + [f"--rounds {args.rounds}"] * (args.rounds is not None)
        + ["--quick"] * args.quick
    )
    text = (
        f"### hf-ema against the peers' EMA libraries, cpu ({os.cpu_count()} cores, {platform.platform()}), "
        f"{datetime.date.today().isoformat()}\n\n"
        f"Command: `python benchmarks/bench_peers.py{' ' * bool(options)}{options}` (interleaved rounds, medians; "
        f"smoothing {SMOOTHING}; {versions()})\n"
    )
    for model_name in models:
        rounds = 3 if args.quick else args.rounds or MODELS[model_name]
        lines, summaries = [], []
        for dtype in (torch.float32, torch.bfloat16):
            table, summary, description = run(model_name, dtype, rounds)
            lines += table
            summaries += summary
        text += (
            f"\n#### {model_name}: {description}, {rounds} rounds\n\n"
            "| weights | implementation | average dtype | ms / update | x flat floor | x foreach floor |\n"
            "| --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(lines)
            + "\n\n"
            + "".join(f"- {line}\n" for line in summaries)
        )
        print(f"{model_name} done", file=sys.stderr, flush=True)
    publish(text, args.write)


if __name__ == "__main__":
    main()
