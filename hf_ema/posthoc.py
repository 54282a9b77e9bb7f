"""Post-hoc EMA (EDM2): choose the EMA length after training.

Karras et al. ("Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024, section 3 and
appendix C) keep two power-function averages (`sigma_rel` 0.05 and 0.10), save both at regular intervals, and after
training combine the snapshots by least squares into the average of any other `sigma_rel`. A run with
`EMAArguments(sigma_rel=[0.05, 0.10], ema_snapshot_every="1000ba")` writes the snapshots (`hf_ema.snapshots`); here

- `plan` finds the coefficients (`hf_ema.power`: every snapshot, and the requested average, is a known linear
  combination of the training weights at the updates, so the least squares are solved exactly in that discrete
  space, in float64; a tracked sigma_rel reconstructs itself to rounding);
- `synthesize` returns the synthesised average (`{name: float32 tensor}`), `export` writes it as a folder
  `from_pretrained` loads, and `python -m hf_ema.posthoc` does both from the command line.

Only torch and safetensors are needed (no transformers): snapshots are read in one process, whatever the world size
that wrote them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._version import __version__
from .files import atomic_folder
from .folders import ADAPTER_FILE, MODEL_FILE, copy_model_files, saved_weight_files
from .power import LeastSquares, PowerProfiles, expand_updates
from .rules import SIGMA_REL_MAX, gamma_of_sigma_rel, sigma_rel_of_gamma, sigma_rel_of_half_life
from .snapshots import PostHocError, Snapshot, list_snapshots, snapshot_dir
from .time import Clock, parse_time

logger = logging.getLogger(__name__)

__all__ = ["PostHocError", "Plan", "Snapshot", "export", "list_snapshots", "main", "plan", "synthesize"]

DEFAULT_TOLERANCE = 0.05
"""Default bound on the relative L2 error of the synthesised weighting of the training steps (see `plan`)."""
MIN_SNAPSHOT_TIMES = 2
BF16_AMPLIFICATION_WARNING = 3.0  # coefficients summing above this (in absolute value) amplify bf16 rounding visibly
EXPORT_INFO = "hf_ema_posthoc.json"
_CHUNK_ELEMENTS = 2**26  # tensors synthesised together: float64 accumulators of at most 512 MiB


# ---- synthesis ----


@dataclass
class Plan:
    """How one average is synthesised: which snapshot averages, with which coefficients.

    Args:
        step (`int`): the optimizer step of the average (a snapshot's step).
        sigma_rel (`float`), gamma (`float`): the requested power-function average.
        terms (`list[tuple[Snapshot, str, float]]`): `(snapshot, label, coefficient)`; coefficients sum to 1.
        residual (`float`): relative L2 error of the synthesised weighting of the updates against the requested one.
        snapshots (`list[Snapshot]`): every snapshot considered (those up to `step`).
    """

    step: int
    sigma_rel: float
    gamma: float
    terms: list[tuple[Snapshot, str, float]]
    residual: float
    snapshots: list[Snapshot] = field(repr=False, default_factory=list)

    @property
    def t(self) -> float:
        """Optimizer steps of averaging at `step`."""
        return self.snapshots[-1].t

    @property
    def amplification(self) -> float:
        """`sum(|coefficient|)`: how much the snapshots' own rounding (bfloat16 snapshots) is amplified."""
        return sum(abs(c) for _, _, c in self.terms)


def _checked_series(snapshots: list[Snapshot], folder: str) -> None:
    first = snapshots[0]
    names = {n: shape for n, (shape, _) in first.meta["fingerprint"].items()}
    for snapshot in snapshots[1:]:
        other = {n: shape for n, (shape, _) in snapshot.meta["fingerprint"].items()}
        if other != names:
            differ = sorted(set(names) ^ set(other)) or [n for n in names if names[n] != other[n]]
            raise PostHocError(
                f"The snapshots in {folder} come from different models: {os.path.basename(first.path)} and "
                f"{os.path.basename(snapshot.path)} hold different tensors ({', '.join(differ[:3])}"
                f"{' ...' if len(differ) > 3 else ''}). Keep one model's snapshots in the folder (train each model "
                "into its own output_dir)."
            )
        if snapshot.meta["run"] != first.meta["run"] or snapshot.meta["start_step"] != first.meta["start_step"]:
            raise PostHocError(
                f"The snapshots in {folder} come from different training runs ({os.path.basename(first.path)}: run "
                f"{first.meta['run']}, {os.path.basename(snapshot.path)}: run {snapshot.meta['run']}). Keep one "
                "run's series in the folder."
            )


def _target_gamma(sigma_rel: float | None, half_life: str | float | None, snapshot: Snapshot) -> float:
    if (sigma_rel is None) == (half_life is None):
        raise ValueError("Give exactly one of `sigma_rel` (e.g. 0.07) and `half_life` (e.g. '500ba').")
    if half_life is not None:
        sigma_rel = sigma_rel_of_half_life(_half_life_steps(half_life, snapshot), snapshot.t)
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"`sigma_rel` must be a number, got {sigma_rel!r}. Use e.g. sigma_rel=0.07.")
    return gamma_of_sigma_rel(sigma_rel)


def _half_life_steps(half_life: str | float, snapshot: Snapshot) -> float:
    """A half-life in optimizer steps at the snapshot's step: numbers are steps, time strings are converted with the
    snapshot's clock (the average rate of each unit up to then)."""
    if isinstance(half_life, (int, float)) and not isinstance(half_life, bool):
        return float(half_life)
    parsed = parse_time(half_life, "half_life")
    if parsed.unit == "ba":
        return parsed.value
    clock = Clock.from_dict(snapshot.meta["clock"])
    if clock[parsed.unit] <= 0:
        raise ValueError(
            f"`half_life` {half_life!r} is in '{parsed.unit}', which the run did not count (0 at step "
            f"{snapshot.step}). Give it in 'ba' (optimizer steps)."
        )
    return parsed.value * clock.ba / clock[parsed.unit]


def plan(
    output_dir: str | os.PathLike,
    sigma_rel: float | None = None,
    step: int | None = None,
    *,
    half_life: str | float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Plan:
    """Solves which combination of snapshots gives the requested average, without reading any tensor.

    Args:
        output_dir (`str`): the Trainer's `output_dir` (or its `ema_snapshots` folder).
        sigma_rel (`float`, *optional*): the relative width of the power-function average to synthesise.
        step (`int`, *optional*): the step of the average, one of the snapshots' steps; defaults to the last one.
        half_life (`str` or `float`, *optional*): instead of `sigma_rel`, the half-life of the exponential average
            to match at `step` (`"500ba"`, or a number of optimizer steps; other units use the run's clock), see
            `hf_ema.rules.sigma_rel_of_half_life`.
        tolerance (`float`, *optional*, defaults to 0.05): the largest relative L2 error accepted between the
            synthesised weighting of the training steps and the requested one.

    Raises:
        PostHocError: no snapshots, `step` not a snapshot's, fewer than two snapshots up to `step`, snapshots of
            different models or runs, or a request the snapshots cannot give within `tolerance` (the message gives
            the range of sigma_rel they can).
    """
    folder = snapshot_dir(output_dir)
    snapshots = list_snapshots(folder)
    if not snapshots:
        raise PostHocError(
            f"No EMA snapshots in {folder}. Train with EMAArguments(sigma_rel=[0.05, 0.10], "
            "ema_snapshot_every='1000ba') to write them, and pass that run's output_dir."
        )
    steps = [snapshot.step for snapshot in snapshots]
    step = steps[-1] if step is None else step
    if step not in steps:
        shown = ", ".join(map(str, steps if len(steps) <= 8 else [*steps[:3], "...", *steps[-3:]]))
        raise PostHocError(
            f"There is no snapshot at step {step} in {folder}; averages are synthesised at a snapshot's step "
            f"({shown}). Pass one of those, or step=None for the last."
        )
    snapshots = [snapshot for snapshot in snapshots if snapshot.step <= step]
    _checked_series(snapshots, folder)
    if len(snapshots) < MIN_SNAPSHOT_TIMES:
        raise PostHocError(
            f"Only {len(snapshots)} snapshot up to step {step} in {folder}; synthesis needs at least "
            f"{MIN_SNAPSHOT_TIMES} (and works best with ten or more). Ask for a later step, or train with snapshots "
            "more often (a smaller ema_snapshot_every)."
        )
    last = snapshots[-1]
    gamma = _target_gamma(sigma_rel, half_life, last)
    sigma_rel = sigma_rel_of_gamma(gamma)
    problem, columns = _least_squares(snapshots)
    coefficients, residual = problem.solve((problem.profiles.size, gamma))
    if residual > tolerance:
        low, high = _supported(problem, tolerance)
        tracked = sorted({round(sigma_rel_of_gamma(g), 4) for s in snapshots for g in s.gammas.values()})
        supported = f"about [{low:.3f}, {high:.3f}]" if low is not None else "no sigma_rel at all (too few snapshots)"
        raise PostHocError(
            f"sigma_rel {sigma_rel:.4g} at step {step} cannot be synthesised from the {len(snapshots)} snapshots in "
            f"{folder}: the best combination weighs the training steps with a relative L2 error of {residual:.3f}, "
            f"above the tolerance {tolerance:g}. At this step they support sigma_rel in {supported} (tracked: "
            f"{', '.join(map(str, tracked))}). Ask for a value in that range, pass a larger `tolerance` "
            "(--tolerance) to accept a rougher average, or track a sigma_rel closer to it in the next run."
        )
    terms = [(snapshot, label, float(c)) for (snapshot, label), c in zip(columns, coefficients.tolist(), strict=True)]
    solved = Plan(step=step, sigma_rel=sigma_rel, gamma=gamma, terms=terms, residual=residual, snapshots=snapshots)
    if last.meta.get("dtype") == "bfloat16" and solved.amplification > BF16_AMPLIFICATION_WARNING:
        logger.warning(
            "sigma_rel %.4g at step %d combines bfloat16 snapshots with coefficients summing to %.1f in absolute "
            "value: their rounding (up to 0.4%% of each weight) can grow to about %.1f%% of the weights, more than "
            "the EMA's lag behind the training weights in many runs. Prefer a sigma_rel nearer the tracked ones, or "
            "float32 snapshots (ema_snapshot_dtype='float32') in the next run.",
            sigma_rel,
            step,
            solved.amplification,
            100 * solved.amplification * 2.0**-8,
        )
    return solved


def _least_squares(snapshots: list[Snapshot]) -> tuple[LeastSquares, list[tuple[Snapshot, str]]]:
    """The least-squares problem over every average of `snapshots` (the last one's updates are the basis)."""
    last = snapshots[-1]
    updates = expand_updates(last.meta["updates"])
    profiles = PowerProfiles(updates.to(torch.float64) - float(last.meta["start_step"]))
    columns, keys = [], []
    for snapshot in snapshots:
        n = snapshot.num_updates
        known = expand_updates(snapshot.meta["updates"])
        if known.numel() != n or n > updates.numel() or not torch.equal(known, updates[:n]):
            raise PostHocError(
                f"{snapshot.path} records other update steps than {last.path}; the snapshots do not come from one "
                "run. Keep one run's series in the folder."
            )
        for label, gamma in snapshot.gammas.items():
            columns.append((n, gamma))
            keys.append((snapshot, label))
    return LeastSquares(profiles, columns), keys


def _supported(problem: LeastSquares, tolerance: float) -> tuple[float | None, float | None]:
    """The smallest and largest sigma_rel (on a grid) the snapshots give within `tolerance`."""
    n = problem.profiles.size
    grid = [0.005 * (SIGMA_REL_MAX / 0.005) ** (k / 59) for k in range(60)]
    good = [s for s in grid if problem.solve((n, gamma_of_sigma_rel(min(s, SIGMA_REL_MAX))))[1] <= tolerance]
    return (min(good), max(good)) if good else (None, None)


def synthesize(
    output_dir: str | os.PathLike,
    sigma_rel: float | None = None,
    step: int | None = None,
    *,
    half_life: str | float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The power-function average of relative width `sigma_rel` at `step`, synthesised from the snapshots.

    Every snapshot and the requested average are linear combinations of the training weights at the updates; the
    coefficients come from `plan` (least squares over those weightings, exact in float64), and the tensors are
    summed in float64, a chunk of tensors at a time, reading each snapshot (whole or sharded, at any world size) in
    this process.

    Args:
        output_dir (`str`): the Trainer's `output_dir` (or its `ema_snapshots` folder).
        sigma_rel (`float`, *optional*): the relative width, in (0, 0.2887]; or give `half_life`.
        step (`int`, *optional*): a snapshot's step; defaults to the last snapshot.
        half_life (`str` or `float`, *optional*): the half-life to match at `step` instead of `sigma_rel`.
        tolerance (`float`, *optional*, defaults to 0.05): see `plan`.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the dtype of the returned tensors.

    Returns:
        `dict[str, torch.Tensor]`: `{parameter or buffer name: tensor}`, full shapes, on the CPU, for every tensor
        the EMA tracked (trainable parameters and floating-point buffers).

    Example:

    ```python
    from hf_ema import posthoc

    weights = posthoc.synthesize("outputs/run", sigma_rel=0.07)      # the average at the last snapshot
    model.load_state_dict(weights, strict=False)                     # integer buffers, frozen weights: as trained
    weights = posthoc.synthesize("outputs/run", half_life="2000ba")  # as wide as a 2000-step half-life there
    ```
    """
    return _accumulate(plan(output_dir, sigma_rel, step, half_life=half_life, tolerance=tolerance), dtype)


def _accumulate(solved: Plan, dtype: torch.dtype) -> dict[str, Tensor]:
    terms = [(snapshot, label, c) for snapshot, label, c in solved.terms if c != 0.0]
    fingerprint = solved.snapshots[-1].meta["fingerprint"]
    chunks, chunk, size = [], [], 0
    for name, (shape, _) in fingerprint.items():
        numel = math.prod(shape)
        if chunk and size + numel > _CHUNK_ELEMENTS:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(name)
        size += numel
    if chunk:
        chunks.append(chunk)
    out = {}
    for names in chunks:
        sums = {name: torch.zeros(fingerprint[name][0], dtype=torch.float64) for name in names}
        for snapshot, label, coefficient in terms:
            for name, tensor in snapshot.read(names, label).items():
                sums[name].add_(tensor.to(torch.float64), alpha=coefficient)
        out.update({name: total.to(dtype) for name, total in sums.items()})
    return out


# ---- export ----


def find_model_dir(output_dir: str | os.PathLike) -> str:
    """The folder whose config, tokenizer and untracked weights an export copies: `output_dir` when `save_model`
    wrote into it, else its latest `checkpoint-<step>` with model files."""
    output_dir = os.fspath(output_dir)
    if saved_weight_files(output_dir)[0]:
        return output_dir
    checkpoints = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
        if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and saved_weight_files(os.path.join(output_dir, name))[0]
    )
    if not checkpoints:
        raise PostHocError(
            f"{output_dir} holds no model folder to export into (no {MODEL_FILE} or {ADAPTER_FILE} there nor in a "
            "checkpoint-*). "
            "Call trainer.save_model() after training, or pass model_dir= (--model-dir) a folder save_model wrote."
        )
    return os.path.join(output_dir, checkpoints[-1][1])


def _file_names(weights: dict[str, Tensor], adapter: str | None, keys: set[str]) -> dict[str, str]:
    """`{name in the files: tracked name}`: the model's own names, or for a PEFT adapter folder the names PEFT saves
    (`get_peft_model_state_dict` drops the adapter's name: `...lora_A.default.weight` -> `...lora_A.weight`, and a
    module of `modules_to_save` is saved under its base name: `lm_head.modules_to_save.default.weight` ->
    `lm_head.weight`, in peft 0.21; older releases keep `lm_head.modules_to_save.weight`)."""
    if adapter is None:
        return {name: name for name in weights}
    names = {}
    for name in weights:
        candidates = [name.replace(f".modules_to_save.{adapter}", ""), name.replace(f".{adapter}", "")]
        names[next((key for key in candidates if key in keys), candidates[-1])] = name
    return names


def _check_out(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, EXPORT_INFO)):
        raise PostHocError(
            f"{out} exists and holds files that are not an earlier export (no {EXPORT_INFO}); an export replaces its "
            "folder whole. Choose a new folder, or empty that one."
        )


def export(
    output_dir: str | os.PathLike,
    out: str | os.PathLike,
    sigma_rel: float | None = None,
    step: int | None = None,
    *,
    half_life: str | float | None = None,
    model_dir: str | os.PathLike | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    adapter_name: str = "default",
) -> str:
    """Synthesises an average and writes it as a folder `from_pretrained` (or, for a PEFT adapter,
    `PeftModel.from_pretrained`) loads.

    The folder gets the files `save_model` wrote into `model_dir` (config, generation config, tokenizer, processor,
    adapter config ...; not the model card, nor training state), and its weight files (`model.safetensors`, or the
    same shards and index, or `adapter_model.safetensors`) with every tensor the EMA tracked replaced by the
    synthesised one, in the dtype the folder stored it in. The other tensors (frozen weights, integer buffers) are
    those of `model_dir`. `hf_ema_posthoc.json` records what was synthesised, from which snapshots, with which
    coefficients.

    The folder is written whole under a temporary name beside `out` and renamed into place at the end
    (`hf_ema.files`): a crash leaves the previous `out` or none, never a partial one. An earlier export in `out` is
    replaced; a folder holding anything else is refused.

    Args:
        output_dir (`str`): the Trainer's `output_dir`, holding `ema_snapshots/`.
        out (`str`): the folder to write.
        sigma_rel, step, half_life, tolerance: see `synthesize`.
        model_dir (`str`, *optional*): a folder `save_model` wrote for this model; defaults to `output_dir` when it
            holds one, else its latest checkpoint.
        adapter_name (`str`, *optional*, defaults to `"default"`): for a PEFT adapter folder, the adapter whose
            weights were averaged (its name is in the tracked names, not in the adapter file).

    Returns:
        `str`: the folder written.

    Example:

    ```python
    from transformers import AutoModelForCausalLM
    from hf_ema import posthoc

    posthoc.export("outputs/run", "outputs/run-ema-0.07", sigma_rel=0.07)
    model = AutoModelForCausalLM.from_pretrained("outputs/run-ema-0.07")
    # a LoRA run: the folder holds adapter_model.safetensors; PeftModel.from_pretrained(base, folder) loads it
    ```
    """
    solved = plan(output_dir, sigma_rel, step, half_life=half_life, tolerance=tolerance)
    model_dir = os.fspath(model_dir) if model_dir is not None else find_model_dir(output_dir)
    files, is_adapter = saved_weight_files(model_dir)
    adapter = adapter_name if is_adapter else None
    if not files:
        found = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".safetensors"))]
        raise PostHocError(
            f"{model_dir} has no {MODEL_FILE} nor {ADAPTER_FILE} (found: {', '.join(found) or 'no weight files'});"
            " an export replaces the tensors of a safetensors model or adapter folder. Save with "
            "save_safetensors=True, or pass model_dir= a folder save_model wrote."
        )
    out = os.fspath(out)
    _check_out(out)
    weights = _accumulate(solved, torch.float32)
    keys = set()
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt", device="cpu") as handle:
            keys.update(handle.keys())
    names = _file_names(weights, adapter, keys)
    remaining = set(names)
    with atomic_folder(out, "export") as temp:
        for name in files:
            path = os.path.join(model_dir, name)
            with safe_open(path, framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {"format": "pt"}
            tensors = load_file(path)
            for key in list(tensors):
                if key in remaining:
                    remaining.discard(key)
                    value = weights[names[key]]
                    if tuple(value.shape) != tuple(tensors[key].shape):
                        raise PostHocError(
                            f"{key} has shape {tuple(value.shape)} in the snapshots but {tuple(tensors[key].shape)} "
                            f"in {path}: the model folder is not of the model the snapshots were written for."
                        )
                    tensors[key] = value.to(tensors[key].dtype).contiguous()
            save_file(tensors, os.path.join(temp, name), metadata=metadata)
        if remaining:
            missing = sorted(names[key] for key in remaining)
            raise PostHocError(
                f"{len(missing)} averaged tensor(s) are not in the model files of {model_dir} "
                f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): the folder is not of the model the "
                "snapshots were written for, or names its weights differently (a PEFT adapter of another name: pass "
                "adapter_name=). Pass model_dir= a folder save_model wrote for this model."
            )
        copy_model_files(model_dir, temp)
        info = {
            "hf_ema_version": __version__,
            "sigma_rel": solved.sigma_rel,
            "gamma": solved.gamma,
            "step": solved.step,
            "t": solved.t,
            "residual": solved.residual,
            "model_dir": model_dir,
            "adapter": adapter,
            "terms": [
                {"snapshot": os.path.basename(s.path), "average": label, "coefficient": c}
                for s, label, c in solved.terms
            ],
        }
        with open(os.path.join(temp, EXPORT_INFO), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
    return out


# ---- command line ----


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_ema.posthoc",
        description="Post-hoc EMA (EDM2): synthesise power-function averages of any width from the snapshots a run "
        "wrote with EMAArguments(sigma_rel=[...], ema_snapshot_every=...), and export each as a folder "
        "from_pretrained loads.",
        epilog="Example: python -m hf_ema.posthoc outputs/run --sigma-rel 0.05 0.07 0.12 --out outputs/run-posthoc "
        "writes outputs/run-posthoc/sigma_rel-0.07/ and the others. With --list, prints the snapshots and the range of "
        "sigma_rel they support.",
    )
    parser.add_argument("output_dir", help="the Trainer's output_dir (holding ema_snapshots/), or that folder")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sigma-rel", type=float, nargs="+", metavar="S", help="relative widths in (0, 0.2887]")
    what.add_argument(
        "--half-life",
        nargs="+",
        metavar="H",
        help="half-lives to match at the step instead ('500ba', or other units converted with the run's clock)",
    )
    parser.add_argument("--out", help="where to write one folder per average (sigma_rel-<S>/, half_life-<H>/)")
    parser.add_argument("--step", type=int, help="a snapshot's step (default: the last snapshot)")
    parser.add_argument("--model-dir", help="a folder save_model wrote (default: OUTPUT_DIR or its last checkpoint)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest relative error of the synthesised weighting of the steps (default: {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--list", action="store_true", help="print the snapshots and the sigma_rel they support")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_ema.posthoc`: see `--help`."""
    parser = _parser()
    cli = parser.parse_args(argv)
    requests = [("sigma_rel", s) for s in cli.sigma_rel or []] + [("half_life", h) for h in cli.half_life or []]
    if not cli.list and not requests:
        parser.error("give --sigma-rel or --half-life (with --out), or --list")
    if requests and cli.out is None:
        parser.error("--out is required to export averages")
    try:
        if cli.list:
            _print_list(cli.output_dir, cli.step, cli.tolerance)
        for kind, value in requests:
            name = f"{kind}-{value}"
            folder = export(
                cli.output_dir,
                os.path.join(cli.out, name),
                step=cli.step,
                model_dir=cli.model_dir,
                tolerance=cli.tolerance,
                **{kind: value},
            )
            with open(os.path.join(folder, EXPORT_INFO), encoding="utf-8") as handle:
                info = json.load(handle)
            print(
                f"{kind} {value}: sigma_rel {info['sigma_rel']:.4f} (gamma {info['gamma']:.2f}) at step "
                f"{info['step']}, {len(info['terms'])} snapshot averages, weighting error {info['residual']:.2e} "
                f"-> {folder}"
            )
    except (PostHocError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _print_list(output_dir: str, step: int | None, tolerance: float) -> None:
    snapshots = list_snapshots(output_dir)
    if not snapshots:
        raise PostHocError(f"No EMA snapshots in {snapshot_dir(output_dir)}.")
    for snapshot in snapshots:
        sigmas = ", ".join(f"{label} (gamma {g:.2f})" for label, g in snapshot.gammas.items())
        print(f"{os.path.basename(snapshot.path)}: t={snapshot.t:g}, {snapshot.num_updates} updates, {sigmas}")
    step = snapshots[-1].step if step is None else step
    used = [s for s in snapshots if s.step <= step]
    if len(used) >= MIN_SNAPSHOT_TIMES:
        _checked_series(used, snapshot_dir(output_dir))
        low, high = _supported(_least_squares(used)[0], tolerance)
        if low is not None:
            print(f"at step {step}: sigma_rel in about [{low:.3f}, {high:.3f}] within tolerance {tolerance:g}")


if __name__ == "__main__":
    sys.exit(main())
