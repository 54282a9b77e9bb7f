"""The store: the averages of one model, keyed by (label, tensor name), updated in place and placed into the model.

How each tensor is held per rank is its layout's business (`hf_ema.layout`, chosen once per tensor); host-memory
averages are `hf_ema.offload`'s.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .core import UpdatePlan, exchange_, first_non_finite, tracked_tensors, watch
from .distributed import fsdp_modules, refresh_, reshard_
from .layout import REPLICATED, ZERO3, layout_of
from .offload import HostOffload, empty_like

SIXTEEN_BIT = (torch.float16, torch.bfloat16)

CHECK_EVERY = 16
"""Updates between two checks of the live tensors' shapes, dtypes and devices against the update plan's.
Registrations on the model (`hf_ema.core.watch`) and trainable flags are checked at every update, the tensors' names at every placement."""

_requires_grad = operator.attrgetter("requires_grad")

PACK_NUMEL = 2**14
"""Largest tensor (in elements) whose float32 average of 16-bit weights on CPU is kept in the average's packed
buffer: an update stages a batch of them and lerps the batch as one tensor, one kernel instead of one per tensor
(docs/benchmarks.md). Small, so copying the packed averages out for a checkpoint costs little."""


def _pack(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Float32 tensors shaped like `tensors`, back to back in one new buffer."""
    if not tensors:
        return {}
    buffer = torch.empty(sum(t.numel() for t in tensors.values()), dtype=torch.float32)
    views, offset = {}, 0
    for name, tensor in tensors.items():
        views[name] = buffer[offset : offset + tensor.numel()].view(tensor.shape)
        offset += tensor.numel()
    return views


def shadow_dtype(dtype: torch.dtype, policy: str) -> torch.dtype:
    """The dtype of the average of a tensor of `dtype` under `ema_dtype` policy `policy`."""
    if policy == "same":
        return dtype
    if policy == "float32":
        return torch.float32
    return torch.float32 if dtype in SIXTEEN_BIT else dtype  # "auto"


@dataclass(frozen=True)
class Origin:
    """The first part of the key of a bias-corrected average's start weights (theta_0 of BEMA, average `label`)."""

    label: str


Key = tuple[str | Origin | None, str]
"""`(label, name)` of an average's tensor, `(Origin(label), name)` of a bias-corrected average's start weights,
`(None, name)` of a training tensor: how the store hands out its state (`hf_ema.checkpoint` turns them into the keys of
EMA-state files)."""


class EMAStore:
    """The averages of one model's tensors: one or several, keyed by label, each keyed by tensor name.

    The store tracks trainable parameters and persistent floating-point buffers (see `tracked_tensors`), all averages
    starting equal to them. The model holds either the training weights or one average (`holds`, changed only by
    `place_`). While an average is in the model, tensors whose average has the model's dtype and device are exchanged
    in place with it (no extra copy; the store then holds the training values there); the others (a float32 average
    of a bf16 parameter, an average kept in host memory) have their training values stashed once, in the parameter's
    dtype, on the average's device, while the rounded average is in the model.

    With `device="cpu"` for a model on an accelerator, the averages live in host memory (pinned) and updates overlap
    with training (`hf_ema.offload.HostOffload`); every read of the store waits for the last update first.

    Args:
        module (`nn.Module`): the model whose tensors are averaged.
        ema_dtype (`str`, *optional*, defaults to `"auto"`): see `EMAArguments.ema_dtype`.
        device (`str` or `torch.device`, *optional*): where the averages live; defaults to each tensor's device.
        buffers (`str`, *optional*, defaults to `"average"`): `"average"` floating-point buffers, or `"copy"` them.
        asynchronous (`bool`, *optional*): overlap updates through staging buffers and a background thread; defaults
            to True exactly when some average lives on another device than its tensor.
        labels (`Sequence[str]`, *optional*, defaults to `("ema",)`): the averages' labels, primary first.
        corrected (`Mapping[str, Callable[[], float]]`, *optional*): the labels of bias-corrected averages (BEMA),
            each with the function that gives its correction's weight `alpha` now. The store keeps their start
            weights `theta_0` (one more copy, in the average's dtype and place) and reads them as `average + alpha *
            (w - theta_0)`, `w` the training weights: placed into the model (with the training weights stashed, never
            exchanged), copied by `copy_ema_to`. `ema_tensors` and the saved state hold the average itself.
    """

    def __init__(
        self,
        module: nn.Module,
        ema_dtype: str = "auto",
        device: str | torch.device | None = None,
        buffers: str = "average",
        asynchronous: bool | None = None,
        labels: Sequence[str] = ("ema",),
        corrected: Mapping[str, Callable[[], float]] | None = None,
    ) -> None:
        if isinstance(labels, str) or not labels or len(set(labels)) != len(labels):
            raise ValueError(f"EMAStore needs distinct labels, got {list(labels)}.")
        self.labels, self.primary = tuple(labels), labels[0]
        self.ema_dtype, self.buffers = ema_dtype, buffers
        self.device = torch.device(device) if device is not None else None
        # Found once for the trained model, so the per-update path does not search the module tree for them.
        self._source_id, self._source_fsdp = id(module), fsdp_modules(module)
        tracked = self._tracked(module)
        self.layouts = {n: layout_of(t) for n, t in tracked.items()}
        self.global_shapes = {n: self.layouts[n].global_shape(t) for n, t in tracked.items()}
        self.zero3 = any(layout is ZERO3 for layout in self.layouts.values())
        self.sharded = any(layout.sharded for layout in self.layouts.values())  # some rank holds part of a tensor
        self.flat_names = sorted(n for n, layout in self.layouts.items() if layout.flat)
        live = self._live(module, check=False)
        # Small averages that updates upcast into (16-bit weights, float32 averages, on CPU) lie back to back in one
        # buffer per average, so one lerp updates a batch of them (`UpdatePlan`'s packed batches).
        packed = [] if self.sharded or asynchronous else [n for n, t in live.items() if self._packs(t)]
        self.averages: dict[str, dict[str, Tensor]] = {}
        for label in self.labels:
            views = _pack({n: live[n] for n in packed})
            self.averages[label] = {}
            for name, tensor in live.items():
                target = self.device if self.device is not None else tensor.device
                average = views.get(name)
                if average is None:
                    average = empty_like(tensor, shadow_dtype(tensor.dtype, ema_dtype), target)
                average.copy_(tensor.detach())
                self.averages[label][name] = average
        self.corrections = dict(corrected or {})
        unknown = [label for label in self.corrections if label not in self.labels]
        if unknown:
            raise ValueError(f"EMAStore: corrected averages {unknown} are not among the labels {list(labels)}.")
        self.origins: dict[str, dict[str, Tensor]] = {}  # theta_0 of each bias-corrected average
        for label in self.corrections:
            self.origins[label] = {}
            for name, average in self.averages[label].items():
                origin = empty_like(live[name], average.dtype, average.device)
                origin.copy_(average)
                self.origins[label][name] = origin
        self._names = list(live)
        self._lists = {label: [self.averages[label][n] for n in self._names] for label in self.labels}
        offloaded = any(self.shadow[n].device != t.device for n, t in live.items())
        if asynchronous if asynchronous is not None else offloaded:
            self.offload = HostOffload([live[n] for n in self._names], self.shadow[self._names[0]].device)
        else:
            self.offload = None
        self.holds: str | None = None  # the label of the average in the model, None for the training weights
        self._stash: dict[str, Tensor] = {}
        self._bind(module)

    def _packs(self, tensor: Tensor) -> bool:
        """Whether the average of `tensor` goes into the packed buffer (see `PACK_NUMEL`)."""
        on_host = tensor.device.type == "cpu" and (self.device is None or self.device.type == "cpu")
        widened = tensor.dtype != torch.float32 and shadow_dtype(tensor.dtype, self.ema_dtype) == torch.float32
        return on_host and widened and tensor.numel() <= PACK_NUMEL

    # ---- bookkeeping ----

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The primary average, by tensor name."""
        return self.averages[self.primary]

    @property
    def ema_in_model(self) -> bool:
        return self.holds is not None

    def names(self) -> list[str]:
        return list(self._names)

    def numel(self) -> int:
        """Elements of one average on this rank."""
        return sum(t.numel() for t in self.shadow.values())

    def nbytes(self) -> int:
        """Bytes of all averages (and the start weights of bias-corrected ones) on this rank."""
        copies = len(self.labels) + len(self.origins)
        return copies * sum(t.numel() * t.element_size() for t in self.shadow.values())

    def fingerprint(self) -> dict[str, list]:
        """Names, full shapes and dtypes of the averages: what a checkpoint's EMA state must match."""
        return {n: [list(self.global_shapes[n]), str(t.dtype).removeprefix("torch.")] for n, t in self.shadow.items()}

    def _label(self, label: str | None) -> str:
        label = self.primary if label is None else label
        if label not in self.averages:
            raise KeyError(f"No average labelled {label!r}; the averages are {list(self.labels)}.")
        return label

    def _tracked(self, module: nn.Module) -> dict[str, Tensor]:
        """The averaged tensors as the model holds them (DTensors for sharded parameters)."""
        reshard_(self._source_fsdp if id(module) == self._source_id else fsdp_modules(module))
        return {n: t for n, t, kind in tracked_tensors(module, buffers=self.buffers) if kind == "average"}

    def _live(
        self, module: nn.Module, check: bool = True, tracked: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The averaged tensors as this rank holds them: local shards of sharded parameters."""
        tracked = self._tracked(module) if tracked is None else tracked
        layouts = self.layouts if check else {n: layout_of(t) for n, t in tracked.items()}
        if check and tracked.keys() != layouts.keys():
            raise RuntimeError(_mismatch_message(self.shadow, tracked))
        live = {n: layouts[n].local(t) for n, t in tracked.items()}
        if check and any(live[n].shape != s.shape for n, s in self.shadow.items()):
            raise RuntimeError(_mismatch_message(self.shadow, live))
        return live

    def _split(self, live: Mapping[str, Tensor], label: str) -> tuple[list[str], list[str]]:
        """Names whose averages (of `label`) are exchanged with the live tensors on swap: those sharing the live dtype
        and device; and the others (stashed), every name of a bias-corrected average."""
        if label in self.corrections:
            return [], list(self._names)
        same = [n for n, s in self.shadow.items() if s.dtype == live[n].dtype and s.device == live[n].device]
        chosen = set(same)
        return same, [n for n in self._names if n not in chosen]

    def close(self) -> None:
        """Finishes any background update and stops the background thread."""
        if self.offload is not None:
            self.offload.close()

    def fence(self) -> None:
        """Makes the current CUDA stream wait until the last update's weights are copied out (no host sync).

        Call before anything writes the weights (the optimizer step): offloaded updates copy on a side stream.
        """
        if self.offload is not None:
            self.offload.fence()

    def wait(self) -> None:
        """Blocks until a background update has finished (a no-op for synchronous stores)."""
        if self.offload is not None:
            self.offload.wait()

    # ---- averaging ----

    @torch.no_grad()
    def update_(self, module: nn.Module, smoothings: Mapping[str, float] | float) -> None:
        """One step of every average towards the module's current (training) weights, each with its smoothing.

        The update plan (`hf_ema.core.UpdatePlan`) is built once; an update runs its fused kernels (one read of the
        weights for every average) after constant-time checks that the model's tensors are still the ones it holds:
        the registration count and the trainable flags at every update, shapes, dtypes and devices every
        `CHECK_EVERY` updates, the names at every placement. A change the model's averages cannot follow (a tensor
        added, removed, frozen, unfrozen or reshaped) raises; one they can (a replaced tensor, a cast) rebuilds the
        plan.
        """
        self._require_training_in_model("update the averages")
        if not isinstance(smoothings, Mapping):
            smoothings = dict.fromkeys(self.labels, float(smoothings))
        values = [smoothings[label] for label in self.labels]
        current = self._current(module)
        if self.offload is not None:
            self.offload.run(current, lambda staged: self._plan.run(values))
            return
        try:
            self._plan.run(values)
        except RuntimeError as error:
            self._bind(module)  # raises the mismatch if tensors were added, removed, frozen or reshaped
            raise RuntimeError(
                "An EMA update failed: the model's tensors changed dtype or device since the last update (through "
                "`.data`, `.to()` or `.half()` during training), and part of this update may have been applied. The "
                "next update uses the new tensors. Cast or move the model before training starts."
            ) from error

    def _current(self, module: nn.Module) -> list[Tensor]:
        """The live tensors the plan reads, rebuilding it first if the model's tensors changed."""
        if self._source_fsdp and id(module) == self._source_id:
            reshard_(self._source_fsdp)
        self._since_check += 1
        if (
            id(module) != self._source_id
            or self._watch.count
            or not all(map(_requires_grad, self._trainable))
            or any(map(_requires_grad, self._frozen))
            or (self._since_check >= CHECK_EVERY and self._signature() != self._signed)
        ):
            self._bind(module)
        elif self._since_check >= CHECK_EVERY:
            self._since_check = 0
        if self._replicated:
            return self._sources
        sources = [self.layouts[n].local(t) for n, t in zip(self._names, self._bound, strict=True)]
        if any(a is not b for a, b in zip(sources, self._sources, strict=True)):
            self._bind(module)
            return self._sources
        return sources

    def _bind(self, module: nn.Module) -> None:
        """Builds the update plan over `module`'s tensors, checking they are the ones the averages were made of."""
        tracked = self._tracked(module)
        live = self._live(module, tracked=tracked)
        self._source_id, self._source_fsdp = id(module), fsdp_modules(module)
        self._watch = watch(module)
        self._bound = [tracked[n] for n in self._names]
        self._sources = [live[n] for n in self._names]
        self._replicated = all(self.layouts[n] is REPLICATED for n in self._names)
        parameters = list(module.parameters())
        self._trainable = [p for p in parameters if p.requires_grad]
        self._frozen = [p for p in parameters if not p.requires_grad]
        self._signed = self._signature()
        self._since_check = 0
        sources = self.offload.staging if self.offload is not None else self._sources
        self._plan = UpdatePlan([self._lists[label] for label in self.labels], sources, packed=True)

    def _signature(self) -> list[tuple]:
        """The live tensors' metadata, which the plan depends on."""
        return [(t.shape, t.dtype, t.device) for t in self._sources]

    # ---- placing ----

    @torch.no_grad()
    def place_(self, module: nn.Module, label: str | None) -> None:
        """Makes `module` hold the average `label` (None: the training weights), in place; the training weights are
        kept aside bit for bit while an average is in."""
        target = None if label is None else self._label(label)
        if target == self.holds:
            return
        self.wait()
        live = self._live(module)
        self._since_check = CHECK_EVERY  # the next update checks the tensors' metadata (an evaluation may cast them)
        if self.holds is not None:  # put the training weights back
            averages = self.averages[self.holds]
            same, other = self._split(live, self.holds)
            exchange_([live[n] for n in same], [averages[n] for n in same])
            for name in other:
                live[name].copy_(self._stash.pop(name))
            self._stash.clear()
            self.holds = None
        if target is not None:
            averages = self.averages[target]
            same, other = self._split(live, target)
            exchange_([live[n] for n in same], [averages[n] for n in same])
            staging = dict(zip(self._names, self.offload.staging, strict=True)) if self.offload is not None else {}
            corrected = target in self.corrections
            for name in other:
                stash = staging.get(name)
                if stash is None:
                    stash = empty_like(live[name], live[name].dtype, averages[name].device)
                stash.copy_(live[name])
                self._stash[name] = stash
                live[name].copy_(self._readout(target, name, stash) if corrected else averages[name])
            self.holds = target
        self._refresh(module)

    def discard_swap(self) -> None:
        """Forgets that an average is in the model, after the model's weights were replaced from outside (a load).

        Only a load (`load_state_`, `load_sharded_`) may follow: the average that was in holds stale training values.
        """
        self.wait()
        self._stash.clear()
        self.holds = None

    # ---- views of the weights ----

    def _readout(self, label: str, name: str, training: Tensor) -> Tensor:
        """A bias-corrected average's value of one tensor, `average + alpha * (training - theta_0)`, as a new tensor
        in the average's dtype and place (computed as TRL's BEMACallback does: difference, scale, add)."""
        average, origin = self.averages[label][name], self.origins[label][name]
        value = training.to(device=average.device, dtype=average.dtype, copy=True)
        return value.sub_(origin).mul_(self.corrections[label]()).add_(average)

    def ema_tensors(self, module: nn.Module, label: str | None = None) -> dict[str, Tensor]:
        """An average's values (the primary by default) in full precision, wherever they are now. Do not modify."""
        label = self._label(label)
        self.wait()
        averages = self.averages[label]
        if self.holds != label:
            return dict(averages)
        live = self._live(module)
        exchanged = set(self._split(live, label)[0])
        return {n: (live[n] if n in exchanged else averages[n]) for n in self._names}

    def training_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The training values in the model's dtype, wherever they are now. Do not modify."""
        self.wait()
        live = self._live(module)
        if self.holds is None:
            return live
        averages = self.averages[self.holds]
        exchanged = set(self._split(live, self.holds)[0])
        return {n: (averages[n] if n in exchanged else self._stash[n]) for n in self._names}

    def non_finite_training(self, module: nn.Module) -> str | None:
        """Name of the first training tensor with a NaN or Inf (one host sync), or None."""
        live = self.training_tensors(module)
        return first_non_finite(list(live), list(live.values()))

    def non_finite_average(self, module: nn.Module) -> str | None:
        """`label/name` of the first average tensor with a NaN or Inf (one host sync), or None."""
        names, tensors = [], []
        for label in self.labels:
            for name, tensor in self.ema_tensors(module, label).items():
                names.append(name if len(self.labels) == 1 else f"{label}/{name}")
                tensors.append(tensor)
        return first_non_finite(names, tensors)

    @torch.no_grad()
    def copy_ema_to(
        self,
        target: nn.Module,
        source: nn.Module,
        label: str | None = None,
        tensors: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Writes an average (rounded to `target`'s dtypes; a bias-corrected one as it reads) into `target`, a copy of
        `source`. `tensors`: the target's tensors to write, by the averaged names (default: those `target` tracks,
        checked against the store; given, for a target whose parameters are frozen, as a DPO reference model's)."""
        label = self._label(label)
        live = self._live(target) if tensors is None else tensors
        if label in self.corrections:
            training = self.training_tensors(source)
            for name, tensor in live.items():
                tensor.copy_(self._readout(label, name, training[name]))
            return
        ema = self.ema_tensors(source, label)
        for name, tensor in live.items():
            tensor.copy_(ema[name])

    @torch.no_grad()
    def copy_training_to(self, target: nn.Module, source: nn.Module) -> None:
        """Writes the training weights into `target`, a copy of `source`."""
        training = self.training_tensors(source)
        for name, tensor in self._live(target).items():
            tensor.copy_(training[name])

    # ---- loading ----

    @torch.no_grad()
    def load_state_(
        self,
        module: nn.Module,
        ema: Mapping[str, Mapping[str, Tensor]],
        training: Mapping[str, Tensor] | None,
        origins: Mapping[str, Mapping[str, Tensor]] | None = None,
    ) -> None:
        """Restores every average (`ema[label][name]`, full tensors), the start weights of bias-corrected ones
        (`origins[label][name]`) and the module's training weights when given, exactly.

        Shapes and dtypes must match the store (a float32 average is never loaded from a rounded copy). Sharded
        parameters take their local slice of each full tensor, so a checkpoint loads at another world size too.
        """
        tracked = self._tracked(module)

        def local(name: str, label: str | Origin | None) -> Tensor:
            if label is None:
                full = training[name]
            elif isinstance(label, Origin):
                full = origins[label.label][name]
            else:
                full = ema[label][name]
            return self.layouts[name].shard(tracked[name], full)

        self._restore_(module, local, with_training=training is not None)

    # ---- sharded checkpoints ----

    def state(self, module: nn.Module, with_training: bool) -> dict[Key, Tensor]:
        """Every average's tensors (and the training tensors, `with_training`) as this rank holds them, no copy:
        what a whole EMA state saves. Do not modify."""
        state = {}
        for label in self.labels:
            state.update({(label, n): t for n, t in self.ema_tensors(module, label).items()})
        for label, origins in self.origins.items():
            state.update({(Origin(label), n): t for n, t in origins.items()})
        if with_training:
            state.update({(None, n): t for n, t in self.training_tensors(module).items()})
        return state

    def full_state(self, module: nn.Module, with_training: bool) -> dict[Key, Tensor]:
        """`state()` with sharded tensors gathered whole (a collective every rank must call)."""
        tracked = self._tracked(module)
        return {
            key: self.layouts[key[1]].gather(tracked[key[1]], t)
            for key, t in self.state(module, with_training).items()
        }

    def sharded_state(self, module: nn.Module, with_training: bool) -> dict[Key, Tensor]:
        """`state()` as DTensors over this rank's tensors, no copy: what a sharded EMA state saves
        (torch.distributed.checkpoint). Replicated tensors stay plain."""
        tracked = self._tracked(module)
        return {
            key: self.layouts[key[1]].as_dtensor(tracked[key[1]], t)
            for key, t in self.state(module, with_training).items()
        }

    def empty_sharded_state(self, module: nn.Module, with_training: bool, saved_flat: list[str]) -> dict[Key, Tensor]:
        """Tensors for a sharded EMA state to be loaded into, newly allocated, keyed as `state()`.

        A tensor saved in the layout this run holds it in (both flat ZeRO-3 partitions, or both shaped) loads as this
        rank's shard, resharded by DCP. One saved in the other layout (FSDP2 to ZeRO-3, ZeRO-3 to one device ...)
        loads whole on every rank and is sliced by `load_sharded_`.
        """
        tracked, live = self._tracked(module), self._live(module)
        saved_flat = set(saved_flat)
        state = {}
        for name in self._names:
            layout = self.layouts[name]
            kinds = [(label, self.averages[label][name]) for label in self.labels]
            kinds += [(Origin(label), origins[name]) for label, origins in self.origins.items()]
            kinds += [(None, live[name])] if with_training else []
            for label, local in kinds:
                if layout.flat == (name in saved_flat):
                    state[label, name] = layout.as_dtensor(tracked[name], torch.zeros_like(local))
                else:
                    shape = (math.prod(self.global_shapes[name]),) if name in saved_flat else self.global_shapes[name]
                    state[label, name] = torch.zeros(shape, dtype=local.dtype, device=local.device)
        return state

    @torch.no_grad()
    def load_sharded_(self, module: nn.Module, state: Mapping[Key, Tensor], saved_flat: list[str]) -> None:
        """Restores every average (and the training weights when `state` has them) from a loaded
        `empty_sharded_state`."""
        tracked, saved_flat = self._tracked(module), set(saved_flat)

        def local(name: str, label: str | Origin | None) -> Tensor:
            loaded = state[label, name]
            layout = self.layouts[name]
            if layout.flat == (name in saved_flat):
                return layout.from_dtensor(tracked[name], loaded)
            return layout.shard(tracked[name], loaded.reshape(self.global_shapes[name]))

        self._restore_(module, local, with_training=any(label is None for label, _ in state))

    @torch.no_grad()
    def _restore_(
        self, module: nn.Module, local: Callable[[str, str | Origin | None], Tensor], with_training: bool
    ) -> None:
        """Sets each average to `local(name, label)` (this rank's tensor), each start weight of a bias-corrected
        average to `local(name, Origin(label))` and, `with_training`, each live tensor to `local(name, None)`; then the
        model holds the training weights."""
        self.wait()
        self.holds = None
        self._stash.clear()
        live = self._live(module)
        for name in self._names:
            for label in self.labels:
                self.averages[label][name].copy_(local(name, label))
            for label, origins in self.origins.items():
                origins[name].copy_(local(name, Origin(label)))
            if with_training:
                live[name].copy_(local(name, None))
        if with_training:
            self._refresh(module)

    def _refresh(self, module: nn.Module) -> None:
        if self.zero3:  # forwards read the gathered copies of small ZeRO-3 parameters: re-gather them
            refresh_(list(self._tracked(module).values()))

    def _require_training_in_model(self, action: str) -> None:
        if self.holds is not None:
            raise RuntimeError(
                f"Cannot {action} while the average {self.holds!r} is in the model; place the training weights first."
            )


def _mismatch_message(shadow: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> str:
    missing = [n for n in shadow if n not in live]
    extra = [n for n in live if n not in shadow]
    reshaped = [
        f"{n} {tuple(shadow[n].shape)} -> {tuple(live[n].shape)}"
        for n in shadow
        if n in live and shadow[n].shape != live[n].shape
    ]
    parts = []
    if missing:
        parts.append(f"no longer trainable or gone: {', '.join(missing[:5])}")
    if extra:
        parts.append(f"new or newly trainable: {', '.join(extra[:5])}")
    if reshaped:
        parts.append(f"reshaped: {', '.join(reshaped[:5])}")
    return (
        "The model's tracked tensors changed after the EMA average was created (" + "; ".join(parts) + "). An average "
        "of a different set of tensors would be silently partial. Make such changes (resize_token_embeddings, "
        "freezing or unfreezing layers) before training starts, or start a new training run so the average is rebuilt."
    )
