"""The shadow store: EMA tensors keyed by parameter name, updated in place and swapped in and out of a model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from .core import ema_update_, exchange_, first_non_finite, tracked_tensors
from .distributed import (
    as_dtensor,
    from_dtensor,
    fsdp_modules,
    gather_full,
    global_shape,
    is_sharded,
    is_zero3,
    local_view,
    refresh_,
    reshard_,
    shard_like,
)

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def shadow_dtype(dtype: torch.dtype, policy: str) -> torch.dtype:
    """The dtype of the average of a tensor of `dtype` under `ema_dtype` policy `policy`."""
    if policy == "same":
        return dtype
    if policy == "float32":
        return torch.float32
    return torch.float32 if dtype in SIXTEEN_BIT else dtype  # "auto"


class ShadowStore:
    """EMA tensors of one model, keyed by name (never by position).

    The store tracks trainable parameters and persistent floating-point buffers (see `tracked_tensors`). While the EMA
    weights are in the model ("swapped in"), tensors whose average has the model's dtype and device are exchanged in
    place with the average (no extra copy; the store then holds the training values); the others (a float32 average
    of a bf16 parameter, an average kept in host memory) have their training values stashed once, in the parameter's
    dtype, on the average's device, while the rounded average is in the model.

    With `device="cpu"` for a model on an accelerator, the averages live in host memory (pinned). An update then
    copies the live tensors into pinned staging buffers without blocking and does the arithmetic on a background
    thread, overlapped with the next training steps; every read of the store waits for it first.

    Args:
        module (`nn.Module`): the model whose tensors are averaged; the average starts equal to them.
        ema_dtype (`str`, *optional*, defaults to `"auto"`): see `EMAArguments.ema_dtype`.
        device (`str` or `torch.device`, *optional*): where the averages live; defaults to each tensor's device.
        buffers (`str`, *optional*, defaults to `"average"`): `"average"` floating-point buffers, or `"copy"` them
            (leave the model's current values in the EMA weights).
        asynchronous (`bool`, *optional*): overlap updates through staging buffers and a background thread; defaults
            to True exactly when some average lives on another device than its tensor.
    """

    def __init__(
        self,
        module: nn.Module,
        ema_dtype: str = "auto",
        device: str | torch.device | None = None,
        buffers: str = "average",
        asynchronous: bool | None = None,
    ) -> None:
        self.ema_dtype, self.buffers = ema_dtype, buffers
        self.device = torch.device(device) if device is not None else None
        # Found once for the trained model, so the per-update path does not search the module tree for them.
        self._source_id, self._source_fsdp = id(module), fsdp_modules(module)
        tracked = self._tracked(module)
        self.global_shapes = {n: global_shape(t) for n, t in tracked.items()}
        self.zero3 = any(is_zero3(t) for t in tracked.values())
        self.sharded = any(is_sharded(t) for t in tracked.values())  # some rank holds only part of a tensor
        # Saved flattened in sharded checkpoints (a ZeRO-3 partition is a slice of the flattened parameter).
        self.flat_names = sorted(n for n, t in tracked.items() if is_zero3(t))
        live = self._live(module, check=False)
        self.shadow: dict[str, Tensor] = {}
        for name, tensor in live.items():
            target = self.device if self.device is not None else tensor.device
            average = _empty_like(tensor, shadow_dtype(tensor.dtype, ema_dtype), target)
            average.copy_(tensor.detach())
            self.shadow[name] = average
        offloaded = any(self.shadow[n].device != t.device for n, t in live.items())
        self.asynchronous = offloaded if asynchronous is None else asynchronous
        # Staging buffers (async updates) double as the stash of training values during a swap.
        self._staging: dict[str, Tensor] = (
            {n: _empty_like(t, t.dtype, self.shadow[n].device) for n, t in live.items()} if self.asynchronous else {}
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-ema") if self.asynchronous else None
        self._pending: Future | None = None
        self._copy_done = None  # CUDA event: the staged copies of the last update have been issued on a side stream
        self._copy_stream = None
        self.ema_in_model = False
        self._stash: dict[str, Tensor] = {}

    # ---- bookkeeping ----

    def names(self) -> list[str]:
        return list(self.shadow)

    def numel(self) -> int:
        return sum(t.numel() for t in self.shadow.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def fingerprint(self) -> dict[str, list]:
        """Names, full shapes and dtypes of the averages: what a checkpoint's EMA state must match."""
        return {n: [list(self.global_shapes[n]), str(t.dtype).removeprefix("torch.")] for n, t in self.shadow.items()}

    def _tracked(self, module: nn.Module) -> dict[str, Tensor]:
        """The averaged tensors as the model holds them (DTensors for sharded parameters)."""
        reshard_(self._source_fsdp if id(module) == self._source_id else fsdp_modules(module))
        return {n: t for n, t, kind in tracked_tensors(module, buffers=self.buffers) if kind == "average"}

    def _live(self, module: nn.Module, check: bool = True) -> dict[str, Tensor]:
        """The averaged tensors as this rank holds them: local shards of sharded parameters."""
        live = {n: local_view(t) for n, t in self._tracked(module).items()}
        if check and (
            live.keys() != self.shadow.keys() or any(live[n].shape != s.shape for n, s in self.shadow.items())
        ):
            raise RuntimeError(_mismatch_message(self.shadow, live))
        return live

    def _split(self, live: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Names whose average shares the live dtype and device (exchanged on swap), and the others (stashed)."""
        same = [n for n, s in self.shadow.items() if s.dtype == live[n].dtype and s.device == live[n].device]
        chosen = set(same)
        return same, [n for n in self.shadow if n not in chosen]

    def close(self) -> None:
        """Finishes any background update and stops the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def fence(self) -> None:
        """Makes the current CUDA stream wait until the last update's weights are copied out (no host sync).

        Call before anything writes the weights (the optimizer step): the copies run on a side stream.
        """
        if self._copy_done is not None:
            torch.cuda.current_stream().wait_event(self._copy_done)
            self._copy_done = None

    def wait(self) -> None:
        """Blocks until a background update has finished (a no-op for synchronous stores)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        self._copy_done = None  # the background thread synchronised on it

    # ---- averaging ----

    @torch.no_grad()
    def update_(self, module: nn.Module, smoothing: float) -> None:
        """One EMA step towards the module's current (training) weights."""
        self._require_training_in_model("update the average")
        self.wait()
        live = self._live(module)
        names = list(self.shadow)
        if not self.asynchronous:
            ema_update_([self.shadow[n] for n in names], [live[n] for n in names], smoothing)
            return
        staged = [self._staging[n] for n in names]
        done = None
        if any(live[n].is_cuda for n in names):
            # Copy on a side stream: the next forward and backward (which only read the weights) overlap with it;
            # `fence()` makes the next optimizer step (which writes them) wait for it.
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream()
            self._copy_stream.wait_stream(torch.cuda.current_stream())
            done = torch.cuda.Event()
            with torch.cuda.stream(self._copy_stream):
                for buffer, name in zip(staged, names, strict=True):
                    buffer.copy_(live[name], non_blocking=True)
                done.record()
            self._copy_done = done
        else:
            for buffer, name in zip(staged, names, strict=True):
                buffer.copy_(live[name])
        shadow = [self.shadow[n] for n in names]

        def finish() -> None:
            if done is not None:
                done.synchronize()  # the staged copies of this step's weights have landed
            ema_update_(shadow, staged, smoothing)

        self._pending = self._executor.submit(finish)

    @torch.no_grad()
    def reset_(self, module: nn.Module) -> None:
        """Sets the average to the module's current weights (the start of averaging)."""
        self._require_training_in_model("reset the average")
        self.wait()
        live = self._live(module)
        for name, shadow in self.shadow.items():
            shadow.copy_(live[name])

    # ---- swapping ----

    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        """Puts the EMA weights into `module` in place; the training weights are kept for `swap_out`."""
        if self.ema_in_model:
            return
        self.wait()
        live = self._live(module)
        same, other = self._split(live)
        exchange_([live[n] for n in same], [self.shadow[n] for n in same])
        for name in other:
            stash = self._staging.get(name)
            if stash is None:
                stash = _empty_like(live[name], live[name].dtype, self.shadow[name].device)
            stash.copy_(live[name])
            self._stash[name] = stash
            live[name].copy_(self.shadow[name])
        self.ema_in_model = True
        self._refresh(module)

    @torch.no_grad()
    def swap_out(self, module: nn.Module) -> None:
        """Puts the training weights back into `module`, bit for bit."""
        if not self.ema_in_model:
            return
        live = self._live(module)
        same, other = self._split(live)
        exchange_([live[n] for n in same], [self.shadow[n] for n in same])
        for name in other:
            live[name].copy_(self._stash.pop(name))
        self._stash.clear()
        self.ema_in_model = False
        self._refresh(module)

    def discard_swap(self) -> None:
        """Forgets that EMA weights are in the model, after the model's weights were replaced from outside (a load).

        Only `load_state_` may follow: the averages of exchanged tensors hold stale training values.
        """
        self.wait()
        self._stash.clear()
        self.ema_in_model = False

    # ---- views of both sets of weights ----

    def ema_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The EMA values in full (shadow) precision, wherever they are right now. Do not modify."""
        self.wait()
        if not self.ema_in_model:
            return dict(self.shadow)
        live = self._live(module)
        exchanged = set(self._split(live)[0])
        return {n: (live[n] if n in exchanged else self.shadow[n]) for n in self.shadow}

    def training_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The training values in the model's dtype, wherever they are right now. Do not modify."""
        self.wait()
        live = self._live(module)
        if not self.ema_in_model:
            return live
        exchanged = set(self._split(live)[0])
        return {n: (self.shadow[n] if n in exchanged else self._stash[n]) for n in self.shadow}

    def non_finite_training(self, module: nn.Module) -> str | None:
        """Name of the first training tensor with a NaN or Inf (one host sync), or None."""
        live = self.training_tensors(module)
        return first_non_finite(list(live), list(live.values()))

    def full_ema(self, module: nn.Module) -> dict[str, Tensor]:
        """The EMA values as full tensors (gathering sharded ones: a collective every rank must call)."""
        tracked, ema = self._tracked(module), self.ema_tensors(module)
        return {n: gather_full(tracked[n], ema[n]) for n in self.shadow}

    def full_training(self, module: nn.Module) -> dict[str, Tensor]:
        """The training values as full tensors (gathering sharded ones: a collective every rank must call)."""
        tracked, training = self._tracked(module), self.training_tensors(module)
        return {n: gather_full(tracked[n], training[n]) for n in self.shadow}

    @torch.no_grad()
    def copy_ema_to(self, target: nn.Module, source: nn.Module) -> None:
        """Writes the EMA weights (rounded to `target`'s dtypes) into `target`, a copy of `source`."""
        ema = self.ema_tensors(source)
        for name, tensor in self._live(target).items():
            tensor.copy_(ema[name])

    @torch.no_grad()
    def copy_training_to(self, target: nn.Module, source: nn.Module) -> None:
        """Writes the training weights into `target`, a copy of `source`."""
        training = self.training_tensors(source)
        for name, tensor in self._live(target).items():
            tensor.copy_(training[name])

    # ---- loading ----

    @torch.no_grad()
    def load_state_(self, module: nn.Module, ema: Mapping[str, Tensor], training: Mapping[str, Tensor] | None) -> None:
        """Restores the averages (and the module's training weights when given) from full tensors, exactly.

        Shapes and dtypes must match the store (a float32 average is never loaded from a rounded copy). Sharded
        parameters take their local slice of each full tensor, so a checkpoint loads at another world size too.
        """
        tracked, full = self._tracked(module), {"ema": ema, "training": training}

        def local(name: str, kind: str) -> Tensor:
            return shard_like(tracked[name], full[kind][name])

        self._restore_(module, local, with_training=training is not None)

    # ---- sharded checkpoints ----

    def sharded_state(self, module: nn.Module, with_training: bool) -> dict[str, Tensor]:
        """`ema/<name>` (and `training/<name>`) as DTensors over this rank's tensors, no copy: what a sharded sidecar
        saves (torch.distributed.checkpoint). Replicated tensors stay plain."""
        tracked, ema = self._tracked(module), self.ema_tensors(module)
        state = {f"ema/{n}": as_dtensor(tracked[n], ema[n]) for n in self.shadow}
        if with_training:
            training = self.training_tensors(module)
            state.update({f"training/{n}": as_dtensor(tracked[n], training[n]) for n in self.shadow})
        return state

    def empty_sharded_state(self, module: nn.Module, with_training: bool, saved_flat: list[str]) -> dict[str, Tensor]:
        """Tensors for a sharded sidecar to be loaded into, newly allocated.

        A tensor saved in the layout this run holds it in (both flat ZeRO-3 partitions, or both shaped) loads as this
        rank's shard, resharded by DCP. One saved in the other layout (FSDP2 to ZeRO-3, ZeRO-3 to one device ...)
        loads whole on every rank and is sliced by `load_sharded_`.
        """
        tracked, live = self._tracked(module), self._live(module)
        flat, saved_flat = set(self.flat_names), set(saved_flat)
        state = {}
        for name, shadow in self.shadow.items():
            kinds = [("ema", shadow)] + ([("training", live[name])] if with_training else [])
            for kind, local in kinds:
                if (name in flat) == (name in saved_flat):
                    state[f"{kind}/{name}"] = as_dtensor(tracked[name], torch.zeros_like(local))
                else:
                    shape = (math.prod(self.global_shapes[name]),) if name in saved_flat else self.global_shapes[name]
                    state[f"{kind}/{name}"] = torch.zeros(shape, dtype=local.dtype, device=local.device)
        return state

    @torch.no_grad()
    def load_sharded_(self, module: nn.Module, state: Mapping[str, Tensor], saved_flat: list[str]) -> None:
        """Restores the averages (and the training weights when `state` has them) from a loaded `empty_sharded_state`."""
        tracked, flat, saved_flat = self._tracked(module), set(self.flat_names), set(saved_flat)

        def local(name: str, kind: str) -> Tensor:
            loaded = state[f"{kind}/{name}"]
            if (name in flat) == (name in saved_flat):
                return from_dtensor(tracked[name], loaded)
            return shard_like(tracked[name], loaded.reshape(self.global_shapes[name]))

        self._restore_(module, local, with_training=any(key.startswith("training/") for key in state))

    @torch.no_grad()
    def _restore_(self, module: nn.Module, local: Callable[[str, str], Tensor], with_training: bool) -> None:
        """Sets each average to `local(name, "ema")` (this rank's tensor) and, `with_training`, each live tensor to
        `local(name, "training")`; then no EMA is swapped in."""
        self.wait()
        self.ema_in_model = False
        self._stash.clear()
        live = self._live(module)
        for name, shadow in self.shadow.items():
            shadow.copy_(local(name, "ema"))
            if with_training:
                live[name].copy_(local(name, "training"))
        if with_training:
            self._refresh(module)

    def _refresh(self, module: nn.Module) -> None:
        if self.zero3:  # forwards read the gathered copies of small ZeRO-3 parameters: re-gather them
            refresh_(list(self._tracked(module).values()))

    def _require_training_in_model(self, action: str) -> None:
        if self.ema_in_model:
            raise RuntimeError(
                f"Cannot {action} while the EMA weights are swapped into the model; swap them out first."
            )


def _empty_like(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor of `tensor`'s shape; pinned when it is host memory paired with an accelerator."""
    pin = device.type == "cpu" and tensor.device.type != "cpu" and torch.cuda.is_available()
    return torch.empty(tensor.shape, dtype=dtype, device=device, pin_memory=pin)


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
