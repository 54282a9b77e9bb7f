"""EMACallback: all EMA work hooks into the Trainer here, so any Trainer or subclass gets it."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import uuid
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import __version__
from .arguments import EMAArguments
from .checkpoint import (
    SHARDED_SIDECAR_NAME,
    SIDECAR_NAME,
    EMAStateError,
    average_prefixes,
    check_fingerprint,
    has_sidecar,
    load_sharded_tensors,
    load_sidecar,
    read_meta,
    read_sharded_meta,
    save_sharded_sidecar,
    save_sidecar,
    sharded_sidecar_path,
    sidecar_path,
)
from .distributed import check_backend, comm_device
from .placement import TRAINING, Placement
from .rules import describe
from .schedule import START, EMASchedule
from .store import EMAStore, average_key
from .time import Clock, reached

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, checked by a test

RUN_KEY = "hf_ema"
"""Key of hf-ema's entry in `TrainerState.stateful_callbacks` (saved in every checkpoint's trainer_state.json)."""

# The EMACallback of each running Trainer, keyed by the Trainer's state object (one per Trainer and train() call):
# every callback of a Trainer sees the same state, so a second EMACallback finds the first here.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class EMACallback(TrainerCallback):
    """Keeps exponential moving averages of the model weights during `Trainer.train()`.

    Works with the stock `Trainer` and any subclass (TRL's `SFTTrainer` ...). The callback

    - sets the averages to the weights at train begin (or at `ema_start`) and updates them after optimizer steps, per
      `EMAArguments` (never per micro-batch; optimizer steps that were skipped do not update them);
    - places the primary average into the model, in place, for the evaluations and checkpoints the Trainer runs
      during training, and the training weights back afterwards (`hf_ema.placement.HOOKS` says which, hook by hook);
    - writes the EMA state into each checkpoint (before the Trainer writes the model files): `ema_state.safetensors`,
      or `ema_state/` sharded by rank for FSDP2 and DeepSpeed ZeRO-3, and reads it back on resume, so every average
      continues exactly;
    - leaves the primary average in the model when training ends (the training weights stay available through
      `training_model()` / `training_weights()`, and a later `train()` continues from them).

    Manual calls after training (`trainer.evaluate()`, `save_model()`, `push_to_hub()`) use the primary average
    because the model holds it. During training, only `EMAMixin` trainers (`EMATrainer`) make manual calls use the
    EMA too, evaluate the other averages and the training weights, and export every average. One EMACallback per
    Trainer: keep several averages in one (`EMAArguments(half_life=["500ba", "2000ba"])`); a second is refused.

    Args:
        ema_args (`EMAArguments`, *optional*): the EMA settings; defaults to `EMAArguments()` (half-life 1000ba).
        resume_from_checkpoint (`str`, *optional*): the checkpoint folder a stock `Trainer` resumes from when it is
            not `output_dir/checkpoint-<step>` (a stock Trainer does not tell callbacks the path; `EMATrainer` does).

    Example:

    ```python
    from transformers import Trainer
    from hf_ema import EMAArguments, EMACallback

    ema = EMACallback(EMAArguments(half_life=["50ba", "200ba"]))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[ema])
    trainer.train()  # evaluations during training use the primary (50ba); afterwards the model holds it
    raw = ema.training_model()
    slow = ema.ema_models()["200ba"]
    ```
    """

    def __init__(self, ema_args: EMAArguments | None = None, resume_from_checkpoint: str | None = None) -> None:
        if ema_args is None:
            ema_args = EMAArguments()
        elif isinstance(ema_args, dict):
            ema_args = EMAArguments(**ema_args)
        if not isinstance(ema_args, EMAArguments):
            raise TypeError(
                f"EMACallback expects `ema_args` to be an EMAArguments, got {type(ema_args).__name__}. "
                "Pass EMACallback(EMAArguments(half_life='1000ba'))."
            )
        self.ema_args = ema_args
        self.resume_from_checkpoint = resume_from_checkpoint
        self.schedule = self._new_schedule()
        self.store: EMAStore | None = None
        self.model: nn.Module | None = None
        self.placement = Placement(lambda: self.store, lambda: self.model)
        self.trainer = None  # an EMAMixin trainer that bound itself (see `bind`)
        self.training = False  # between on_train_begin and on_train_end
        self._sidecar_step: int | None = None
        self._run_id: str | None = None  # a fresh id per train() call, in the Trainer's state and every EMA state
        self._told_not_started = False
        self._sharded = False

    # ---- public helpers ----

    def bind(self, trainer) -> None:
        """Called by an `EMAMixin` trainer: it writes the EMA state into its checkpoints itself (into the folder it
        really saves to), wraps its own evaluations, and gathers ZeRO-3 weights for its saves."""
        self.trainer = trainer

    @property
    def labels(self) -> list[str]:
        """The averages' labels, primary first."""
        return self.ema_args.labels

    @property
    def primary_label(self) -> str:
        return self.ema_args.primary_label

    @property
    def started(self) -> bool:
        """Whether averaging has begun (before it, every average equals the training weights)."""
        return self.store is not None and self.schedule.started

    @property
    def num_updates(self) -> int:
        return self.schedule.num_updates

    @contextlib.contextmanager
    def ema_weights(self, model: nn.Module | None = None, label: str | None = None) -> Iterator[nn.Module]:
        """Runs the block with an average (the primary by default) in the model, placed in place (no copy where
        dtypes match).

        Explicit: it wins over the EMA wrappers of `EMAMixin` inside it (`trainer.evaluate()` in the block evaluates
        this average). The weights that were in the model before are back afterwards, also when the block raises.
        Before averaging starts the block runs on the training weights (logged once).
        """
        model = self._resolve(model)
        label = self._check_label(label)
        self.note_if_not_started()
        with self.placement.holding(label, explicit=True):
            yield model

    def note_if_not_started(self) -> None:
        """Logs once that the EMA weights asked for are the training weights, averaging not having started."""
        if not self.started and not self._told_not_started:
            logger.info("EMA averaging has not started yet; using the training weights.")
            self._told_not_started = True

    @contextlib.contextmanager
    def training_weights(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Runs the block with the training weights in the model (placed in place), restoring what was there.

        Explicit: it wins over the EMA wrappers of `EMAMixin` inside it, so `trainer.evaluate()`, `predict()` and
        `save_model()` in the block use the training weights.
        """
        model = self._resolve(model)
        with self.placement.holding(TRAINING, explicit=True):
            yield model

    def ema_model(self, model: nn.Module | None = None, label: str | None = None) -> nn.Module:
        """A new, independent module holding an average (the primary by default; the training weights before
        averaging starts)."""
        model = self._resolve(model)
        label = self._check_label(label)
        self._refuse_copy_of_zero3("ema_model()", "ema_weights()")
        copied = copy.deepcopy(model)
        if self.started:
            self.store.copy_ema_to(copied, model, label)
        return copied

    def ema_models(self, model: nn.Module | None = None) -> dict[str, nn.Module]:
        """`{label: independent module}` for every average, primary first."""
        return {label: self.ema_model(model, label) for label in self.labels}

    def training_model(self, model: nn.Module | None = None) -> nn.Module:
        """A new, independent module holding the training weights."""
        model = self._resolve(model)
        self._refuse_copy_of_zero3("training_model()", "training_weights()")
        copied = copy.deepcopy(model)
        if self.started:
            self.store.copy_training_to(copied, model)
        return copied

    def restore_training_weights(self) -> None:
        """Puts the training weights back into the model (e.g. after an exception escaped `train()`)."""
        self.placement.place(TRAINING)

    def save_state(
        self, checkpoint_dir: str, args: TrainingArguments, state: TrainerState, model_files: str | None = ...
    ) -> str | None:
        """Writes the EMA state for the checkpoint of `state.global_step` into `checkpoint_dir`.

        `model_files` is what the checkpoint's model files hold (an average's label, or None for the training
        weights); by default, what the model holds now. It is recorded, and decides whether the training weights
        are saved too. Every rank must call it. Whole tensors (one device, DDP, ZeRO-1/2) go into `ema_state.safetensors`, written by the main
        process; sharded ones (FSDP2, ZeRO-3) into the `ema_state/` folder, each rank writing its own shards with
        torch.distributed.checkpoint. Returns the path written on the main process, else None (also when it was
        written for this step already).
        """
        if self._sidecar_step == state.global_step:
            return None
        self._sidecar_step = state.global_step
        holds = self.placement.holds if model_files is ... else model_files
        self._check_finite(state, f"The checkpoint in {checkpoint_dir} was not given EMA state")
        if self._sharded or (self.started and self.store.sharded):
            # One process finishes the folder (a rename), on a filesystem all ranks share, as DCP needs: the global
            # main process, also with save_on_each_node.
            meta = self._sidecar_meta(state, holds) if args.process_index == 0 else None
            tensors = self.store.sharded_state(self.model, holds is not None) if self.started else {}
            return save_sharded_sidecar(checkpoint_dir, meta, tensors)
        if not args.should_save:
            return None
        tensors = {}
        if self.started:
            for label in self.store.labels:
                ema = self.store.ema_tensors(self.model, label)
                tensors.update({average_key(label, n): t for n, t in ema.items()})
            if holds is not None:
                tensors.update({f"training/{n}": t for n, t in self.store.training_tensors(self.model).items()})
        return save_sidecar(checkpoint_dir, self._sidecar_meta(state, holds), tensors)

    def _sidecar_meta(self, state: TrainerState, holds: str | None) -> dict:
        rules = self.schedule.rules
        return {
            "hf_ema_version": __version__,
            "global_step": state.global_step,
            "schedule": self.schedule.state_dict(),
            "ema_args": self.ema_args.to_dict(),
            "averages": list(rules),
            "rules": {label: describe(rule) for label, rule in rules.items()},
            "model_files": "training" if holds is None else "ema",
            "model_files_average": holds,
            "fingerprint": self.store.fingerprint() if self.started else None,
            "flat_names": self.store.flat_names if self.started else [],
            "run_id": self._run_id,
        }

    # ---- Trainer hooks ----

    def on_init_end(self, args, state, control, **kwargs):
        self._claim(state)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._claim(state)
        if self.store is not None and self.store.ema_in_model:
            if state.global_step > 0 or model is not self.model:
                self.store.discard_swap()  # the model was reloaded or replaced; what it held is gone
            else:
                self.placement.place(TRAINING)  # a second train(): continue from the training weights
        self.model = model
        if self.store is not None:
            self.store.close()
        self.store, self._sidecar_step, self.training = None, None, True
        self.schedule = self._new_schedule()
        self._check_units(args, state)
        self._sharded = self._check_backend(args, model) == "sharded"
        self._tell_what_a_stock_trainer_skips(args)
        resumed_run = self._stamp_run(args, state)
        if state.global_step > 0:
            self._resume(args, state, model, resumed_run)
        elif self.schedule.starts_at_zero:
            self._start(args, state)
        self._warn_if_no_update_can_happen(args, state, kwargs.get("train_dataloader"))
        self._snapshot(args, state, begin=True)
        self._apply("on_train_begin", args, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply("on_step_begin", args, control)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._apply("on_epoch_begin", args, control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.store is not None:
            self.store.fence()  # an offloaded update's copies must be out before the weights change

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.placement.place(TRAINING)  # the update reads the training weights
        if getattr(optimizer, "step_was_skipped", False):
            logger.debug("Optimizer step %d was skipped (fp16 overflow); the EMA is not updated.", state.global_step)
        else:
            self._advance(args, state, "batch")
        self._apply("on_step_end", args, control)
        self._write_state_before_save(args, state, control)
        self._snapshot(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.placement.place(TRAINING)
        self._advance(args, state, "epoch")  # at most one action per step: a no-op when on_step_end already acted
        self._apply("on_epoch_end", args, control)
        self._write_state_before_save(args, state, control)
        self._snapshot(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training and self.started and self.placement.holds is TRAINING and not self.placement.explicit:
            logger.warning(
                "The evaluation at step %d ran on the training weights, not the EMA: control.should_evaluate was "
                "set after EMACallback.on_step_end, by a callback listed after it. Put EMACallback last in "
                "`callbacks` (or use EMATrainer, whose evaluate() always uses the EMA).",
                state.global_step,
            )
        self._apply("on_evaluate", args, control)

    def on_save(self, args, state, control, **kwargs):
        if (
            self.trainer is None
            and self.started
            and self._checkpoint_wants_ema()
            and self.placement.holds is TRAINING
            and self._sidecar_step != state.global_step
            and state.trial_name is None
        ):
            logger.warning(
                "checkpoint-%d holds the training weights in its model files (its EMA state says so, and resuming "
                "from it is exact): control.should_save was set after EMACallback.on_step_end, by a callback listed "
                "after it. Put EMACallback last in `callbacks`, or use EMATrainer.",
                state.global_step,
            )
        self._write_checkpoint_state(args, state)
        self._apply("on_save", args, control)

    def on_push_begin(self, args, state, control, **kwargs):
        # An intermediate hub push runs inside the Trainer's checkpoint save, before rotation: the sidecar must be
        # in the folder before it is uploaded (save_strategy="best" has no earlier hook).
        # Only the main process pushes, so a gather (sharded averages) cannot run here; on_save writes it then.
        if self.model is not None and control.should_save and not self._sharded:
            self._write_checkpoint_state(args, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.model
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # The Trainer loaded the best checkpoint's model files into the model; take its EMA state with them.
            if self.store is not None:
                self.store.discard_swap()
            self._load_best(args, state, model)
        if self.started:
            self.placement.place(TRAINING)
            self._check_finite(state, "The EMA weights were not put into the model; it holds the training weights")
        self._warn_if_nothing_averaged(args, state)
        self._apply("on_train_end", args, control)  # what the user does next (save, push, evaluate) uses the EMA
        self.training = False

    # ---- internals ----

    def _apply(self, hook: str, args: TrainingArguments, control: TrainerControl) -> None:
        """Places what `hook`'s row of `hf_ema.placement.HOOKS` asks for, during train() and outside the user's
        explicit blocks."""
        if not self.training or self.placement.explicit:
            return
        target = self.placement.for_hook(
            hook,
            evaluates=control.should_evaluate,
            saves_ema=control.should_save and self._checkpoint_wants_ema(),
            best_pending=_is_best(args),
        )
        self.placement.place(target)

    def _claim(self, state: TrainerState) -> None:
        """Refuses a second EMACallback on the same Trainer: each would place its average into the same model, and
        one would take the other's average for the training weights."""
        for key in [k for k, (s, c) in _OWNERS.items() if s() is None or c() is None]:
            del _OWNERS[key]
        owner = _OWNERS.get(id(state))
        if owner is not None and owner[0]() is state and owner[1]() is not self:
            raise ValueError(
                "This Trainer already has an EMACallback; a second one would place its average into the same model "
                "and corrupt the training weights. Keep several averages in one callback instead: "
                "EMACallback(EMAArguments(half_life=['500ba', '2000ba'])) (or smoothing=[...], sigma_rel=[...]). "
                "With EMATrainer, pass ema_args=EMAArguments(...) and add no EMACallback."
            )
        _OWNERS[id(state)] = (weakref.ref(state), weakref.ref(self))

    def _tell_what_a_stock_trainer_skips(self, args: TrainingArguments) -> None:
        if self.trainer is not None or not args.should_log:
            return
        a = self.ema_args
        if a.ema_eval_training_weights:
            logger.warning(
                "ema_eval_training_weights=True has no effect with a stock Trainer and EMACallback: only EMATrainer "
                "(or a Trainer subclass mixing in hf_ema.EMAMixin) evaluates the training weights beside the EMA. "
                "Use EMATrainer, or evaluate them after training in `with callback.training_weights(): ...`."
            )
        if len(a.labels) > 1:
            logger.warning(
                "With a stock Trainer, evaluations during training run on the primary average (%s) only; the others "
                "(%s) are kept, checkpointed and available through callback.ema_models(). EMATrainer (or EMAMixin) "
                "evaluates all of them.",
                a.primary_label,
                ", ".join(a.labels[1:]),
            )

    def _new_schedule(self) -> EMASchedule:
        a = self.ema_args
        return EMASchedule(
            update_interval=a.update_interval_time,
            ema_start=a.ema_start_time,
            rules=a.rules(),
            composer=a.ema_schedule == "composer",
        )

    def _resolve(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise RuntimeError("EMACallback has no model yet: pass `model`, or call this after `trainer.train()`.")
        return model

    def _check_label(self, label: str | None) -> str:
        if label is None:
            return self.primary_label
        if label not in self.labels:
            raise KeyError(
                f"No average labelled {label!r}; the averages are {self.labels} (labels are the values as given to "
                "EMAArguments, e.g. '2000ba' or '0.05')."
            )
        return label

    def _check_backend(self, args: TrainingArguments, model: nn.Module) -> str:
        config = deepspeed_config(args)
        layout = check_backend(model, config)
        zero = (config or {}).get("zero_optimization") or {}
        gathers = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save"))
        if zero.get("stage") == 3 and not gathers and self.trainer is None:
            raise ValueError(
                "DeepSpeed ZeRO-3 with stage3_gather_16bit_weights_on_model_save=false: the stock Trainer's "
                "save_model() then writes a DeepSpeed checkpoint, whose weights (zero_to_fp32.py) are the "
                'optimizer\'s training weights, not the EMA. Set "stage3_gather_16bit_weights_on_model_save": true '
                "in zero_optimization (model files then hold the EMA), or use EMATrainer, which writes the EMA "
                "model files either way."
            )
        return layout

    def _refuse_copy_of_zero3(self, call: str, instead: str) -> None:
        if self.store is not None and self.store.zero3:
            raise RuntimeError(
                f"{call} cannot copy a DeepSpeed ZeRO-3 model: each rank holds only its partitions. Run the code "
                f"inside `with callback.{instead}:` (every rank), or save the weights with save_model() and load them "
                "with from_pretrained()."
            )

    def _clock(self, args: TrainingArguments, state: TrainerState) -> Clock:
        per_device = state.train_batch_size or args.per_device_train_batch_size
        total = per_device * args.gradient_accumulation_steps * max(args.world_size, 1)
        return Clock.from_counters(state.global_step, state.epoch, total, state.num_input_tokens_seen, state.max_steps)

    def _composer_clock(self, args: TrainingArguments, state: TrainerState, event: str) -> Clock:
        """The clock as Composer's timestamp reads at the end of a batch or an epoch: its epoch count is the epochs
        completed, so at the end of an epoch's last batch it has not yet moved (the Trainer's `state.epoch` has)."""
        clock = self._clock(args, state)
        epoch = float(state.epoch or 0.0)
        completed = round(epoch) if event == "epoch" else max(math.ceil(epoch - 1e-9) - 1, 0)
        return Clock(**{**clock.to_dict(), "ep": float(completed)})

    def _check_units(self, args: TrainingArguments, state: TrainerState) -> None:
        units = self.ema_args.units()
        if "tok" in units and args.include_num_input_tokens_seen in (False, "no", None):
            raise ValueError(
                "EMAArguments use the 'tok' unit, but TrainingArguments.include_num_input_tokens_seen is "
                f"{args.include_num_input_tokens_seen!r}, so the Trainer counts no tokens. Set "
                "include_num_input_tokens_seen=True (or 'non_padding'), or give the times in 'ba'."
            )
        if "ep" in units and (state.num_train_epochs or 0) >= sys.maxsize:
            raise ValueError(
                "EMAArguments use the 'ep' unit, but the training dataset has no length (an IterableDataset), so "
                "epochs are not known. Give the times in 'ba', 'sp' or 'dur' instead."
            )

    def _new_store(self, model: nn.Module) -> EMAStore:
        if self.store is not None:
            self.store.close()
        a = self.ema_args
        return EMAStore(model, a.ema_dtype, device=a.ema_device, buffers=a.ema_buffers, labels=a.labels)

    def _start(self, args: TrainingArguments, state: TrainerState) -> None:
        self.store = self._new_store(self.model)
        self.schedule.start(self._clock(args, state), state.global_step)
        self._log_start(args, state)

    def _log_start(self, args: TrainingArguments, state: TrainerState) -> None:
        if args.should_log:
            logger.info(
                "EMA started at step %d: %d average(s) of %d tensors, %d elements each, %.1f MiB in all.",
                state.global_step,
                len(self.store.labels),
                len(self.store.names()),
                self.store.numel(),
                self.store.nbytes() / 2**20,
            )

    def _advance(self, args: TrainingArguments, state: TrainerState, event: str) -> None:
        if state.max_steps > 0 and state.global_step > state.max_steps:
            # Resuming a finished run from its last checkpoint makes the Trainer take one more step (at a learning
            # rate of 0 with a decaying schedule): that is not part of the run, and the averages stay as they were.
            logger.debug("Step %d is past max_steps=%d; the EMA is not updated.", state.global_step, state.max_steps)
            return
        before = self.schedule.state_dict() if self.ema_args.ema_skip_non_finite else None
        if self.schedule.composer:
            action = self.schedule.step_composer(self._composer_clock(args, state, event), state.global_step, event)
        else:
            action = self.schedule.step(self._clock(args, state), state.global_step)
        if isinstance(action, dict) and before is not None:
            bad = self._on_any_rank(self.store.non_finite_training(self.model))  # skip everywhere if any rank must
            if bad is not None:
                self.schedule.load_state_dict(before)  # the next update spans this step's time too
                logger.warning(
                    "Step %d: training tensor %r holds NaN or Inf; the EMA update is skipped (ema_skip_non_finite).",
                    state.global_step,
                    bad,
                )
                return
        if action == START:
            self.store = self._new_store(self.model)
            self._log_start(args, state)
        elif action is not None:
            self.store.update_(self.model, action)

    def _on_any_rank(self, bad: str | None) -> str | None:
        """`bad` (a tensor name or None) from this rank, or a placeholder if another rank of a sharded model has one."""
        if not self._sharded or not torch.distributed.is_initialized():
            return bad
        flag = torch.tensor(float(bad is not None), device=comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bad or ("a tensor shard on another rank" if flag.item() else None)

    def _check_finite(self, state: TrainerState, consequence: str) -> None:
        """Raises if an average holds NaN or Inf (on any rank's shards): one host sync, at checkpoints and the end."""
        if not self.started:
            return
        bad = self._on_any_rank(self.store.non_finite_average(self.model))
        if bad is None:
            return
        raise FloatingPointError(
            f"The EMA average of {bad!r} holds NaN or Inf at step {state.global_step}: the training weights became "
            f"non-finite (a diverged step) and were averaged in. {consequence}. Resume from the last checkpoint "
            "written before this, and set EMAArguments(ema_skip_non_finite=True) to skip updates from non-finite "
            "weights (or fix the instability: lower the learning rate, clip gradients)."
        )

    def _checkpoint_wants_ema(self) -> bool:
        return self.ema_args.ema_checkpoint_weights == "ema"

    def _write_state_before_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        # Before the Trainer writes the model files, hub pushes or rotation: a crash leaves no checkpoint whose EMA
        # state is missing. An EMAMixin trainer writes it itself, into the folder it really saves to; with
        # hyper-parameter search the folder differs, so on_save writes it then.
        if control.should_save and self.trainer is None and state.trial_name is None:
            # The model files get what the model holds when the Trainer saves, after an evaluation that may come
            # first: the primary average if checkpoints hold the EMA (on_evaluate keeps it for the save), else the
            # training weights.
            model_files = self.placement.primary if self._checkpoint_wants_ema() else TRAINING
            self.save_state(self._run_checkpoint(args, state), args, state, model_files=model_files)

    def _write_checkpoint_state(self, args: TrainingArguments, state: TrainerState) -> None:
        # Called on every rank (sharded averages are gathered); the main process writes. Hyper-parameter search
        # trials save under output_dir/run-<id>/, a folder callbacks are not told: EMATrainer writes those itself.
        if state.trial_name is not None:
            return
        self.save_state(self._run_checkpoint(args, state), args, state)

    @staticmethod
    def _run_checkpoint(args: TrainingArguments, state: TrainerState) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _checkpoint_folder(self, args: TrainingArguments, state: TrainerState) -> str:
        if self.resume_from_checkpoint is not None:
            return os.fspath(self.resume_from_checkpoint)
        return self._run_checkpoint(args, state)

    def _started_by(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Whether averaging had started by now (so that a checkpoint of now must hold EMA state)."""
        start = self.ema_args.ema_start_time
        return start.value == 0 or reached(self._clock(args, state)[start.unit], start.value)

    def _warn_if_no_update_can_happen(self, args: TrainingArguments, state: TrainerState, dataloader) -> None:
        """Warns at train begin when the run ends before the first update (or the start) can happen."""
        if not args.should_log or state.max_steps <= 0:
            return
        steps = state.max_steps
        try:
            per_epoch = max(len(dataloader) // max(args.gradient_accumulation_steps, 1), 1)
        except TypeError:  # no dataloader or no length: epochs are not known ahead
            per_epoch = None
        per_device = state.train_batch_size or args.per_device_train_batch_size
        samples = steps * per_device * args.gradient_accumulation_steps * max(args.world_size, 1)
        end = {"ba": steps, "sp": samples, "dur": 1.0, "ep": steps / per_epoch if per_epoch else None}
        a, now = self.ema_args, self._clock(args, state)
        start, interval = a.ema_start_time, a.update_interval_time
        problem = None
        if end.get(start.unit) is not None and not self.schedule.started and not reached(end[start.unit], start.value):
            problem = f"averaging never starts: ema_start={a.ema_start!r} is not reached by the end of the run"
        elif end.get(interval.unit) is not None:
            if self.schedule.started:
                first = self.schedule.last_clock[interval.unit] + interval.value
            elif start.value == 0:
                first = now[interval.unit] + interval.value
            elif start.unit == interval.unit:
                first = start.value + interval.value
            else:
                first = None
            if first is not None and not reached(end[interval.unit], first):
                problem = (
                    f"the first update needs {interval} of training after the start ({first:g}{interval.unit}), but "
                    f"the run ends at {end[interval.unit]:g}{interval.unit}"
                )
        if problem:
            logger.warning(
                "EMA: %s (max_steps=%d), so save_model() and evaluation would use %s. Shorten update_interval "
                "(e.g. update_interval='1ba') or ema_start, or train longer.",
                problem,
                steps,
                "the training weights" if "never starts" in problem else "the initial weights",
            )

    def _warn_if_nothing_averaged(self, args: TrainingArguments, state: TrainerState) -> None:
        if not args.should_log or state.global_step <= 0:
            return
        if not self.started:
            logger.warning(
                "EMA: training ended at step %d before averaging started (ema_start=%r); the model holds the "
                "training weights.",
                state.global_step,
                self.ema_args.ema_start,
            )
        elif self.num_updates == 0:
            logger.warning(
                "EMA: training ended at step %d with no update of the average since it started (update_interval=%s), "
                "so it holds the weights of the start, and save_model() writes those. Use a shorter update_interval.",
                state.global_step,
                self.ema_args.update_interval_time,
            )

    def _stamp_run(self, args: TrainingArguments, state: TrainerState) -> dict | None:
        """Gives this train() call a fresh id, in the Trainer's state (saved in every checkpoint's
        trainer_state.json) and in every EMA state it writes, and returns the stamp of the run it resumes, if any.

        A resumed checkpoint's EMA state is the one whose id its trainer state holds: that pairs them even when a
        stock Trainer resumes from a folder the callback is not told of.
        """
        callbacks = state.stateful_callbacks if isinstance(state.stateful_callbacks, dict) else None
        resumed = None
        if callbacks is not None and state.global_step > 0:
            resumed = (callbacks.get(RUN_KEY) or {}).get("attributes") or None
        self._run_id = uuid.uuid4().hex
        if callbacks is not None:
            stamp = {"run_id": self._run_id, "output_dir": os.path.abspath(args.output_dir)}
            callbacks[RUN_KEY] = {"args": {}, "attributes": stamp}
        return resumed

    def _written_by(self, folder: str, run: dict | None) -> bool:
        """Whether `folder`'s EMA state was written by `run` (True when either side predates run ids)."""
        if not run or not run.get("run_id") or not has_sidecar(folder):
            return True
        written = read_meta(folder).get("run_id")
        return written is None or written == run["run_id"]

    def _resume(self, args: TrainingArguments, state: TrainerState, model: nn.Module, run: dict | None = None) -> None:
        folder = self._checkpoint_folder(args, state)
        if (
            self.resume_from_checkpoint is None
            and run
            and (not has_sidecar(folder) or not self._written_by(folder, run))
        ):
            # A stock Trainer resumed from a folder it did not tell us: the one its trainer state was written in.
            elsewhere = os.path.join(run.get("output_dir", ""), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.abspath(elsewhere) != os.path.abspath(folder) and self._written_by(elsewhere, run):
                if has_sidecar(elsewhere):
                    logger.info(
                        "Resuming the EMA from %s: the Trainer's state was restored from that run's checkpoint, "
                        "not from %s.",
                        elsewhere,
                        folder,
                    )
                    folder = elsewhere
        if has_sidecar(folder) and not self._written_by(folder, run):
            raise EMAStateError(
                f"Resuming at step {state.global_step}: the Trainer restored its state from a checkpoint of run "
                f"{run['run_id'][:8]} (written in {run.get('output_dir')}), but the EMA state in {folder} belongs to "
                "another run (same step, another folder), and reading it would replace the loaded training weights. "
                "Pass the folder you resume from as EMACallback(..., resume_from_checkpoint=path), or use EMATrainer, "
                "which passes it itself."
            )
        if not has_sidecar(folder) and not self._started_by(args, state):
            return  # averaging starts later: there is no EMA state to restore yet
        if not has_sidecar(folder):
            if not os.path.isdir(folder):
                problem = (
                    f"Resuming at step {state.global_step}, but the checkpoint folder {folder} does not exist, so its "
                    "EMA state cannot be read (a stock Trainer does not tell callbacks which folder it resumes from)."
                )
                way_out = (
                    "Pass the folder as EMACallback(..., resume_from_checkpoint=path), or use EMATrainer, which "
                    "passes it itself."
                )
            else:
                problem = (
                    f"Resuming at step {state.global_step}, but {folder} has no {SIDECAR_NAME} (nor "
                    f"{SHARDED_SIDECAR_NAME}/): the checkpoint was saved without EMA (or its save was interrupted). "
                    "Its model files may hold EMA weights, so training cannot safely continue from them."
                )
                way_out = "Resume from a checkpoint written with EMA."
            if self.ema_args.ema_resume_without_state == "restart":
                logger.warning(
                    "%s Starting a fresh EMA from the loaded weights (ema_resume_without_state='restart').", problem
                )
                if self.schedule.starts_at_zero:
                    self._start(args, state)
                return
            raise EMAStateError(
                f"{problem} {way_out} Or set EMAArguments(ema_resume_without_state='restart') to start a fresh "
                "average from the loaded weights on purpose."
            )
        try:
            self._load_state(folder, model, expected_step=state.global_step)
        except EMAStateError as error:
            raise EMAStateError(
                f"{error} Resume from another checkpoint (or with the model and EMA settings it was trained with), or "
                "delete its EMA state and set EMAArguments(ema_resume_without_state='restart') to start a fresh average "
                "on purpose."
            ) from error

    def _load_state(self, folder: str, model: nn.Module, expected_step: int | None) -> None:
        # A folder written sharded (FSDP2, ZeRO-3) or whole, in format 1 or 2; either loads into either layout, at
        # any world size.
        sharded = os.path.isdir(sharded_sidecar_path(folder)) and not os.path.isfile(sidecar_path(folder))
        path = sharded_sidecar_path(folder) if sharded else sidecar_path(folder)
        sidecar = None if sharded else load_sidecar(folder)
        meta = read_sharded_meta(folder) if sharded else sidecar.meta
        if expected_step is not None and meta.get("global_step") != expected_step:
            raise EMAStateError(
                f"{path} was written at step {meta.get('global_step')}, but the checkpoint resumes at step "
                f"{expected_step}; it belongs to another checkpoint."
            )
        if meta.get("ema_args") != self.ema_args.to_dict():
            logger.warning(
                "The EMA settings differ from those in %s (%s now, %s then); the averages continue with the new "
                "settings.",
                path,
                self.ema_args.to_dict(),
                meta.get("ema_args"),
            )
        prefixes = self._match_averages(path, average_prefixes(meta))
        schedule = self._new_schedule()
        try:
            schedule.load_state_dict(meta["schedule"])
        except ValueError as error:
            raise EMAStateError(f"{path}: {error}. Resume without the warmup, or from a newer checkpoint.") from error
        if not schedule.started:
            self.schedule, self.store = schedule, None
            return
        store = self._new_store(model)
        check_fingerprint(path, store.fingerprint(), meta["fingerprint"])
        with_training = meta["model_files"] == "ema"
        if sharded:
            saved_flat = meta.get("flat_names", [])
            tensors = store.empty_sharded_state(model, prefixes, with_training, saved_flat)
            load_sharded_tensors(folder, tensors)
            store.load_sharded_(model, tensors, prefixes, saved_flat)
        else:
            found = sidecar.tensors
            keys = [f"{p}/{n}" for p in prefixes.values() for n in store.names()]
            keys += [f"training/{n}" for n in store.names()] if with_training else []
            missing = [key for key in keys if key not in found]
            if missing:
                what = (
                    "says the model files hold EMA weights but has no training weights"
                    if all(key.startswith("training/") for key in missing)
                    else "lacks tensors its metadata promises"
                )
                raise EMAStateError(
                    f"{path} {what} ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); it is incomplete "
                    "or was edited."
                )
            ema = {label: {n: found[f"{p}/{n}"] for n in store.names()} for label, p in prefixes.items()}
            training = {n: found[f"training/{n}"] for n in store.names()} if with_training else None
            store.load_state_(model, ema, training)
        self.schedule, self.store = schedule, store

    def _match_averages(self, path: str, saved: dict[str, str]) -> dict[str, str]:
        """`{label now: key prefix in the file}`: the same labels, or one average renamed (its settings changed)."""
        labels = self.labels
        if set(saved) == set(labels):
            return {label: saved[label] for label in labels}
        if len(saved) == 1 and len(labels) == 1:
            return {labels[0]: next(iter(saved.values()))}
        raise EMAStateError(
            f"{path} holds the averages {list(saved)}, but the EMA settings ask for {labels}; an average missing "
            "from the checkpoint cannot continue exactly and one missing from the settings would be dropped. Resume "
            f"with the averages the checkpoint holds (e.g. EMAArguments(half_life={list(saved)}) for half-lives)."
        )

    def _load_best(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        folder = state.best_model_checkpoint
        if not has_sidecar(folder):
            logger.warning(
                "load_best_model_at_end loaded %s, which has no %s; the model holds its model-file weights and the "
                "EMA of the last step is dropped.",
                folder,
                SIDECAR_NAME,
            )
            self.store = None
            self.schedule = self._new_schedule()
            return
        self._load_state(folder, model, expected_step=None)

    def _snapshot(self, args: TrainingArguments, state: TrainerState, begin: bool = False) -> None:
        """Post-hoc EMA snapshots (`ema_snapshot_every`; `hf_ema.snapshots.SnapshotWriter` does the work).

        At train begin (`begin`, after the EMA state was loaded), sets aside the snapshots newer than the step
        training starts from; after each optimizer step and epoch, records the update and writes every average when
        a snapshot is due. Every rank calls it: sharded averages are written shard by shard, a collective.
        """
        if self.ema_args.ema_snapshot_every is None:
            return
        if begin:
            from .snapshots import SnapshotWriter

            self._snapshots = SnapshotWriter(self.ema_args.ema_snapshot_every, self.ema_args.ema_snapshot_dtype)
            clock = self._clock(args, state)
            self._snapshots.begin(
                args.output_dir, state.global_step, self.schedule, self.store, clock, main=args.process_index == 0
            )
            return
        self._snapshots.after_step(
            self.store,
            self.model,
            self.schedule,
            self._clock(args, state),
            state.global_step,
            final=state.max_steps > 0 and state.global_step >= state.max_steps,
            sharded=self._sharded or (self.started and self.store.sharded),
            main=args.process_index == 0,
        )


def deepspeed_config(args: TrainingArguments) -> dict | None:
    """The DeepSpeed config the Trainer trains with (its "auto" values filled in), or None without DeepSpeed.

    Read from `TrainingArguments.hf_deepspeed_config` (checked by name in tests/test_trainer_internals.py): were it
    renamed, the ZeRO-3 refusals would be skipped silently, so its absence under DeepSpeed raises instead.
    """
    holder = getattr(args, "hf_deepspeed_config", None)
    if holder is not None:
        return holder.config
    if args.deepspeed:
        raise RuntimeError(
            "TrainingArguments has a DeepSpeed config but no `hf_deepspeed_config`, from which hf-ema reads it (the "
            "ZeRO-3 checks depend on it): this transformers version moved it. Use a transformers version hf-ema "
            "supports (README), or report it."
        )
    return None


def _is_best(args: TrainingArguments) -> bool:
    return str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
