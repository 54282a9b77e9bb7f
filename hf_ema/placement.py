"""Which weights the model holds: the training weights or one average. One object decides, from one table.

`Placement` owns the question. Its operations are `place(target)` and `forget()` (after the model's weights were
replaced from outside); everything else asks it:

- during `train()`, each Trainer hook looks up `HOOKS` for what the model must hold when the hook returns;
- `ema_weights(label)` / `training_weights()` blocks are explicit and win over anything implicit inside them;
- `EMAMixin`'s wrappers (`evaluate`, `predict`, `save_model` ...) are implicit: inside a user's explicit block they
  leave the model as the block placed it, and they only undo what they changed themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from .store import EMAStore


class Training:
    """The training weights, as a placement target beside the averages' labels (`TRAINING`)."""

    def __repr__(self) -> str:
        return "TRAINING"


TRAINING = Training()
"""`place(TRAINING)` puts the training weights in the model."""

Target = str | Training
"""What the model can hold: an average's label, or `TRAINING`."""

# What the model holds when each hook returns, during train(). Hooks outside train() leave the model alone (after
# training it holds the primary average, and the user's calls decide).
#   "training": the training weights.
#   "window":   the primary average if the Trainer evaluates, or writes a checkpoint that holds the EMA, right after
#               this hook (control.should_evaluate / should_save), else the training weights.
#   "after_eval": after an evaluation: keep the primary for a checkpoint with the EMA that follows it (for
#               save_strategy="best": the evaluation is a new best), else the training weights.
#   "primary":  the primary average (the end of training: whatever the user does next uses it).
HOOKS: dict[str, str] = {
    "on_train_begin": "training",
    "on_epoch_begin": "training",
    "on_step_begin": "training",
    "on_step_end": "window",
    "on_epoch_end": "window",
    "on_evaluate": "after_eval",
    "on_save": "training",
    "on_train_end": "primary",
}


class Placement:
    """Owns what the model holds. `store` is None until averaging starts (the model then holds the training weights).

    Args:
        store (`Callable[[], EMAStore | None]`): returns the current store (it is rebuilt at start and on resume).
        model (`Callable[[], nn.Module | None]`): returns the model the store averages.
        reference (`str`, *optional*): the label of the average a DPO reference model holds (`ema_reference`),
            which implicit placements never put into the model.
    """

    def __init__(
        self,
        store: Callable[[], EMAStore | None],
        model: Callable[[], nn.Module | None],
        reference: str | None = None,
    ) -> None:
        self._store, self._model = store, model
        self._reference = reference  # the DPO reference's average (`ema_reference`): never the implicit primary
        self._explicit: list[Target] = []  # the targets of the user's open explicit blocks, innermost last
        self._implicit = 0  # open implicit blocks

    @property
    def holds(self) -> Target:
        """The label of the average in the model, or `TRAINING`."""
        store = self._store()
        return store.holds if store is not None and store.holds is not None else TRAINING

    @property
    def explicit(self) -> bool:
        """Whether a user's explicit block is open (implicit placements then do nothing)."""
        return bool(self._explicit)

    def place(self, target: Target) -> None:
        """Makes the model hold `target` (an average's label, or `TRAINING`). Before averaging starts, only the
        training weights exist and this does nothing."""
        store, model = self._store(), self._model()
        if store is None or model is None:
            return
        store.place_(model, None if target is TRAINING else target)

    def forget(self) -> None:
        """Records that the model's weights were replaced from outside (a checkpoint's model files loaded into it):
        whatever average was in it is gone, and only a load of the EMA state may follow."""
        store = self._store()
        if store is not None:
            store.discard_swap()

    def for_hook(self, hook: str, *, evaluates: bool, saves_ema: bool) -> Target:
        """The target `HOOKS` gives for `hook`, resolved with the Trainer's intentions right after it."""
        rule = HOOKS[hook]
        primary = self.primary
        if rule == "window":
            return primary if evaluates or saves_ema else TRAINING
        if rule == "after_eval":
            return primary if saves_ema else TRAINING
        return primary if rule == "primary" else TRAINING

    @property
    def primary(self) -> Target:
        """The primary average's label once averaging has started, else `TRAINING` (also when the primary is the
        DPO reference's average, `ema_reference`, the only one)."""
        store = self._store()
        return store.primary if store is not None and store.primary != self._reference else TRAINING

    @contextlib.contextmanager
    def holding(self, target: Target, explicit: bool) -> Iterator[None]:
        """Runs the block with `target` in the model and puts back what was there before.

        An explicit block (the user's `ema_weights` / `training_weights`) always places, and restores on exit. An
        implicit block (a wrapper around a Trainer call) places only when it is the outermost block of all, and
        restores only what it changed: wrappers nested in one another (`_save_checkpoint` -> `save_model` ->
        `_save`) or in a user's explicit block leave the model as the outer block placed it.
        """
        if not explicit and (self._explicit or self._implicit):
            yield
            return
        before = self.holds
        if explicit:
            self._explicit.append(target)
        else:
            self._implicit += 1
        try:
            self.place(target)
            yield
        finally:
            if explicit:
                self._explicit.pop()
            else:
                self._implicit -= 1
            if self.holds != before and (explicit or before != target):
                self.place(before)

    @contextlib.contextmanager
    def visiting(self, target: Target) -> Iterator[None]:
        """Places `target` for the block and puts back exactly what was there, whatever blocks are open: for a pass
        that looks at one more set of weights inside a wrapper (the other averages during an evaluation)."""
        before = self.holds
        try:
            self.place(target)
            yield
        finally:
            self.place(before)
