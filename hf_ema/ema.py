"""`hf_ema.EMA`: the averages of a model for hand-written training loops (Accelerate, diffusers- or timm-style scripts).

The same averaging as `EMACallback` (every rule, several averages, float32 averages of 16-bit weights, host offload,
shard-local FSDP2, post-hoc snapshots), driven by the loop: `ema.step()` after each optimizer step. No Trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .arguments import EMAArguments
from .averager import Averager
from .distributed import check_backend
from .files import atomic_file
from .guards import refuse_switch_where_wrong
from .placement import TRAINING
from .time import Clock

logger = logging.getLogger(__name__)

TRAINER_ONLY = (
    "ema_eval_training_weights",
    "ema_eval_during_training",
    "ema_save_all_averages",
    "ema_checkpoint_weights",
    "ema_resume_without_state",
)
"""`EMAArguments` fields that only a Trainer acts on (its evaluations, checkpoints and resume search)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel and torch.compile wrappers (what `accelerator.prepare` returns)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class EMA:
    """Exponential moving averages of a model's weights in your own training loop.

    Call `step()` after each optimizer step: it counts optimizer steps (the `ba` unit) itself and updates the
    averages when the schedule of `ema_args` says so (`half_life`, `smoothing`, `sigma_rel`, warmup, `update_interval`,
    `ema_start`). Run code on an average with `with ema.average_weights():` (in place, training weights back
    afterwards bit for bit), take copies with `ema_model()`, save one with `save_pretrained()`, and register the
    object with `accelerator.register_for_checkpointing(ema)` so that `save_state` / `load_state` resume it exactly.

    Works on the model `accelerator.prepare` returns: one device, DDP (every rank keeps the same averages) and FSDP2
    (each rank averages its shards, no communication per update). `EMAArguments` fields that only a Trainer acts on
    (`ema_eval_*`, `ema_save_all_averages`, `ema_checkpoint_weights`, `ema_resume_without_state`) have no effect here.

    Switch-EMA (`ema_switch_every`) works here too: `step()` copies the primary average into the model's parameters
    when a switch is due. It reaches only those: an optimizer that keeps its own master copy of the weights (DeepSpeed
    at any ZeRO stage, fp32 master weights of mixed-precision optimizers, schedule-free optimizers' `z` sequence)
    overwrites or ignores it, which `EMA` cannot see. Use the switch with optimizers that step the parameters
    themselves (SGD, Adam, AdamW).

    Args:
        model (`nn.Module`): the model being trained (wrapped or not).
        ema_args (`EMAArguments`, *optional*): the settings; defaults to `EMAArguments()` (half-life 1000ba).
        max_steps (`int`, *optional*): the optimizer steps of the whole run; needed for `dur` times.
        output_dir (`str`, *optional*): where `ema_snapshot_every` writes its snapshots (`<output_dir>/ema_snapshots`).

    Example:

    ```python
    from accelerate import Accelerator
    from hf_ema import EMA, EMAArguments

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = EMA(model, EMAArguments(half_life="1000ba"))
    accelerator.register_for_checkpointing(ema)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
    with ema.average_weights():
        evaluate(model)
    ema.save_pretrained("ema-model")
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        ema_args: EMAArguments | dict | None = None,
        *,
        max_steps: int | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        if ema_args is None:
            ema_args = EMAArguments()
        elif isinstance(ema_args, dict):
            ema_args = EMAArguments(**ema_args)
        if not isinstance(ema_args, EMAArguments):
            raise TypeError(
                f"EMA expects `ema_args` to be an EMAArguments, got {type(ema_args).__name__}. Pass "
                "EMA(model, EMAArguments(half_life='1000ba'))."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA expects `model` to be an nn.Module, got {type(model).__name__}.")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"`max_steps` must be a positive number of optimizer steps, got {max_steps!r}.")
        units = ema_args.units()
        if "dur" in units and max_steps is None:
            raise ValueError(
                "EMAArguments give a time in 'dur' (a fraction of the run), but EMA was not told the run's length. "
                "Pass EMA(model, ema_args, max_steps=<optimizer steps of the whole run>), or give the times in 'ba'."
            )
        if ema_args.ema_schedule == "composer" and ema_args.update_interval_time.unit != "ba":
            raise ValueError(
                f"ema_schedule='composer' with update_interval={ema_args.update_interval_time} updates at epoch ends, "
                "which EMA.step() is not told of. Use an update_interval in 'ba', or ema_schedule='hf-ema'."
            )
        if ema_args.ema_snapshot_every is not None and output_dir is None:
            raise ValueError(
                f"ema_snapshot_every={ema_args.ema_snapshot_every!r} writes post-hoc snapshots, but EMA was given no "
                "folder for them. Pass EMA(model, ema_args, output_dir=...), or leave ema_snapshot_every unset."
            )
        if ema_args.ema_reference is not None:
            raise ValueError(
                f"ema_reference={ema_args.ema_reference!r} makes a DPO trainer's reference model hold an average; EMA "
                "in a loop of your own has no reference model to write. Drop ema_reference and read the average "
                f"where your loop needs it: with ema.ema_weights({ema_args.ema_reference!r}): ... or "
                f"ema.ema_model({ema_args.ema_reference!r})."
            )
        defaults = {f.name: f.default for f in fields(EMAArguments)}
        ignored = [name for name in TRAINER_ONLY if getattr(ema_args, name) != defaults[name]]
        if ignored and _is_main():
            logger.warning(
                "EMA (no Trainer) ignores %s: only the Trainer's evaluations and checkpoints use them.", ignored
            )
        self.ema_args = ema_args
        self.max_steps = max_steps
        self.output_dir = os.fspath(output_dir) if output_dir is not None else None
        self.model = _unwrap(model)
        self._averager = Averager(ema_args, owner="ema")
        self._averager.reset(self.model, sharded=check_backend(self.model) == "sharded")
        refuse_switch_where_wrong(self._averager, None)  # a hand loop's DeepSpeed is not seen: see the docstring
        self._averager.log = _is_main()
        self._steps, self._samples, self._tokens, self._epoch = 0, 0.0, 0.0, None
        self._units = units
        if self._averager.schedule.starts_at_zero:
            self._averager.start(self._clock(), 0)
        self._begin_snapshots()

    # ---- counters ----

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far (`step()` calls)."""
        return self._steps

    @property
    def num_updates(self) -> int:
        """Updates of the averages so far."""
        return self._averager.num_updates

    @property
    def num_switches(self) -> int:
        """Switch-EMA: how often the primary average was copied into the training weights (`ema_switch_every`)."""
        return self._averager.num_switches

    @property
    def started(self) -> bool:
        """Whether averaging has begun (`ema_start`); before it, every call uses the training weights."""
        return self._averager.started

    @property
    def labels(self) -> list[str]:
        """The averages' labels, primary first."""
        return self._averager.labels

    def _clock(self) -> Clock:
        epoch = float(self._epoch) if self._epoch is not None else 0.0
        max_steps = self.max_steps or 0
        return Clock(
            ba=float(self._steps),
            ep=epoch,
            sp=self._samples,
            tok=self._tokens,
            dur=self._steps / max_steps if max_steps else 0.0,
        )

    def step(self, *, samples: int | None = None, tokens: int | None = None, epoch: float | None = None) -> None:
        """Counts one optimizer step and updates the averages when the schedule says so. Call it after
        `optimizer.step()` (once per optimizer step, not per micro-batch; skip it for a step the optimizer skipped).

        Args:
            samples (`int`, *optional*): samples in this step, over all ranks (needed for `sp` times).
            tokens (`int`, *optional*): input tokens in this step, over all ranks (needed for `tok` times).
            epoch (`float`, *optional*): the epoch now, fractional (needed for `ep` times).

        Under DDP every rank must pass the same counts (e.g. `accelerator.gather(n).sum()`), or their averages drift
        apart.
        """
        if self._averager.placement.holds is not TRAINING:
            raise RuntimeError(
                "ema.step() was called while the model holds an average (inside `with ema.average_weights():`, or "
                "after ema.copy_to() without ema.restore()); the update must read the training weights. Leave the "
                "block (or call ema.restore()) before the optimizer step and ema.step()."
            )
        for unit, value, name in (("sp", samples, "samples"), ("tok", tokens, "tokens"), ("ep", epoch, "epoch")):
            if unit in self._units and value is None:
                raise ValueError(
                    f"EMAArguments give a time in '{unit}', but ema.step() was not given `{name}`. Call "
                    f"ema.step({name}=...) at every step, or give the times in 'ba'."
                )
        self._steps += 1
        self._samples += float(samples or 0)
        self._tokens += float(tokens or 0)
        if epoch is not None:
            self._epoch = float(epoch)
        clock = self._clock()
        self._averager.step(clock, self._steps)
        final = self.max_steps is not None and self._steps >= self.max_steps
        self._averager.snapshot(clock, self._steps, final=final, main=_is_main())

    # ---- the weights ----

    def average_weights(self, label: str | None = None) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with an average (the primary by default) in the model, in place (no copy
        where dtypes match); the training weights are back afterwards, bit for bit, also when the block raises.
        Before averaging starts the block runs on the training weights."""
        return self._averager.ema_weights(self.model, label)

    def training_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with the training weights in the model (inside `average_weights()` or
        after `copy_to()`), and what was there before comes back afterwards."""
        return self._averager.training_weights(self.model)

    def ema_model(self, label: str | None = None) -> nn.Module:
        """A new, independent copy of the model holding an average (the primary by default)."""
        return self._averager.ema_model(self.model, label)

    def ema_models(self) -> dict[str, nn.Module]:
        """`{label: independent copy}` for every average, primary first."""
        return self._averager.ema_models(self.model)

    def copy_to(self, label: str | None = None) -> None:
        """Puts an average (the primary by default) into the model and leaves it there, as diffusers' `copy_to`;
        the training weights are kept, and `restore()` puts them back (`step()` refuses to run before that)."""
        self._averager.note_if_not_started()
        self._averager.placement.place(self._averager.check_label(label))

    def restore(self) -> None:
        """Puts the training weights back into the model after `copy_to()`, bit for bit."""
        self._averager.placement.place(TRAINING)

    @torch.no_grad()
    def save_pretrained(self, save_directory: str | os.PathLike, label: str | None = None, **kwargs: Any) -> None:
        """Writes an average (the primary by default) as a folder `from_pretrained` loads: the model's own
        `save_pretrained` (a transformers or diffusers model, `**kwargs` passed on), else `model.safetensors`. Every
        rank calls it; the main process writes (an FSDP2 model is gathered first, a collective)."""
        with self.average_weights(label):
            state_dict = None
            if self._averager.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                state_dict = get_model_state_dict(self.model, options=options)
            if not _is_main():
                return
            if hasattr(self.model, "save_pretrained"):
                if state_dict is not None:
                    kwargs.setdefault("state_dict", state_dict)
                self.model.save_pretrained(save_directory, **kwargs)
                return
            from safetensors.torch import save_file

            state_dict = state_dict if state_dict is not None else self.model.state_dict()
            tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
            with atomic_file(os.path.join(os.fspath(save_directory), "model.safetensors"), "pretrained") as temp:
                save_file(tensors, temp, metadata={"format": "pt"})

    # ---- state (accelerator.register_for_checkpointing) ----

    def state_dict(self) -> dict[str, Any]:
        """Everything resuming needs that the model and optimizer do not hold: every average in full precision, the
        counters and settings (the same keys and metadata as a checkpoint's `ema_state.safetensors`), and the training
        weights while an average is in the model. Whole tensors on the CPU, copied; an FSDP2 model's shards are
        gathered (a collective every rank calls, as `accelerator.save_state` does)."""
        state = self._averager.state_dict(self._steps)
        state["loop"] = {"steps": self._steps, "samples": self._samples, "tokens": self._tokens, "epoch": self._epoch}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what `state_dict()` returned (`accelerator.load_state` calls it after loading the model), so the
        averages continue exactly; the model must be the one (names, shapes) the state was saved from. The model's
        weights count as the training weights from here on (`load_state` has just loaded them), unless the state
        holds those too."""
        self._averager.placement.forget()  # an average placed before the load is gone: the load replaced the weights
        self._averager.load_state_dict(state_dict)
        loop = state_dict.get("loop") or {}
        self._steps = int(loop.get("steps", state_dict["meta"].get("global_step", 0)))
        self._samples, self._tokens = float(loop.get("samples", 0.0)), float(loop.get("tokens", 0.0))
        self._epoch = loop.get("epoch")
        self._begin_snapshots()

    def _begin_snapshots(self) -> None:
        if self.output_dir is not None:
            self._averager.begin_snapshots(self.output_dir, self._steps, self._clock(), main=_is_main())
