"""The shadow store: EMA tensors keyed by parameter name, updated in place and swapped in and out of a model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .core import ema_update_, exchange_, first_non_finite, tracked_tensors

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
    weights are in the model ("swapped in"), tensors whose average has the model's dtype are exchanged in place with
    the average (no extra copy; the store then holds the training values), and tensors with a wider average (float32 of
    a bf16 parameter) are stashed once in the parameter's dtype and overwritten with the rounded average.

    Args:
        module (`nn.Module`): the model whose tensors are averaged; the average starts equal to them.
        ema_dtype (`str`, *optional*, defaults to `"auto"`): see `EMAArguments.ema_dtype`.
    """

    def __init__(self, module: nn.Module, ema_dtype: str = "auto") -> None:
        self.ema_dtype = ema_dtype
        live = self._live(module, check=False)
        self.shadow: dict[str, Tensor] = {
            name: tensor.detach().to(dtype=shadow_dtype(tensor.dtype, ema_dtype), copy=True)
            for name, tensor in live.items()
        }
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
        """Names, shapes and dtypes of the averages: what a checkpoint's EMA state must match."""
        return {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in self.shadow.items()}

    def _live(self, module: nn.Module, check: bool = True) -> dict[str, Tensor]:
        live = {name: tensor for name, tensor, kind in tracked_tensors(module) if kind == "average"}
        if check and (
            live.keys() != self.shadow.keys() or any(live[n].shape != s.shape for n, s in self.shadow.items())
        ):
            raise RuntimeError(_mismatch_message(self.shadow, live))
        return live

    def _split(self, live: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Names whose average shares the live dtype (exchanged on swap) and names with a wider average (stashed)."""
        same = [n for n, s in self.shadow.items() if s.dtype == live[n].dtype and s.device == live[n].device]
        wide = [n for n in self.shadow if n not in set(same)]
        return same, wide

    # ---- averaging ----

    @torch.no_grad()
    def update_(self, module: nn.Module, smoothing: float) -> None:
        """One EMA step towards the module's current (training) weights."""
        self._require_training_in_model("update the average")
        live = self._live(module)
        names = list(self.shadow)
        ema_update_([self.shadow[n] for n in names], [live[n] for n in names], smoothing)

    @torch.no_grad()
    def reset_(self, module: nn.Module) -> None:
        """Sets the average to the module's current weights (the start of averaging)."""
        self._require_training_in_model("reset the average")
        live = self._live(module)
        for name, shadow in self.shadow.items():
            shadow.copy_(live[name])

    def non_finite_training(self, module: nn.Module) -> str | None:
        """Name of the first training tensor with a NaN or Inf (one host sync), or None."""
        live = self.training_tensors(module)
        return first_non_finite(list(live), list(live.values()))

    def non_finite_ema(self, module: nn.Module) -> str | None:
        """Name of the first average with a NaN or Inf (one host sync), or None."""
        ema = self.ema_tensors(module)
        return first_non_finite(list(ema), list(ema.values()))

    # ---- swapping ----

    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        """Puts the EMA weights into `module` in place; the training weights are kept for `swap_out`."""
        if self.ema_in_model:
            return
        live = self._live(module)
        same, wide = self._split(live)
        exchange_([live[n] for n in same], [self.shadow[n] for n in same])
        for name in wide:
            self._stash[name] = live[name].detach().clone()
            live[name].copy_(self.shadow[name])
        self.ema_in_model = True

    @torch.no_grad()
    def swap_out(self, module: nn.Module) -> None:
        """Puts the training weights back into `module`, bit for bit."""
        if not self.ema_in_model:
            return
        live = self._live(module)
        same, wide = self._split(live)
        exchange_([live[n] for n in same], [self.shadow[n] for n in same])
        for name in wide:
            live[name].copy_(self._stash.pop(name))
        self._stash.clear()
        self.ema_in_model = False

    def discard_swap(self) -> None:
        """Forgets that EMA weights are in the model, after the model's weights were replaced from outside (a load).

        Only `load_state_` may follow: the averages of exchanged tensors hold stale training values.
        """
        self._stash.clear()
        self.ema_in_model = False

    # ---- views of both sets of weights ----

    def ema_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The EMA values in full (shadow) precision, wherever they are right now. Do not modify."""
        if not self.ema_in_model:
            return dict(self.shadow)
        live = self._live(module)
        same, wide = self._split(live)
        return {n: (live[n] if n in set(same) else self.shadow[n]) for n in self.shadow}

    def training_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The training values in the model's dtype, wherever they are right now. Do not modify."""
        live = self._live(module)
        if not self.ema_in_model:
            return live
        same, _ = self._split(live)
        return {n: (self.shadow[n] if n in set(same) else self._stash[n]) for n in self.shadow}

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
        """Restores the averages (and the module's training weights when given) from a checkpoint, exactly.

        Shapes and dtypes must match the store (a float32 average is never loaded from a rounded copy).
        """
        self.ema_in_model = False
        self._stash.clear()
        live = self._live(module)
        for name, shadow in self.shadow.items():
            shadow.copy_(ema[name])
            if training is not None:
                live[name].copy_(training[name])

    def _require_training_in_model(self, action: str) -> None:
        if self.ema_in_model:
            raise RuntimeError(
                f"Cannot {action} while the EMA weights are swapped into the model; swap them out first."
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
