"""Tensor math: the fused EMA update, the functional `compute_ema`, and in-place swaps; and `watch`, which tells the
update plans built here when a model's modules register new tensors.

Imports only torch. The caller passes what changed (the smoothing of this update); nothing here keeps counters. Not
pure in one respect: the first `watch` installs torch's process-wide module registration hooks (parameter, module and
buffer registrations, `torch.nn.modules.module.register_module_*_registration_hook`), which count registrations on
the watched modules only and are never removed; every other module pays one dictionary lookup per registration.
"""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "UpdatePlan",
    "compute_ema",
    "exchange_",
    "first_non_finite",
    "watch",
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


SCRATCH_NUMEL = 2**18
"""Elements a batch of 16-bit tensors is upcast into before being lerped into wider averages on CPU (1 MiB in
float32): small enough to stay in cache between the upcast and the lerps (2**17 to 2**22 measured in
docs/benchmarks.md)."""

BLOCK_NUMEL = 2**20
"""Elements per batch when several averages are updated from the same weights (4 MiB in float32): each batch of
weights is read (and, for 16-bit weights, upcast) once, then from cache by every average (2**14 to 2**20 measured in
docs/benchmarks.md)."""


class UpdatePlan:
    """One EMA step of one or several averages of the same tensors, as `torch._foreach_*` calls worked out once.

    `run` is then a fixed sequence of fused kernels with no per-tensor Python work: the tensor lists, their grouping by
    device and dtypes, the batching and the scratch views are built here. The plan holds the tensors themselves (not
    views of them), so it reads whatever they hold when it runs, including data replaced through `.data`; it must be
    rebuilt if a tensor changes shape, dtype or device (a kernel then fails with a shape or dtype error).

    Per group of tensors sharing device and dtypes:

    - same dtype: one `_foreach_lerp_` per average; with several averages on CPU, in batches of `BLOCK_NUMEL`
      elements so each batch of weights is read from memory once and from cache by the other averages;
    - 16-bit weights with wider averages on CPU: each batch of `SCRATCH_NUMEL` elements (`BLOCK_NUMEL` with several
      averages) is upcast into a scratch buffer once, then lerped into every average;
    - the same on CUDA: a fused mul and a mixed-dtype add per average (measured faster there than staging).

    Tensors larger than a batch are cut into slices, made when the plan runs (a few large tensors, so a few views).

    Averages that lie back to back in one buffer (`packed`, the store allocates small upcast ones so) are lerped as
    one flat tensor per batch: one kernel for the batch instead of one per tensor.

    Args:
        averages (`Sequence[Sequence[Tensor]]`): one list per average, each parallel to `sources`; updated in place.
        sources (`Sequence[Tensor]`): the live tensors.
        mixed (`str`, *optional*): `"upcast"` or `"mul_add"` for tensors whose average has another dtype; defaults
            to the one measured faster on their device (benchmarks compare both).
        packed (`bool`, *optional*, defaults to False): look for averages stored back to back and update them as one
            flat view of their buffer. Only for averages whose storage stays put (the store's own), since the view is
            made once.
    """

    def __init__(
        self,
        averages: Sequence[Sequence[Tensor]],
        sources: Sequence[Tensor],
        mixed: str | None = None,
        packed: bool = False,
    ) -> None:
        for average in averages:
            if len(average) != len(sources):
                raise ValueError(f"UpdatePlan got {len(average)} average tensors but {len(sources)} live tensors.")
        self.count = len(averages)
        self._batches: list[_Batch] = []
        self._scratch: dict[tuple, Tensor] = {}
        for (device, source_dtype, *average_dtypes), (group, *group_averages) in _groups(sources, *averages).items():
            if len(set(average_dtypes)) > 1:
                raise ValueError("UpdatePlan needs the averages of a tensor to share one dtype.")
            if source_dtype == average_dtypes[0]:
                # Batches only help where a batch stays in a CPU cache; on GPUs they would only add kernel launches.
                kind, limit = "lerp", (BLOCK_NUMEL if self.count > 1 and device.type == "cpu" else None)
            elif (mixed or ("mul_add" if device.type == "cuda" else "upcast")) == "mul_add":
                kind, limit = "mul_add", None
            else:
                kind, limit = "upcast", (SCRATCH_NUMEL if self.count == 1 else max(SCRATCH_NUMEL, BLOCK_NUMEL))
            self._plan_group(kind, limit, group, group_averages, packed)

    def _plan_group(
        self, kind: str, limit: int | None, sources: list[Tensor], averages: list[list[Tensor]], packed: bool
    ) -> None:
        scratch = None
        indices: Sequence[int] = range(len(sources))
        if kind == "upcast":
            total = min(sum(t.numel() for t in sources), limit)
            key = (averages[0][0].device, averages[0][0].dtype)
            scratch = self._scratch.get(key)
            if scratch is None or scratch.numel() < total:
                scratch = self._scratch[key] = torch.empty(total, dtype=key[1], device=key[0])
            if packed:
                runs, indices = _back_to_back(sources, averages, limit)
                for run in runs:
                    self._plan_packed(run, sources, averages, scratch)
        batch, used = _Batch(kind, self.count), 0
        for index in indices:
            source = sources[index]
            pair = [average[index] for average in averages]
            numel = source.numel()
            if limit is None or numel <= limit - used:
                batch.add_whole(source, pair, scratch, used)
                used += numel
                continue
            if numel <= limit:  # fits in a fresh batch
                self._batches.append(batch)
                batch, used = _Batch(kind, self.count), 0
                batch.add_whole(source, pair, scratch, 0)
                used = numel
                continue
            if not (source.is_contiguous() and all(a.is_contiguous() for a in pair)):
                batch.strided.append((source, pair))  # rare: updated alone, a temporary of this tensor only
                continue
            for start in range(0, numel, limit):
                stop = min(start + limit, numel)
                if stop - start > limit - used:
                    self._batches.append(batch)
                    batch, used = _Batch(kind, self.count), 0
                batch.add_slice(source, pair, start, stop, scratch, used)
                used += stop - start
        self._batches.append(batch)

    def _plan_packed(self, run: list[int], sources: list[Tensor], averages: list[list[Tensor]], scratch: Tensor):
        """Batches over `run`, indices of whole tensors whose averages lie back to back: each batch is staged, then
        lerped as one flat view per average."""
        start = 0
        while start < len(run):
            stop, used = start, 0
            while stop < len(run) and used + sources[run[stop]].numel() <= scratch.numel():
                used += sources[run[stop]].numel()
                stop += 1
            batch, offset = _Batch("upcast", self.count), 0
            for index in run[start:stop]:
                batch.add_whole(sources[index], [], scratch, offset)  # staged only: the lerp is one flat view
                offset += sources[index].numel()
            first = [average[run[start]] for average in averages]
            batch.flat = [torch.as_strided(a, (used,), (1,), a.storage_offset()) for a in first]
            batch.flat_staged = scratch[:used]
            self._batches.append(batch)
            start = stop

    @torch.no_grad()
    def run(self, smoothings: Sequence[float]) -> None:
        """Moves each average towards the live tensors: `average = s * average + (1 - s) * live`, with each average's
        `s` from `smoothings` (in the order the averages were given)."""
        if len(smoothings) != self.count:
            raise ValueError(f"UpdatePlan has {self.count} averages but got {len(smoothings)} smoothings.")
        for smoothing in smoothings:
            if not 0.0 <= smoothing <= 1.0:
                raise ValueError(f"`smoothing` must be in [0, 1], got {smoothing}.")
        weights = [1.0 - s for s in smoothings]
        for batch in self._batches:
            batch.run(smoothings, weights)


def _back_to_back(
    sources: list[Tensor], averages: list[list[Tensor]], limit: int
) -> tuple[list[list[int]], list[int]]:
    """Runs of indices (two or more) whose averages, in every list, are contiguous and follow one another in one
    storage, each tensor at most `limit` elements; and the other indices."""
    runs: list[list[int]] = []
    rest: list[int] = []
    current: list[int] = []

    def close() -> None:
        (runs.append(list(current)) if len(current) > 1 else rest.extend(current))
        current.clear()

    for index, source in enumerate(sources):
        pair = [average[index] for average in averages]
        if source.numel() > limit or not all(a.is_contiguous() for a in pair):
            rest.append(index)
            continue
        if current and not all(_follows(average[current[-1]], average[index]) for average in averages):
            close()
        current.append(index)
    close()
    return runs, sorted(rest)


def _follows(first: Tensor, second: Tensor) -> bool:
    """Whether `second` starts in `first`'s storage right where `first` ends."""
    return (
        second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and second.dtype == first.dtype
        and second.storage_offset() == first.storage_offset() + first.numel()
    )


class _Batch:
    """Tensors updated together by one fused kernel per average (see `UpdatePlan`)."""

    def __init__(self, kind: str, count: int) -> None:
        self.kind = kind
        self.sources: list[Tensor] = []
        self.averages: list[list[Tensor]] = [[] for _ in range(count)]
        self.staged: list[Tensor] = []  # views of the scratch buffer, one per whole source ("upcast")
        self.cut_staged: list[Tensor] = []  # and one per slice
        self.cuts: list[tuple[Tensor, list[Tensor], int, int]] = []  # slices of large tensors, made at run time
        self.strided: list[tuple[Tensor, list[Tensor]]] = []
        self.flat: list[Tensor] = []  # packed averages: one flat view per average, lerped from `flat_staged`
        self.flat_staged: Tensor | None = None

    def add_whole(self, source: Tensor, pair: list[Tensor], scratch: Tensor | None, offset: int) -> None:
        """Adds a whole tensor with its averages (`pair`, one per average; empty in packed batches)."""
        self.sources.append(source)
        if pair:
            for slot, average in zip(self.averages, pair, strict=True):
                slot.append(average)
        if scratch is not None:
            self.staged.append(scratch[offset : offset + source.numel()].view(source.shape))

    def add_slice(
        self, source: Tensor, pair: list[Tensor], start: int, stop: int, scratch: Tensor | None, offset: int
    ) -> None:
        self.cuts.append((source, pair, start, stop))
        if scratch is not None:
            self.cut_staged.append(scratch[offset : offset + stop - start])

    def run(self, smoothings: list[float], weights: list[float]) -> None:
        sources, averages, staged = self.sources, self.averages, self.staged
        if self.cuts:
            staged = staged + self.cut_staged
            sources = sources + [s.view(-1)[a:b] for s, _, a, b in self.cuts]
            averages = [
                slot + [pair[i].view(-1)[a:b] for _, pair, a, b in self.cuts] for i, slot in enumerate(averages)
            ]
        if sources:
            if self.kind == "upcast":
                torch._foreach_copy_(staged, sources)
                sources = staged
            if self.flat:
                for flat, weight in zip(self.flat, weights, strict=True):
                    flat.lerp_(self.flat_staged, weight)
            else:
                for slot, smoothing, weight in zip(averages, smoothings, weights, strict=True):
                    if self.kind == "mul_add":
                        torch._foreach_mul_(slot, smoothing)
                        torch._foreach_add_(slot, sources, alpha=weight)
                    else:
                        torch._foreach_lerp_(slot, sources, weight)
        for source, pair in self.strided:
            for average, weight in zip(pair, weights, strict=True):
                average.lerp_(source.to(average.dtype), weight)


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

    The pairing is worked out on the first call for a (model, ema_model) pair and kept while both live, so later calls
    are the fused kernels plus a check of each parameter's `requires_grad`. It is worked out again when either model
    gains, loses or replaces a parameter, buffer or submodule, when a parameter is frozen or unfrozen, and when a
    tensor changes shape, dtype or device.

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
    pairings = _PAIRINGS.setdefault(model, {})
    pairing = pairings.get(id(ema_model))
    if pairing is None or not pairing.valid(ema_model):
        for key in [k for k, p in pairings.items() if p.ema_model() is None]:
            del pairings[key]  # pairings with collected ema_models
        pairing = pairings[id(ema_model)] = _Pairing(model, ema_model)
    try:
        pairing.run(float(smoothing))
    except RuntimeError:
        # A tensor changed shape, dtype or device without being registered again (through `.data`): pair afresh,
        # which raises the mismatch if the two models no longer agree, then update.
        pairing = pairings[id(ema_model)] = _Pairing(model, ema_model)
        pairing.run(float(smoothing))


_PAIRINGS: weakref.WeakKeyDictionary[nn.Module, dict[int, _Pairing]] = weakref.WeakKeyDictionary()
"""`compute_ema`'s pairings, per model and ema_model, kept while both live."""


class _Pairing:
    """What `compute_ema(model, ema_model)` updates, paired by name once: an `UpdatePlan` and the buffers it copies.

    It holds while no module of either model registered a tensor or submodule (`watch`) and the trainable flags of
    `model`'s parameters are as they were; both are checked on every call, in constant work per parameter.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module) -> None:
        targets = dict(ema_model.named_parameters())
        targets.update(ema_model.named_buffers())
        shadow, current, self.copy_to, self.copy_from = [], [], [], []
        self.watch = watch(model, ema_model)
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
                self.copy_to.append(target)
                self.copy_from.append(tensor)
            else:
                shadow.append(target)
                current.append(tensor)
        self.plan = UpdatePlan([shadow], current)
        self.parameters = list(model.parameters())
        self.flags = _trainable_flags(self.parameters)
        self.ema_model = weakref.ref(ema_model)

    def valid(self, ema_model: nn.Module) -> bool:
        return (
            self.ema_model() is ema_model and self.watch.count == 0 and _trainable_flags(self.parameters) == self.flags
        )

    def run(self, smoothing: float) -> None:
        if self.copy_to:
            torch._foreach_copy_(self.copy_to, self.copy_from)
        self.plan.run([smoothing])


def _trainable_flags(parameters: list[Tensor]) -> list[bool]:
    return list(map(_requires_grad, parameters))


_requires_grad = operator.attrgetter("requires_grad")


class Watch:
    """Counts registrations (parameters, buffers, submodules) on the modules of the trees given to `watch`.

    `count` moves when one of those modules gains, loses or replaces a tensor or submodule through attribute
    assignment or `register_*` (torch's global registration hooks). While it stays the same, lists of the trees'
    tensors built before are still theirs. Registrations elsewhere in the process (another model, a peer library's
    counters) are not counted, nor is re-registering a non-persistent buffer (rotary caches do it every forward; no
    EMA tracks those).
    """

    def __init__(self) -> None:
        self.count = 0


def watch(*roots: nn.Module) -> Watch:
    """A `Watch` over every module of the trees `roots` now hold."""
    global _hooked
    if not _hooked:
        hooks = nn.modules.module
        hooks.register_module_parameter_registration_hook(_count)
        hooks.register_module_module_registration_hook(_count)
        hooks.register_module_buffer_registration_hook(_count_buffer)
        _hooked = True
    token = Watch()
    for root in roots:
        for module in root.modules():
            _WATCHED.setdefault(module, weakref.WeakSet()).add(token)
    return token


_WATCHED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Watch]] = weakref.WeakKeyDictionary()
_hooked = False


def _count(module: nn.Module, name: str, value: object) -> None:
    tokens = _WATCHED.get(module)
    if tokens:
        for token in tokens:
            token.count += 1


def _count_buffer(module: nn.Module, name: str, value: object) -> None:
    if name not in module.__dict__.get("_non_persistent_buffers_set", ()):
        _count(module, name, value)
