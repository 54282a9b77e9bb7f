"""Pure tensor math: the fused EMA update, the functional `compute_ema`, and in-place swaps.

Imports only torch. The caller passes what changed (the smoothing of this update); nothing here keeps counters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "compute_ema",
    "ema_update_",
    "exchange_",
    "first_non_finite",
    "tracked_tensors",
]


def _groups(*lists: Sequence[Tensor]) -> dict[tuple, list[list[Tensor]]]:
    """Groups parallel tensor lists by (device, dtype of each list) so each group runs in one fused kernel."""
    groups: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for tensors in zip(*lists, strict=True):
        key = (tensors[0].device,) + tuple(t.dtype for t in tensors)
        for slot, tensor in zip(groups[key], tensors, strict=True):
            slot.append(tensor)
    return groups


SCRATCH_NUMEL = 2**22
"""Elements of the scratch buffer that upcasts 16-bit tensors for a wider average on CPU (16 MiB in float32): small
enough to stay in cache between the upcast and the lerp."""


@torch.no_grad()
def _lerp_upcast_(shadow: Sequence[Tensor], current: Sequence[Tensor], weight: float) -> None:
    """`shadow.lerp_(current, weight)` for a wider shadow dtype, upcasting `current` through a small scratch buffer.

    Slices of the tensors are batched until the scratch is full; each batch is one fused upcast and one fused lerp.
    """
    scratch = torch.empty(SCRATCH_NUMEL, dtype=shadow[0].dtype, device=shadow[0].device)
    targets: list[Tensor] = []
    sources: list[Tensor] = []
    staged: list[Tensor] = []  # slices of the scratch, one per source
    used = 0

    def flush() -> None:
        nonlocal used
        if targets:
            torch._foreach_copy_(staged, sources)
            torch._foreach_lerp_(targets, staged, weight)
        for batch in (targets, sources, staged):
            batch.clear()
        used = 0

    for ema, live in zip(shadow, current, strict=True):
        if not (ema.is_contiguous() and live.is_contiguous()):
            flush()
            ema.lerp_(live.to(ema.dtype), weight)  # rare (strided tensors): a temporary of this tensor only
            continue
        ema_flat, live_flat = ema.view(-1), live.view(-1)
        for start in range(0, ema_flat.numel(), SCRATCH_NUMEL):
            size = min(SCRATCH_NUMEL, ema_flat.numel() - start)
            if used + size > SCRATCH_NUMEL:
                flush()
            targets.append(ema_flat[start : start + size])
            sources.append(live_flat[start : start + size])
            staged.append(scratch[used : used + size])
            used += size
    flush()


@torch.no_grad()
def ema_update_(shadow: Sequence[Tensor], current: Sequence[Tensor], smoothing: float) -> None:
    """Moves each shadow tensor towards its live counterpart: `shadow = s * shadow + (1 - s) * current`.

    Tensors are grouped by device and dtype and updated with fused multi-tensor kernels (`torch._foreach_*`); no
    temporary the size of the model is made. The update is a lerp where dtypes match (a tensor that does not move stays
    bit-exact). A float32 shadow of a 16-bit tensor is updated with a fused mul and a mixed-dtype add on CUDA, and on
    other devices lerped towards the tensor upcast slice by slice through a 16 MiB scratch buffer (`SCRATCH_NUMEL`):
    whichever measured faster there.

    Args:
        shadow (`Sequence[Tensor]`): the averages, updated in place.
        current (`Sequence[Tensor]`): the live tensors, same shapes, same order.
        smoothing (`float`): `s` in [0, 1]; 1 leaves the shadow unchanged, 0 copies `current`.
    """
    if len(shadow) != len(current):
        raise ValueError(f"ema_update_ got {len(shadow)} shadow tensors but {len(current)} current tensors.")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1], got {smoothing}.")
    weight = 1.0 - smoothing
    for (_device, shadow_dtype, current_dtype), (ema, live) in _groups(shadow, current).items():
        if shadow_dtype == current_dtype:
            torch._foreach_lerp_(ema, live, weight)
        elif _device.type == "cuda":
            # Measured on an H100 (docs/benchmarks.md): a fused mul then a mixed-dtype add beats the scratch upcast,
            # whose many small kernels cost more than the L2 traffic they save.
            torch._foreach_mul_(ema, smoothing)
            torch._foreach_add_(ema, live, alpha=weight)
        else:
            _lerp_upcast_(ema, live, weight)  # 2x faster than mul + add on CPU (docs/benchmarks.md)


@torch.no_grad()
def exchange_(first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
    """Exchanges the contents of two tensor lists in place, keeping every tensor's storage.

    Storage is kept because optimizers, DDP buckets and flat-parameter backends may hold views of it. The extra memory
    is the largest single tensor, never a copy of the model.
    """
    for a, b in zip(first, second, strict=True):
        temp = a.clone()
        a.copy_(b)
        b.copy_(temp)
        del temp


@torch.no_grad()
def first_non_finite(names: Sequence[str], tensors: Sequence[Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None. One host synchronisation in all."""
    if not tensors:
        return None
    flags = []
    for (_device, _dtype), (group,) in _groups(tensors).items():
        # The infinity norm of a tensor is finite exactly when every element is: one fused reduction per group.
        flags += [torch.isfinite(n) for n in torch._foreach_norm(group, float("inf"))]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return None
    for name, tensor in zip(names, tensors, strict=True):
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def tracked_tensors(module: nn.Module, buffers: str = "average") -> Iterator[tuple[str, Tensor, str]]:
    """Yields `(name, tensor, kind)` for every tensor an EMA of `module` deals with.

    `kind` is `"average"` for trainable parameters and persistent floating-point buffers (BatchNorm running stats) and
    `"copy"` for persistent integer buffers (`num_batches_tracked`), and for floating-point buffers too when `buffers`
    is `"copy"`. Frozen parameters are not yielded (they equal
    their average), non-persistent buffers neither (they are not saved and are recomputed by the model). Tied weights
    are yielded once, under their first name.
    """
    for name, param in module.named_parameters():
        if param.requires_grad:
            yield name, param, "average"
    for prefix, submodule in module.named_modules():
        for buffer_name, buffer in submodule._buffers.items():
            if buffer is None or buffer_name in submodule._non_persistent_buffers_set:
                continue
            name = f"{prefix}.{buffer_name}" if prefix else buffer_name
            yield name, buffer, "average" if buffer.is_floating_point() and buffers == "average" else "copy"


@torch.no_grad()
def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """Updates `ema_model` in place towards `model`: `ema = smoothing * ema + (1 - smoothing) * model`.

    The functional form of the EMA, for hand-written training loops (as Composer's `compute_ema`). Tensors are paired
    by name. Trainable parameters and floating-point buffers are averaged with fused multi-tensor kernels grouped by
    device and dtype; integer buffers are copied; frozen parameters are left alone. `ema_model` may hold a different
    floating-point dtype (a float32 copy of a bf16 model keeps small updates that a bf16 copy rounds away).

    Args:
        model (`nn.Module`): the model being trained.
        ema_model (`nn.Module`): the average, typically `copy.deepcopy(model)` made before training.
        smoothing (`float`, *optional*, defaults to 0.99): the weight kept by the old average, in [0, 1].

    Example:

    ```python
    ema_model = copy.deepcopy(model)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        compute_ema(model, ema_model, smoothing=0.999)
    ```
    """
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"`smoothing` must be a number in [0, 1], got {smoothing!r}. Use e.g. smoothing=0.999.")
    targets = dict(ema_model.named_parameters())
    targets.update(ema_model.named_buffers())
    shadow, current = [], []
    for name, tensor, kind in tracked_tensors(model):
        if name not in targets:
            raise KeyError(
                f"compute_ema: `ema_model` has no tensor named {name!r}, which `model` has. Build `ema_model` with "
                "copy.deepcopy(model) so both have the same names."
            )
        target = targets[name]
        if target.shape != tensor.shape:
            raise ValueError(
                f"compute_ema: {name!r} has shape {tuple(tensor.shape)} in `model` but {tuple(target.shape)} in "
                "`ema_model`. Rebuild `ema_model` from the current model."
            )
        if kind == "copy":
            target.copy_(tensor)
        else:
            shadow.append(target)
            current.append(tensor)
    ema_update_(shadow, current, float(smoothing))
