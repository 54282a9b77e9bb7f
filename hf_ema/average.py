"""Offline averaging of the checkpoints a run already saved: `python -m hf_ema.average OUTPUT_DIR --last 3 --out DIR`.

Any Trainer run's `checkpoint-<step>` folders (hf-ema or not) are averaged tensor by tensor into a folder
`from_pretrained` (or `PeftModel.from_pretrained`) loads:

- weights per checkpoint: uniform (`1 / K`), or an EMA over the checkpoints (`half_life`, see `checkpoint_weights`);
- inputs: `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`, or
  PEFT's `adapter_model.safetensors`. Where an hf-ema EMA state says the model files hold an average, the training
  weights it holds are read instead (`weights="training"`, the default) unless `weights="model-files"`;
- streaming: each output tensor is a float64 sum of one tensor per checkpoint at a time, written into its output
  shard as soon as it is done (this module writes the safetensors files itself, header first), so the memory is
  about one tensor per input plus its accumulator, never a model; integer tensors are copied from the newest
  checkpoint, never averaged;
- output: the newest checkpoint's keys, shards, index and dtypes; its config, generation config, tokenizer and
  adapter config files; a model card (`README.md`) and `hf_ema_average.json` saying what was averaged. Written into a
  temporary folder beside the output, fsynced and renamed at the end: a failure leaves no output folder.

Everything is checked before anything is written (`plan`): the checkpoints must be two or more, of one model (keys,
shapes, dtypes), with every shard present and readable. Only torch and safetensors are imported (no transformers);
tqdm (a dependency of transformers and huggingface_hub) draws a progress bar when installed.
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

from ._version import __version__
from .checkpoint import (
    SHARDED_SIDECAR_NAME,
    EMAStateError,
    differences,
    has_sidecar,
    read_meta,
    sidecar_path,
    training_key,
)
from .files import atomic_folder
from .folders import ADAPTER_FILE, INDEX_FILE, MODEL_FILE, copy_model_files
from .resume import PREFIX_CHECKPOINT_DIR
from .time import parse_time

logger = logging.getLogger(__name__)

__all__ = [
    "AverageError",
    "AveragePlan",
    "Checkpoint",
    "average_checkpoints",
    "checkpoint_weights",
    "main",
    "plan",
    "write_average",
]

WEIGHTS = ("training", "model-files")
INFO_FILE = "hf_ema_average.json"
MIN_CHECKPOINTS = 2
_CHUNK = 2**18  # elements added and written at a time (a 2 MiB float64 cast of the input, a small output piece)
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# The safetensors dtypes (headers name them; the writer needs their sizes before the data, the sums their torch dtype).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class AverageError(ValueError):
    """Checkpoints that cannot be averaged (too few, of different models, incomplete), or an output that exists."""


@dataclass
class Entry:
    """One tensor of a checkpoint's model files: the file holding it, its safetensors dtype and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A checkpoint folder as `plan` read it (headers only, no tensors).

    Args:
        path (`str`): the folder.
        step (`int`): its optimizer step (`checkpoint-<step>`, else its `trainer_state.json`).
        files (`list[str]`): its weight files (one, or the shards of its index), in order.
        entries (`dict[str, Entry]`): every tensor of the model files.
        sources (`dict[str, tuple[str, str]]`): where each tensor averaged is read, `(file path, key)`: the model
            files, or for the training weights of an hf-ema checkpoint its `ema_state.safetensors`.
        reads (`str`): `"model files"` or `"training weights from ema_state.safetensors"`, for messages and the card.
    """

    path: str
    step: int
    files: list[str]
    entries: dict[str, Entry]
    sources: dict[str, tuple[str, str]] = field(repr=False)
    metadata: dict[str, dict] = field(repr=False)
    reads: str = "model files"


@dataclass
class AveragePlan:
    """What `average_checkpoints` averages: the checkpoints (oldest first) and the weight of each (summing to 1).

    Args:
        checkpoints (`list[Checkpoint]`): by step, oldest first; the newest gives the output's layout and files.
        weights (`list[float]`): the weight of each checkpoint.
        half_life (`str`, *optional*): the half-life the weights come from; None for the uniform average.
    """

    checkpoints: list[Checkpoint]
    weights: list[float]
    half_life: str | None = None

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def method(self) -> str:
        return "uniform average" if self.half_life is None else f"EMA over the checkpoints, half-life {self.half_life}"

    def terms(self) -> list[tuple[Checkpoint, float]]:
        """`(checkpoint, weight)`, oldest first."""
        return list(zip(self.checkpoints, self.weights, strict=True))

    def describe(self) -> list[str]:
        """One line per checkpoint: folder, step, weight, which weights are read."""
        width = max(len(c.path) for c in self.checkpoints)
        return [f"{c.path:<{width}}  step {c.step:>8}  weight {w:.6f}  {c.reads}" for c, w in self.terms()]


# ---- weights ----


def checkpoint_weights(steps: Sequence[int], half_life: str | None = None) -> list[float]:
    """The weight of each checkpoint (steps in increasing order) in the average; they sum to 1.

    Uniform (`half_life=None`): `1 / K` each. With a half-life `H` (optimizer steps, `"2000ba"`): the EMA over the
    checkpoints, started at the oldest, `a_1 = w_1`, `a_i = s_i a_(i-1) + (1 - s_i) w_i` with
    `s_i = 2 ** (-(t_i - t_(i-1)) / H)` (checkpoint `i` at step `t_i`); unrolled, checkpoint `i` weighs
    `(1 - s_i) s_(i+1) ... s_K` and the oldest `s_2 ... s_K`.
    """
    if half_life is None:
        return [1.0 / len(steps)] * len(steps)
    time = parse_time(half_life, "half_life")
    if time.unit != "ba":
        raise ValueError(
            f"`half_life` must be in optimizer steps ('ba'): checkpoints are apart by steps, got {half_life!r}. "
            f"Use e.g. '2000ba'."
        )
    weights, remaining = [0.0] * len(steps), 1.0
    for i in range(len(steps) - 1, 0, -1):
        smoothing = 2.0 ** (-(steps[i] - steps[i - 1]) / time.value)
        weights[i] = remaining * (1.0 - smoothing)
        remaining *= smoothing
    weights[0] = remaining
    return weights


# ---- reading checkpoints ----


def find_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders of `output_dir`, by step (`checkpoint-8` before `checkpoint-12`)."""
    if not os.path.isdir(output_dir):
        raise AverageError(f"{output_dir} is not a folder. Pass the Trainer's output_dir, or name --checkpoints.")
    found = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    return [os.path.join(output_dir, name) for _, name in found]


def _step(folder: str) -> int:
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    if match:
        return int(match.group(1))
    state = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as handle:
            return int(json.load(handle)["global_step"])
    raise AverageError(
        f"{folder}: the step of a checkpoint comes from its name (checkpoint-<step>) or its trainer_state.json, and "
        "it has neither. Rename it checkpoint-<step>."
    )


def _model_files(folder: str) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of a checkpoint and, when sharded, its weight map; refuses a folder without safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AverageError(
                f"{index} is corrupt (no readable weight_map: {type(error).__name__}: {error}). Use another "
                "checkpoint, or save it again."
            ) from error
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise AverageError(
                f"{folder} is incomplete: its {INDEX_FILE} names {', '.join(missing)}, which is missing (every shard "
                "must be present). Use another checkpoint, or copy the shard back."
            )
        return files, weight_map
    for name in (MODEL_FILE, ADAPTER_FILE):
        if os.path.isfile(os.path.join(folder, name)):
            return [name], None
    found = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".safetensors", ".pt", ".pth")))
    raise AverageError(
        f"{folder} has no {MODEL_FILE}, {INDEX_FILE} or {ADAPTER_FILE} (found: {', '.join(found) or 'no weight files'})"
        "; only safetensors checkpoints are averaged. Save with save_safetensors=True (the default), or leave this "
        "checkpoint out."
    )


def _header(path: str) -> tuple[dict[str, Entry], dict]:
    """The tensors (dtype, shape) and metadata a safetensors file's header lists; refuses an unreadable one."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            entries = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                entries[key] = Entry(name, piece.get_dtype(), tuple(piece.get_shape()))
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise AverageError(
            f"{path} is corrupt or truncated: its safetensors header cannot be read ({type(error).__name__}: "
            f"{error}). Use another checkpoint, or save it again."
        ) from error
    unknown = sorted({e.dtype for e in entries.values()} - set(_DTYPES))
    if unknown:
        raise AverageError(f"{path} holds tensors of dtype {', '.join(unknown)}, which hf_ema.average does not read.")
    return entries, metadata


def read_checkpoint(folder: str, weights: str = "training") -> Checkpoint:
    """Reads a checkpoint's headers (and its EMA state's metadata): what `plan` checks and averages."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise AverageError(f"{folder} is not a checkpoint folder (it does not exist). Check the path.")
    step = _step(folder)
    files, weight_map = _model_files(folder)
    entries, metadata = {}, {}
    for name in files:
        path = os.path.join(folder, name)
        found, metadata[name] = _header(path)
        if weight_map is not None:
            listed = [key for key, file in weight_map.items() if file == name]
            missing = [key for key in listed if key not in found]
            if missing:
                raise AverageError(
                    f"{path} lacks tensors its {INDEX_FILE} places there ({', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''}): the checkpoint is corrupt. Use another checkpoint."
                )
            found = {key: found[key] for key in listed}
        entries.update(found)
    sources = {key: (os.path.join(folder, entry.file), key) for key, entry in entries.items()}
    checkpoint = Checkpoint(folder, step, files, entries, sources, metadata)
    if weights == "training" and has_sidecar(folder):
        _read_training_weights(checkpoint)
    return checkpoint


def _read_training_weights(checkpoint: Checkpoint) -> None:
    """Points the checkpoint's averaged tensors at the training weights of its EMA state where its model files hold
    an average (hf-ema's default): those are what the run trained."""
    folder = checkpoint.path
    try:
        meta = read_meta(folder)
    except EMAStateError as error:
        raise AverageError(f"{error} Pass --weights model-files to average the model files instead.") from error
    if meta.get("model_files", "ema") != "ema" or not meta.get("fingerprint"):
        return  # the model files hold the training weights (or averaging had not started)
    if not os.path.isfile(sidecar_path(folder)):
        raise AverageError(
            f"{folder} holds its EMA state sharded ({SHARDED_SIDECAR_NAME}/, FSDP2 or ZeRO-3), and its model files "
            "hold an average; reading training weights from a sharded state is not supported yet. Pass --weights "
            "model-files to average the model files (the EMA weights)."
        )
    path = sidecar_path(folder)
    with safe_open(path, framework="pt", device="cpu") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    names = list(meta["fingerprint"])
    missing = [n for n in names if training_key(n) not in stored]
    unknown = [n for n in names if n not in checkpoint.entries]
    if missing or unknown:
        problem = (
            f"says its model files hold EMA weights but lacks the training weights of {', '.join(missing[:3])}"
            if missing
            else f"holds training weights the model files do not name ({', '.join(unknown[:3])})"
        )
        raise AverageError(
            f"{path} {problem}; the training weights cannot be averaged. Pass --weights model-files to average the "
            "model files (the EMA weights) instead."
        )
    for name in names:
        if stored[training_key(name)] != checkpoint.entries[name].shape:
            raise AverageError(
                f"{path}: training/{name} has shape {list(stored[training_key(name)])} but the model files "
                f"hold {list(checkpoint.entries[name].shape)}; the EMA state belongs to another model. Pass --weights "
                "model-files."
            )
        checkpoint.sources[name] = (path, training_key(name))
    checkpoint.reads = f"training weights from {os.path.basename(path)} (the model files hold the EMA)"


def _check_same_model(checkpoints: list[Checkpoint]) -> None:
    newest = checkpoints[-1]
    expected = {key: [list(e.shape), e.dtype] for key, e in newest.entries.items()}
    for other in checkpoints[:-1]:
        found = {key: [list(e.shape), e.dtype] for key, e in other.entries.items()}
        found_differences = differences(
            expected, found, missing="missing there", extra="not in the newest", found_in="there",
            expected_in="in the newest",
        )  # fmt: skip
        if found_differences:
            raise AverageError(
                f"{other.path} is not a checkpoint of the model in {newest.path}, so they cannot be averaged "
                f"({found_differences}). Average checkpoints of one run (or of one model, in one dtype)."
            )


def plan(
    output_dir: str | os.PathLike | None = None,
    *,
    last: int | None = None,
    checkpoints: Sequence[str | os.PathLike] | None = None,
    half_life: str | None = None,
    weights: str = "training",
) -> AveragePlan:
    """Chooses and checks the checkpoints to average and their weights, reading only headers; see
    `average_checkpoints` for the arguments.

    Raises:
        AverageError: fewer than two checkpoints, `last` above their number, checkpoints of different models, a
            missing or unreadable file.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"`weights` must be one of {', '.join(WEIGHTS)}, got {weights!r}.")
    if last is not None and checkpoints is not None:
        raise ValueError("Pass either `last` or `checkpoints`, not both.")
    if checkpoints is not None:
        folders = []
        for name in checkpoints:
            name = os.fspath(name)
            inside = os.path.join(os.fspath(output_dir), name) if output_dir is not None else None
            folders.append(inside if inside is not None and not os.path.exists(name) else name)
    else:
        if output_dir is None:
            raise ValueError("Pass the Trainer's `output_dir` (its checkpoint-* are averaged) or name `checkpoints`.")
        folders = find_checkpoints(os.fspath(output_dir))
        if not folders:
            raise AverageError(
                f"{output_dir} holds no {PREFIX_CHECKPOINT_DIR}-<step> folders. Train with save_strategy='steps' (or "
                "'epoch'), or name the folders with --checkpoints."
            )
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or last < MIN_CHECKPOINTS:
                raise ValueError(f"`last` must be an integer of at least {MIN_CHECKPOINTS}, got {last!r}.")
            if last > len(folders):
                raise AverageError(
                    f"--last {last} asks for more checkpoints than {output_dir} holds ({len(folders)}: "
                    f"{', '.join(os.path.basename(f) for f in folders)}). Pass --last {len(folders)} or fewer."
                )
            folders = folders[-last:]
    if len(folders) < MIN_CHECKPOINTS:
        raise AverageError(
            f"Averaging needs at least {MIN_CHECKPOINTS} checkpoints, got {len(folders)} ({', '.join(folders)}). "
            "Save more checkpoints (save_steps) or name more."
        )
    real = [os.path.realpath(f) for f in folders]
    twice = sorted({f for f in folders if real.count(os.path.realpath(f)) > 1})
    if twice:
        raise AverageError(f"{', '.join(twice)} is named twice. Name each checkpoint once.")
    read = sorted((read_checkpoint(folder, weights) for folder in folders), key=lambda c: c.step)
    steps = [c.step for c in read]
    same = [c.path for c in read if steps.count(c.step) > 1]
    if same:
        raise AverageError(
            f"{', '.join(same)} are checkpoints of the same step; they come from different runs. Average the "
            "checkpoints of one run."
        )
    _check_same_model(read)
    return AveragePlan(read, checkpoint_weights(steps, half_life), half_life)


# ---- averaging and writing ----


def _read_tensor(path: str, key: str) -> torch.Tensor:
    # One open per tensor: the file's memory map is released at once, so only this tensor stays resident.
    with safe_open(path, framework="pt", device="cpu") as handle:
        return handle.get_tensor(key)


class _Sums:
    """The weighted sum of one tensor over the checkpoints at a time, in one float64 buffer reused for every tensor
    (sized for the largest), added to and written out in chunks: the memory is that buffer plus one input tensor."""

    def __init__(self, solved: AveragePlan):
        self.solved = solved
        sizes = [math.prod(e.shape) for e in solved.newest.entries.values() if _DTYPES[e.dtype].is_floating_point]
        self.buffer = torch.empty(max(sizes, default=0), dtype=torch.float64)

    def write(self, key: str, handle) -> None:
        """Writes the bytes of the averaged `key` (in the newest checkpoint's dtype) to `handle`."""
        newest = self.solved.newest
        dtype = _DTYPES[newest.entries[key].dtype]
        if not dtype.is_floating_point:  # integer buffers (counters, ids): the newest's, never averaged
            handle.write(_read_tensor(*newest.sources[key]).reshape(-1).view(torch.uint8).numpy().data)
            return
        total = self.buffer[: math.prod(newest.entries[key].shape)].zero_()
        for checkpoint, weight in self.solved.terms():
            tensor = _read_tensor(*checkpoint.sources[key]).reshape(-1)
            for chunk in range(0, len(total), _CHUNK):
                # A mixed-dtype add_ with alpha casts its input to float64 first: chunks bound that copy.
                total[chunk : chunk + _CHUNK].add_(tensor[chunk : chunk + _CHUNK], alpha=weight)
            del tensor
        for chunk in range(0, len(total), _CHUNK):
            handle.write(total[chunk : chunk + _CHUNK].to(dtype).view(torch.uint8).numpy().data)


def _write_file(path: str, entries: dict[str, Entry], metadata: dict, sums: _Sums, progress) -> None:
    """Writes a safetensors file of `entries` (in order), each averaged only when its turn comes: the header first
    (offsets known from dtypes and shapes), then each tensor's bytes."""
    header, offset = {}, 0
    for key, entry in entries.items():
        size = math.prod(entry.shape) * _DTYPES[entry.dtype].itemsize
        header[key] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # as safetensors pads: the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for key in entries:
            sums.write(key, handle)
            progress(1)
        if handle.tell() != 8 + len(encoded) + offset:
            raise AverageError(f"{path} came out {handle.tell()} bytes long, expected {8 + len(encoded) + offset}.")


def _progress_bar(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional (it comes with transformers and huggingface_hub)
            pass
        else:
            return tqdm(total=total, unit="tensor", desc="averaging")
    return None


def _model_card(solved: AveragePlan, dtypes: list[str], copied: list[str]) -> str:
    rows = "\n".join(f"| `{c.path}` | {c.step} | {c.reads} | {w:.6f} |" for c, w in solved.terms())
    integers = [k for k, e in solved.newest.entries.items() if not _DTYPES[e.dtype].is_floating_point]
    math_line = (
        "each checkpoint weighs `1 / K`"
        if solved.half_life is None
        else "`a_1 = w_1`, `a_i = s_i a_(i-1) + (1 - s_i) w_i`, `s_i = 2 ** (-(t_i - t_(i-1)) / H)` over the "
        f"checkpoints' steps `t_i`, `H` = {solved.half_life}"
    )
    return (
        "---\ntags:\n- hf-ema\n- checkpoint-averaging\n---\n\n"
        f"# Average of {len(solved.checkpoints)} checkpoints\n\n"
        f"These weights are the **{solved.method}** of the checkpoints below ({math_line}), made with "
        f"[hf-ema](https://pypi.org/project/hf-ema/) {__version__} (`python -m hf_ema.average`): summed in float64 "
        f"tensor by tensor and stored in the dtype of the inputs ({', '.join(dtypes)}).\n\n"
        "| checkpoint | step | weights averaged | weight |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Integer tensors ({len(integers)}{': ' + ', '.join(integers[:5]) if integers else ''}) are copied from the "
        f"newest checkpoint, not averaged; so are {', '.join(copied) or 'no other files'}.\n"
    )


def average_checkpoints(
    output_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    last: int | None = None,
    checkpoints: Sequence[str | os.PathLike] | None = None,
    half_life: str | None = None,
    weights: str = "training",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> AveragePlan:
    """Averages saved checkpoints into a folder `from_pretrained` (or `PeftModel.from_pretrained`) loads, streaming.

    Args:
        output_dir (`str`, *optional*): the Trainer's `output_dir`; its `checkpoint-<step>` folders are averaged (all,
            or the `last`), and `checkpoints` may be named relative to it.
        out (`str`): the folder to write; refused if it exists (unless `overwrite`).
        last (`int`, *optional*): average the last `last` checkpoints by step (at least 2).
        checkpoints (`list[str]`, *optional*): the checkpoint folders to average instead (any order: sorted by step).
        half_life (`str`, *optional*): an EMA over the checkpoints with this half-life in optimizer steps
            (`"2000ba"`; see `checkpoint_weights`) instead of the uniform average.
        weights (`str`, *optional*, defaults to `"training"`): from checkpoints whose model files hold an hf-ema
            average, read the training weights their `ema_state.safetensors` holds (`"training"`), or the model files
            (`"model-files"`, the EMA weights). Other checkpoints' model files hold the training weights either way.
        overwrite (`bool`, *optional*, defaults to `False`): replace `out` if it exists (once the average is written).
        push_to_hub (`str`, *optional*): a Hub repository id to upload the folder to (created if needed).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over the tensors (needs tqdm).

    Returns:
        `AveragePlan`: the checkpoints averaged and their weights.

    Raises:
        AverageError: see `plan`; also when `out` exists.

    Example:

    ```python
    from transformers import AutoModelForSequenceClassification
    from hf_ema.average import average_checkpoints

    average_checkpoints("outputs/run", "outputs/run-last3", last=3)
    model = AutoModelForSequenceClassification.from_pretrained("outputs/run-last3")
    ```
    """
    solved = plan(output_dir, last=last, checkpoints=checkpoints, half_life=half_life, weights=weights)
    write_average(solved, out, overwrite=overwrite, push_to_hub=push_to_hub, progress=progress)
    return solved


def write_average(
    solved: AveragePlan,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> str:
    """Writes the average `solved` describes into `out` (atomically; see `average_checkpoints`); returns the folder."""
    if out is None:
        raise ValueError("Pass `out`, the folder to write the average into.")
    out = os.path.abspath(os.fspath(out))
    if os.path.realpath(out) in {os.path.realpath(c.path) for c in solved.checkpoints}:
        raise AverageError(f"--out {out} is one of the checkpoints averaged. Write the average into another folder.")
    if os.path.exists(out) and not overwrite:
        raise AverageError(
            f"{out} exists, and an average is never written into an existing folder. Pass another --out, or "
            "--overwrite to replace it."
        )
    for line in [f"{solved.method} of {len(solved.checkpoints)} checkpoints:", *solved.describe()]:
        logger.info(line)
    with atomic_folder(out, "average") as temp:  # --overwrite: the old folder goes only once the new one is complete
        _write(solved, temp, progress)
    if push_to_hub is not None:
        _push(out, push_to_hub, solved)
    return out


def _write(solved: AveragePlan, folder: str, progress: bool) -> None:
    newest = solved.newest
    bar = _progress_bar(len(newest.entries), progress)
    sums = _Sums(solved)
    try:
        for name in newest.files:
            entries = {key: e for key, e in newest.entries.items() if e.file == name}
            update = bar.update if bar is not None else lambda n: None
            _write_file(os.path.join(folder, name), entries, newest.metadata[name], sums, update)
    finally:
        if bar is not None:
            bar.close()
    copied = copy_model_files(newest.path, folder)
    dtypes = sorted(
        {
            str(_DTYPES[e.dtype]).removeprefix("torch.")
            for e in newest.entries.values()
            if _DTYPES[e.dtype].is_floating_point
        }
    )
    info = {
        "hf_ema_version": __version__,
        "method": "uniform" if solved.half_life is None else "half_life",
        "half_life": solved.half_life,
        "accumulated_in": "float64",
        "checkpoints": [{"path": c.path, "step": c.step, "weights": c.reads, "weight": w} for c, w in solved.terms()],
        "copied_from": newest.path,
    }
    for name, text in ((INFO_FILE, json.dumps(info, indent=2)), ("README.md", _model_card(solved, dtypes, copied))):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)


def _push(folder: str, repo_id: str, solved: AveragePlan) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    steps = ", ".join(str(c.step) for c in solved.checkpoints)
    api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=f"{solved.method} of checkpoints {steps} (hf-ema)"
    )


# ---- command line ----


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_ema.average",
        description="Average the checkpoint-* folders a Trainer run saved (hf-ema or not) into a folder "
        "from_pretrained loads, streaming tensor by tensor (float64 sums; memory about one tensor per checkpoint).",
        epilog="Example: python -m hf_ema.average outputs/run --last 3 --out outputs/run-last3. From hf-ema "
        "checkpoints whose model files hold the EMA, the training weights in ema_state.safetensors are averaged "
        "(--weights model-files for the model files).",
    )
    parser.add_argument("output_dir", nargs="?", help="the Trainer's output_dir, holding checkpoint-<step> folders")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, metavar="K", help="average the last K checkpoints by step (default: all)")
    which.add_argument(
        "--checkpoints", nargs="+", metavar="DIR", help="the checkpoint folders to average (or names in OUTPUT_DIR)"
    )
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument(
        "--half-life",
        metavar="H",
        help="an EMA over the checkpoints with this half-life in steps ('2000ba') instead of the uniform average",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="training",
        help="from hf-ema checkpoints whose model files hold the EMA: the training weights of their EMA state "
        "(default) or the model files",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub repository")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_ema.average`: see `--help`."""
    cli = _parser().parse_args(argv)
    try:
        solved = plan(
            cli.output_dir, last=cli.last, checkpoints=cli.checkpoints, half_life=cli.half_life, weights=cli.weights
        )
        print(f"{solved.method} of {len(solved.checkpoints)} checkpoints (summed in float64):")
        for line in solved.describe():
            print(f"  {line}")
        out = write_average(
            solved, cli.out, overwrite=cli.overwrite, push_to_hub=cli.push_to_hub, progress=not cli.no_progress
        )
    except (ValueError, TypeError, OSError) as error:  # AverageError and EMAStateError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"-> {out}" + (f" (pushed to {cli.push_to_hub})" if cli.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
