"""The EMA sidecar of a checkpoint: file name, format version, atomic save, checked load.

A checkpoint written with EMA holds its EMA state beside the model files, in one of two forms:

- `ema_state.safetensors` (models whose parameters are whole on every rank: one device, DDP, DeepSpeed ZeRO-1/2).
  Its tensors are `average/<label>/<name>` (every average, in full precision), `origin/<label>/<name>` (the start
  weights theta_0 of a bias-corrected average, BEMA) and, when the model files hold an average, `training/<name>` (the
  training weights they cannot give back). Its safetensors metadata key `hf_ema` is
  a JSON document with the format version, the averages' labels and rules, the counters, the settings and a
  fingerprint of the tracked tensors.
- `ema_state/` (sharded models: FSDP2, DeepSpeed ZeRO-3): a torch.distributed.checkpoint folder with the same
  tensor names, each rank writing its own shards (no gather), plus `hf_ema.json` holding the same JSON document.
  It loads at another world size too.

Format 1 (hf-ema 0.1) held one average, as `ema/<name>`; it still loads (`average_prefixes`).

This module is the one writer (`write_state`) and reader (`read_state`, `load_sharded_tensors`) of that format, for
checkpoints and for post-hoc snapshots alike, and the only place that knows its tensor keys.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_file, crash_point, finish_folder, temporary_folder, temporary_folder_path
from .store import Key, Origin

SIDECAR_NAME = "ema_state.safetensors"
SHARDED_SIDECAR_NAME = "ema_state"
FORMAT_VERSION = 2
_METADATA_KEY = "hf_ema"
_META_FILE = "hf_ema.json"


class EMAStateError(ValueError):
    """A checkpoint's EMA state is missing, unreadable, or does not belong to this model."""


@dataclass
class Sidecar:
    """What a checkpoint's EMA sidecar holds."""

    meta: dict
    tensors: dict[str, torch.Tensor]


def average_key(label: str, name: str, prefix: str | None = None) -> str:
    """The key of an average's tensor in EMA-state files: `average/<label>/<name>` (format 2), or under the
    `prefix` a file gives the average (`average_prefixes`: `ema` in format 1)."""
    return f"{prefix if prefix is not None else f'average/{label}'}/{name}"


def training_key(name: str) -> str:
    """The key of a training tensor in EMA-state files."""
    return f"training/{name}"


def origin_key(label: str, name: str) -> str:
    """The key of a bias-corrected average's start weights (theta_0) in EMA-state files."""
    return f"origin/{label}/{name}"


def file_key(key: Key, prefixes: Mapping[str, str] | None = None) -> str:
    """The file key of a store key `(label, name)` (`(None, name)`: a training tensor; `(Origin(label), name)`: a
    bias-corrected average's start weights)."""
    label, name = key
    if label is None:
        return training_key(name)
    if isinstance(label, Origin):
        return origin_key(label.label, name)
    return average_key(label, name, prefixes[label] if prefixes is not None else None)


def write_state(
    folder: str | os.PathLike,
    meta: Mapping | None,
    tensors: Mapping[Key, torch.Tensor],
    *,
    sharded: bool,
    what: str | None = None,
) -> str | None:
    """Writes EMA state (a checkpoint's sidecar or a post-hoc snapshot) into `folder`: the one writer of the format.

    `tensors` is keyed by `(label, name)`, `(None, name)` for training tensors (`EMAStore.state`). Whole tensors go
    into `ema_state.safetensors`, written by the process given `meta` (the main process); sharded ones (DTensors,
    `EMAStore.sharded_state`) into `ema_state/`, a collective every rank calls, the main process (given `meta`)
    finishing the folder. Both are atomic (`hf_ema.files`); `what` names the write for the crash tests' fault
    injection (`sidecar` or `sharded` by default). Returns the path written on the main process, else None.
    """
    keyed = {file_key(key): tensor for key, tensor in tensors.items()}
    if sharded:
        return save_sharded_sidecar(folder, meta, keyed, what or "sharded")
    return save_sidecar(folder, meta, keyed, what or "sidecar") if meta is not None else None


@dataclass
class StoredState:
    """EMA state as `read_state` found it: its path, its metadata, whether it is sharded, and (whole) its tensors."""

    path: str
    meta: dict
    sharded: bool
    tensors: dict[str, torch.Tensor] | None = None

    def whole(
        self, names: list[str], prefixes: Mapping[str, str], with_training: bool, origins: Sequence[str] = ()
    ) -> dict:
        """`{(label, name): tensor}` for each average (file prefixes by label), `{(Origin(label), name): tensor}` for
        the start weights of each bias-corrected average in `origins` and, `with_training`, each training tensor, from
        a whole sidecar; raises `EMAStateError` for what its metadata promises and it lacks."""
        wanted = [(label, n) for label in prefixes for n in names]
        wanted += [(Origin(label), n) for label in origins for n in names]
        wanted += [(None, n) for n in names] if with_training else []
        missing = [file_key(key, prefixes) for key in wanted if file_key(key, prefixes) not in self.tensors]
        if missing:
            what = (
                "says the model files hold EMA weights but has no training weights"
                if all(key.startswith("training/") for key in missing)
                else "lacks tensors its metadata promises"
            )
            raise EMAStateError(
                f"{self.path} {what} ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); it is incomplete "
                "or was edited."
            )
        return {key: self.tensors[file_key(key, prefixes)] for key in wanted}

    def load_sharded(self, folder: str, state: dict, prefixes: Mapping[str, str]) -> None:
        """Fills `state` (`{(label, name): tensor}`, `EMAStore.empty_sharded_state`) from a sharded sidecar, in
        place; a collective every rank calls."""
        keyed = {file_key(key, prefixes): tensor for key, tensor in state.items()}
        load_sharded_tensors(folder, keyed)


def read_average(stored: StoredState, label: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Whole tensors of one average (`label`) for `names`, read in this process whatever world size wrote them: from a
    whole sidecar one tensor at a time (safetensors reads lazily), from a sharded one through DCP. In the dtype the
    state records (`dtype` for snapshots, else the fingerprint's)."""
    prefix = average_prefixes(stored.meta)[label]
    folder = os.path.dirname(stored.path)
    if not stored.sharded:
        with safe_open(stored.path, framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(average_key(label, name, prefix)) for name in names}
    meta = stored.meta
    flat = set(meta.get("flat_names") or [])
    shapes = {name: meta["fingerprint"][name][0] for name in names}
    dtypes = {name: getattr(torch, meta.get("dtype") or meta["fingerprint"][name][1]) for name in names}
    state = {
        average_key(label, name, prefix): torch.empty(
            (math.prod(shapes[name]),) if name in flat else shapes[name], dtype=dtypes[name]
        )
        for name in names
    }
    load_sharded_tensors(folder, state)
    return {name: state[average_key(label, name, prefix)].reshape(shapes[name]) for name in names}


def read_state(folder: str | os.PathLike, tensors: bool = True) -> StoredState:
    """Reads the EMA state in `folder` (either form, format 1 or 2; version checked), with its tensors when whole and
    `tensors` (a sharded one is loaded into tensors laid out as this run holds them: `StoredState.load_sharded`).

    Raises:
        EMAStateError: missing, unreadable or corrupt, or written by a newer format version.
    """
    folder = os.fspath(folder)
    if os.path.isdir(sharded_sidecar_path(folder)) and not os.path.isfile(sidecar_path(folder)):
        return StoredState(sharded_sidecar_path(folder), read_sharded_meta(folder), sharded=True)
    if not tensors:
        return StoredState(sidecar_path(folder), read_meta(folder), sharded=False)
    sidecar = load_sidecar(folder)
    return StoredState(sidecar_path(folder), sidecar.meta, sharded=False, tensors=sidecar.tensors)


def sidecar_path(checkpoint_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint_dir), SIDECAR_NAME)


def sharded_sidecar_path(checkpoint_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint_dir), SHARDED_SIDECAR_NAME)


def has_sidecar(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the checkpoint holds EMA state, in either form."""
    return os.path.isfile(sidecar_path(checkpoint_dir)) or os.path.isfile(
        os.path.join(sharded_sidecar_path(checkpoint_dir), _META_FILE)
    )


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it where it is a view into a larger buffer (packed averages): safetensors refuses tensors
    that share storage."""
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.itemsize
    return tensor.contiguous() if whole else tensor.clone(memory_format=torch.contiguous_format)


def save_sidecar(
    checkpoint_dir: str | os.PathLike, meta: Mapping, tensors: Mapping[str, torch.Tensor], what: str = "sidecar"
) -> str:
    """Writes the sidecar atomically (`hf_ema.files.atomic_file`: a temporary file in the same folder, fsync, rename,
    fsync of the folder). A crash at any point leaves either no sidecar or the previous complete one, never a
    half-written file. `what` names the write for the crash tests' fault injection."""
    tensors = {key: _own(t.detach().to("cpu")) for key, t in tensors.items()}
    metadata = {_METADATA_KEY: json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True)}
    final = sidecar_path(checkpoint_dir)
    with atomic_file(final, what) as temp:
        save_file(tensors, temp, metadata=metadata)
    return final


def save_sharded_sidecar(
    checkpoint_dir: str | os.PathLike, meta: Mapping | None, state: Mapping[str, torch.Tensor], what: str = "sharded"
) -> str | None:
    """Writes the sharded sidecar with torch.distributed.checkpoint: a collective every rank calls.

    `state` maps `average/<label>/<name>` and `training/<name>` to DTensors over this rank's shards (plain tensors for
    replicated ones, which rank 0 writes). Each rank writes its own shards into a temporary folder; the main process
    (the one given `meta`) adds `hf_ema.json` and renames the folder into place (`hf_ema.files.finish_folder`). A
    crash leaves no `ema_state/` (or the previous complete one until the rename), never a partial one. Returns the
    folder on the main process.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    directory = os.fspath(checkpoint_dir)
    final = sharded_sidecar_path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    if meta is not None:
        crash_point(what, "before")
        os.makedirs(directory, exist_ok=True)
        temporary_folder(final)  # empty; one left by an earlier crash is removed
    if distributed:
        dist.barrier()
    temp = temporary_folder_path(final)  # the main process made it; every rank writes its shards into it
    with _single_process_quiet():
        dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(temp, sync_files=True), no_dist=not distributed)
    if distributed:
        dist.barrier()  # every rank's shards are in the folder
    if meta is not None:
        with open(os.path.join(temp, _META_FILE), "w", encoding="utf-8") as handle:
            json.dump({**meta, "format_version": FORMAT_VERSION}, handle, sort_keys=True)
        finish_folder(temp, final, what)
    if distributed:
        dist.barrier()  # every rank may read the sidecar after this
    return final if meta is not None else None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process: hf-ema asks for that on purpose (no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def read_sharded_meta(checkpoint_dir: str | os.PathLike) -> dict:
    """The JSON document of a sharded sidecar, checked for its format version."""
    path = os.path.join(sharded_sidecar_path(checkpoint_dir), _META_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except FileNotFoundError as error:
        raise EMAStateError(f"{path} does not exist.") from error
    except (OSError, ValueError) as error:
        raise EMAStateError(
            f"{path} is corrupt or truncated and cannot be read ({type(error).__name__}: {error})."
        ) from error
    check_version(sharded_sidecar_path(checkpoint_dir), meta)
    return meta


def load_sharded_tensors(checkpoint_dir: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Fills `state` (DTensors or plain tensors laid out as this run holds them) from a sharded sidecar, in place;
    a collective every rank calls. DCP reshards: the checkpoint may come from another world size."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = sharded_sidecar_path(checkpoint_dir)
    distributed = dist.is_available() and dist.is_initialized()
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        failures = getattr(error, "failures", None)  # DCP wraps each rank's exception, traceback and all
        cause = next(iter(failures.values())) if failures else error
        cause = cause[0] if isinstance(cause, tuple) else cause
        raise EMAStateError(
            f"{path} is corrupt, incomplete or does not hold what this model needs ({type(cause).__name__}: "
            f"{str(cause)[:300]})."
        ) from error


def load_sidecar(checkpoint_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Sidecar:
    """Reads a checkpoint's sidecar.

    Raises:
        EMAStateError: the file is missing, unreadable or corrupt, or written by a newer format version.
    """
    path = sidecar_path(checkpoint_dir)
    if not os.path.isfile(path):
        raise EMAStateError(f"{path} does not exist.")
    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if _METADATA_KEY not in metadata:
                raise EMAStateError(f"{path} has no '{_METADATA_KEY}' metadata; it was not written by hf-ema.")
            meta = json.loads(metadata[_METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except EMAStateError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise EMAStateError(
            f"{path} is corrupt or truncated and cannot be read ({type(error).__name__}: {error})."
        ) from error
    check_version(path, meta)
    return Sidecar(meta=meta, tensors=tensors)


def read_meta(checkpoint_dir: str | os.PathLike) -> dict:
    """The JSON document of a checkpoint's EMA state, either form, without reading its tensors."""
    if not os.path.isfile(sidecar_path(checkpoint_dir)):
        return read_sharded_meta(checkpoint_dir)
    path = sidecar_path(checkpoint_dir)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise EMAStateError(f"{path} has no '{_METADATA_KEY}' metadata; it was not written by hf-ema.")
        meta = json.loads(metadata[_METADATA_KEY])
    except EMAStateError:
        raise
    except Exception as error:
        raise EMAStateError(
            f"{path} is corrupt or truncated and cannot be read ({type(error).__name__}: {error})."
        ) from error
    check_version(path, meta)
    return meta


def average_prefixes(meta: Mapping) -> dict[str, str]:
    """`{label: key prefix}` of the averages an EMA state holds, primary first, for either format version."""
    if meta.get("format_version", 1) >= 2:
        return {label: f"average/{label}" for label in meta["averages"]}
    args = meta.get("ema_args") or {}  # format 1: one average, labelled as EMAArguments labels it today
    label = args.get("half_life") if args.get("half_life") is not None else str(args.get("smoothing"))
    return {str(label).strip(): "ema"}


def check_version(path: str, meta: dict) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EMAStateError(
            f"{path} has EMA state format version {version!r}, but this hf-ema reads versions up to "
            f"{FORMAT_VERSION}. Upgrade hf-ema to resume from it."
        )


def check_fingerprint(path: str, expected: Mapping[str, list], found: Mapping[str, list]) -> None:
    """Raises `EMAStateError` naming the first differences when a sidecar belongs to another model."""
    found_differences = differences(
        expected,
        found,
        missing="missing from the file",
        extra="not in the model",
        found_in="in file",
        expected_in="in model",
    )
    if found_differences:
        raise EMAStateError(f"{path} holds the EMA of another model ({found_differences}).")


def differences(
    expected: Mapping[str, object],
    found: Mapping[str, object],
    *,
    missing: str,
    extra: str,
    found_in: str,
    expected_in: str,
    most: int = 5,
) -> str:
    """The first differences between two `{name: (shape, dtype)}` descriptions of a model, for an error message
    (`'missing ...: a | not in ...: b | shape or dtype differs: c: X found_in, Y expected_in'`); empty when none."""
    absent = [n for n in expected if n not in found]
    unknown = [n for n in found if n not in expected]
    changed = [
        f"{n}: {found[n]} {found_in}, {expected[n]} {expected_in}"
        for n in expected
        if n in found and found[n] != expected[n]
    ]
    parts = [
        f"{label}: {separator.join(names[:most])}" + (" ..." if len(names) > most else "")
        for label, names, separator in (
            (missing, absent, ", "),
            (extra, unknown, ", "),
            ("shape or dtype differs", changed, "; "),
        )
        if names
    ]
    return " | ".join(parts)
