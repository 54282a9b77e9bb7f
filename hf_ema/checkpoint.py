"""The EMA sidecar of a checkpoint: file name, format version, atomic save, checked load.

A checkpoint written with EMA holds `ema_state.safetensors` beside the model files. Its tensors are
`ema/<name>` (the averages, in full shadow precision) and, when the model files hold the EMA weights,
`training/<name>` (the training weights they cannot give back). Its safetensors metadata key `hf_ema` is a JSON
document with the format version, the counters, the settings and a fingerprint of the tracked tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SIDECAR_NAME = "ema_state.safetensors"
FORMAT_VERSION = 1
_METADATA_KEY = "hf_ema"


class EMAStateError(ValueError):
    """A checkpoint's EMA state is missing, unreadable, or does not belong to this model."""


@dataclass
class Sidecar:
    """What a checkpoint's EMA sidecar holds."""

    meta: dict
    ema: dict[str, torch.Tensor]
    training: dict[str, torch.Tensor] | None


def sidecar_path(checkpoint_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint_dir), SIDECAR_NAME)


def save_sidecar(
    checkpoint_dir: str | os.PathLike,
    meta: Mapping,
    ema: Mapping[str, torch.Tensor],
    training: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Writes the sidecar atomically: a temporary file in the same folder, fsync, rename, fsync of the folder.

    A crash at any point leaves either no sidecar or the previous complete one, never a half-written file.
    """
    directory = os.fspath(checkpoint_dir)
    os.makedirs(directory, exist_ok=True)
    tensors = {f"ema/{n}": t.detach().to("cpu").contiguous() for n, t in ema.items()}
    if training is not None:
        tensors.update({f"training/{n}": t.detach().to("cpu").contiguous() for n, t in training.items()})
    metadata = {_METADATA_KEY: json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True)}
    fd, temp = tempfile.mkstemp(prefix=".ema_state.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        final = sidecar_path(directory)
        os.replace(temp, final)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a folder
        pass
    return final


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
            ema, training = {}, {}
            for key in handle.keys():
                kind, _, name = key.partition("/")
                (ema if kind == "ema" else training)[name] = handle.get_tensor(key)
    except EMAStateError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise EMAStateError(
            f"{path} is corrupt or truncated and cannot be read ({type(error).__name__}: {error})."
        ) from error
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EMAStateError(
            f"{path} has EMA state format version {version!r}, but this hf-ema reads versions up to "
            f"{FORMAT_VERSION}. Upgrade hf-ema to resume from it."
        )
    return Sidecar(meta=meta, ema=ema, training=training if training else None)


def check_fingerprint(path: str, expected: Mapping[str, list], found: Mapping[str, list]) -> None:
    """Raises `EMAStateError` naming the first differences when a sidecar belongs to another model."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    changed = [
        f"{n}: {found[n]} in file, {expected[n]} in model" for n in expected if n in found and found[n] != expected[n]
    ]
    if not (missing or extra or changed):
        return
    parts = []
    if missing:
        parts.append(f"missing from the file: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        parts.append(f"not in the model: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    if changed:
        parts.append(f"shape or dtype differs: {'; '.join(changed[:5])}" + (" ..." if len(changed) > 5 else ""))
    raise EMAStateError(f"{path} holds the EMA of another model ({' | '.join(parts)}).")
