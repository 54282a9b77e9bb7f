"""EMACallback: the Trainer's hooks, each turning `TrainerState` into a `Clock` once and driving the `Averager`.

The averaging, placement, EMA state and snapshots are the averager's (`hf_ema.averager`); which folder a resume reads,
`hf_ema.resume`'s; the setup checks, `hf_ema.guards`'.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import guards
from .arguments import EMAArguments
from .averager import Averager
from .checkpoint import SIDECAR_NAME, has_sidecar
from .placement import TRAINING, Target
from .resume import resume, run_checkpoint, stamp_run
from .time import Clock

logger = logging.getLogger(__name__)


def saves_as_best(args: TrainingArguments, state: TrainerState, metrics: dict[str, float] | None) -> bool | None:
    """Whether the Trainer saves a checkpoint after the evaluation whose `metrics` on_evaluate was given, under
    save_strategy="best": `Trainer._determine_best_metric`'s rule (a strict improvement of `metric_for_best_model`
    on `state.best_metric`), which it applies right after on_evaluate, before it updates `state.best_metric`.
    None when these metrics cannot tell: another of several eval datasets, evaluated before or after the one
    `metric_for_best_model` names, whose own on_evaluate decides."""
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "best" or not metrics:
        return False
    name = args.metric_for_best_model
    key = name if name is None or name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:  # one of several eval datasets, or an evaluation the Trainer does not judge
        return None
    value, best = metrics[key], state.best_metric
    if args.greater_is_better:
        return bool(value > (float("-inf") if best is None else best))
    return bool(value < (float("inf") if best is None else best))


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
        self.averager = Averager(ema_args)
        self.trainer = None  # an EMAMixin trainer that bound itself (see `bind`)
        self.training = False  # between on_train_begin and on_train_end
        self.trial_output_dir: str | None = None  # told by an EMAMixin trainer for a hyper-parameter search trial
        self.output_dir: str | None = None  # where this train() writes checkpoints and snapshots
        self._sidecar_step: int | None = None
        # Called after the averages start, are restored or update (an EMAMixin trainer with `ema_reference` copies
        # that average into its DPO reference model).
        self.after_averages_move: Callable[[], None] | None = None

    # ---- public helpers ----

    def bind(self, trainer) -> None:
        """Called by an `EMAMixin` trainer: it writes the EMA state into its checkpoints itself (into the folder it
        really saves to), wraps its own evaluations, and gathers ZeRO-3 weights for its saves."""
        self.trainer = trainer

    @property
    def model(self) -> nn.Module | None:
        return self.averager.model

    @property
    def store(self):
        """The averages (`hf_ema.store.EMAStore`), None before averaging starts."""
        return self.averager.store

    @property
    def schedule(self):
        return self.averager.schedule

    @property
    def placement(self):
        return self.averager.placement

    @property
    def labels(self) -> list[str]:
        """The averages' labels, primary first."""
        return self.averager.labels

    @property
    def primary_label(self) -> str:
        return self.averager.primary_label

    @property
    def started(self) -> bool:
        """Whether averaging has begun (before it, every average equals the training weights)."""
        return self.averager.started

    @property
    def num_updates(self) -> int:
        return self.averager.num_updates

    @property
    def num_switches(self) -> int:
        """Switch-EMA: how often the primary average was copied into the training weights (`ema_switch_every`)."""
        return self.averager.num_switches

    def ema_weights(self, model: nn.Module | None = None, label: str | None = None):
        """Context manager: the block runs with an average (the primary by default) in the model, placed in place (no
        copy where dtypes match).

        Explicit: it wins over the EMA wrappers of `EMAMixin` inside it (`trainer.evaluate()` in the block evaluates
        this average). The weights that were in the model before are back afterwards, also when the block raises.
        Before averaging starts the block runs on the training weights (logged once).
        """
        return self.averager.ema_weights(model, label)

    def note_if_not_started(self) -> None:
        """Logs once that the EMA weights asked for are the training weights, averaging not having started."""
        self.averager.note_if_not_started()

    def training_weights(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with the training weights in the model (placed in place), restoring what
        was there. Explicit: it wins over the EMA wrappers of `EMAMixin` inside it, so `trainer.evaluate()`,
        `predict()` and `save_model()` in the block use the training weights."""
        return self.averager.training_weights(model)

    def ema_model(self, model: nn.Module | None = None, label: str | None = None) -> nn.Module:
        """A new, independent module holding an average (the primary by default; the training weights before
        averaging starts)."""
        return self.averager.ema_model(model, label)

    def ema_models(self, model: nn.Module | None = None) -> dict[str, nn.Module]:
        """`{label: independent module}` for every average, primary first."""
        return self.averager.ema_models(model)

    def training_model(self, model: nn.Module | None = None) -> nn.Module:
        """A new, independent module holding the training weights."""
        return self.averager.training_model(model)

    def restore_training_weights(self) -> None:
        """Puts the training weights back into the model (e.g. after an exception escaped `train()`)."""
        self.placement.place(TRAINING)

    def save_state(
        self, checkpoint_dir: str, args: TrainingArguments, state: TrainerState, model_files: Target | None = None
    ) -> str | None:
        """Writes the EMA state for the checkpoint of `state.global_step` into `checkpoint_dir`.

        `model_files` is what the checkpoint's model files hold (an average's label, or `TRAINING`); by default, what
        the model holds now. It is recorded, and decides whether the training weights are saved too. Every rank must
        call it. Whole tensors (one device, DDP, ZeRO-1/2) go into `ema_state.safetensors`, written by the main
        process; sharded ones (FSDP2, ZeRO-3) into the `ema_state/` folder, each rank writing its own shards with
        torch.distributed.checkpoint. Returns the path written on the main process, else None (also when it was
        written for this step already).
        """
        if self._sidecar_step == state.global_step:
            return None
        self._sidecar_step = state.global_step
        self.averager.check_finite(state.global_step, f"The checkpoint in {checkpoint_dir} was not given EMA state")
        # Sharded state is finished by one process (a rename) on a filesystem all ranks share, as DCP needs: the
        # global main process, also with save_on_each_node.
        return self.averager.save(
            checkpoint_dir, state.global_step, args.should_save, args.process_index == 0, holds=model_files
        )

    # ---- Trainer hooks ----

    def on_init_end(self, args, state, control, **kwargs):
        guards.claim(state, self)
        guards.refuse_reference_without_trainer(self.ema_args, self.trainer is not None)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        guards.claim(state, self)
        averager = self.averager
        if averager.placement.holds is not TRAINING:
            if state.global_step > 0 or model is not averager.model:
                averager.placement.forget()  # the model was reloaded or replaced; what it held is gone
            else:
                averager.placement.place(TRAINING)  # a second train(): continue from the training weights
        guards.check_units(averager, args, state)
        guards.refuse_reference_without_trainer(self.ema_args, self.trainer is not None)
        if self.trainer is None:
            guards.refuse_search_without_trial_folder(averager, args, state)
        # A hyper-parameter search trial writes into its own folder (output_dir/run-<trial id>/, which only the
        # Trainer's _get_output_dir knows): its EMA state, snapshots and run stamp go there too.
        trial_dir = self.trial_output_dir if state.is_hyper_param_search else None
        self.output_dir = os.fspath(trial_dir or args.output_dir)
        averager.reset(model, sharded=guards.backend_layout(args, model, self.trainer is not None) == "sharded")
        guards.refuse_switch_where_wrong(averager, guards.deepspeed_config(args))
        averager.log = args.should_log
        self._sidecar_step, self.training = None, True
        guards.tell_what_a_stock_trainer_skips(averager, args, self.trainer is not None)
        callbacks = state.stateful_callbacks if isinstance(state.stateful_callbacks, dict) else None
        stamp, resumed_run = stamp_run(callbacks, state.global_step, self.output_dir)
        averager.run_id, averager.run_output_dir = stamp["run_id"], stamp["output_dir"]
        clock = self._clock(args, state)
        if state.global_step > 0:
            told = self.resume_from_checkpoint is not None
            folder = (
                os.fspath(self.resume_from_checkpoint) if told else run_checkpoint(self.output_dir, state.global_step)
            )
            resume(averager, folder, told, resumed_run, state.global_step, clock)
        elif averager.schedule.starts_at_zero:
            averager.start(clock, state.global_step)
        guards.warn_if_no_update_can_happen(averager, args, state, kwargs.get("train_dataloader"), clock)
        averager.begin_snapshots(self.output_dir, state.global_step, clock, main=args.process_index == 0)
        self._tell_averages_moved()
        self._apply("on_train_begin", args, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply("on_step_begin", args, control)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._apply("on_epoch_begin", args, control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.averager.fence()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.placement.place(TRAINING)  # the update reads the training weights
        if getattr(optimizer, "step_was_skipped", False):
            logger.debug("Optimizer step %d was skipped (fp16 overflow); the EMA is not updated.", state.global_step)
        else:
            self._advance(args, state, "batch")
        self._after_step("on_step_end", args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.placement.place(TRAINING)
        self._advance(args, state, "epoch")  # at most one action per step: a no-op when on_step_end already acted
        self._after_step("on_epoch_end", args, state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training and self.started and self.placement.holds is TRAINING and not self.placement.explicit:
            logger.warning(
                "The evaluation at step %d ran on the training weights, not the EMA: control.should_evaluate was "
                "set after EMACallback.on_step_end, by a callback listed after it. Put EMACallback last in "
                "`callbacks` (or use EMATrainer, whose evaluate() always uses the EMA).",
                state.global_step,
            )
        best = saves_as_best(args, state, kwargs.get("metrics")) if self.training else False
        # Undecided (another eval dataset's metrics): keep what the judging dataset's on_evaluate placed or will.
        self._apply("on_evaluate", args, control, best=best is not False)
        if best is True and self.trainer is None and not self.averager.sharded:
            # The Trainer writes the checkpoint's model files and, on transformers 4.x (no on_push_begin), starts
            # its hub upload before on_save: the EMA state goes in now, recording what on_evaluate just placed.
            # (Sharded averages: on_save, as before; a collective here is untested.)
            self._write_checkpoint_state(args, state)

    def on_save(self, args, state, control, **kwargs):
        if (
            self.trainer is None
            and self.started
            and self._checkpoint_wants_ema()
            and self.placement.holds is TRAINING
            and self._sidecar_step != state.global_step
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
        # in the folder before it is uploaded. on_step_end or on_evaluate (save_strategy="best") wrote it already,
        # unless a callback listed after this one set should_save. (transformers 4.x has no on_push_begin.)
        # Only the main process pushes, so a gather (sharded averages) cannot run here; on_save writes it then.
        if self.model is not None and control.should_save and not self.averager.sharded:
            self._write_checkpoint_state(args, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.model
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # The Trainer loaded the best checkpoint's model files into the model; take its EMA state with them.
            self.placement.forget()
            self._load_best(state, model)
            self._tell_averages_moved()
        if self.started:
            self.placement.place(TRAINING)
            self.averager.check_finite(
                state.global_step, "The EMA weights were not put into the model; it holds the training weights"
            )
        guards.warn_if_nothing_averaged(self.averager, args, state)
        self._apply("on_train_end", args, control)  # what the user does next (save, push, evaluate) uses the EMA
        self.training = False

    # ---- internals ----

    def _apply(self, hook: str, args: TrainingArguments, control: TrainerControl, best: bool = False) -> None:
        """Places what `hook`'s row of `hf_ema.placement.HOOKS` asks for, during train() and outside the user's
        explicit blocks. `best`: the evaluation just made is a new best that save_strategy="best" saves."""
        if not self.training or self.placement.explicit:
            return
        target = self.placement.for_hook(
            hook,
            evaluates=control.should_evaluate,
            saves_ema=(control.should_save or best) and self._checkpoint_wants_ema(),
        )
        self.placement.place(target)

    def _after_step(self, hook: str, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        self._apply(hook, args, control)
        self._write_state_before_save(args, state, control)
        if self.averager.snapshots is not None:  # no clock to build on every step without snapshots
            # The last step of the run, also when a callback stops it early: at max_steps the Trainer's flow callback
            # has set should_training_stop before this on_step_end; a stop set later in the step (an evaluation's
            # EarlyStoppingCallback, a callback listed after this one) is seen by on_epoch_end, which the Trainer
            # calls on the way out.
            final = control.should_training_stop or (state.max_steps > 0 and state.global_step >= state.max_steps)
            self.averager.snapshot(self._clock(args, state), state.global_step, final, main=args.process_index == 0)

    @staticmethod
    def _clock(args: TrainingArguments, state: TrainerState) -> Clock:
        per_device = state.train_batch_size or args.per_device_train_batch_size
        total = per_device * args.gradient_accumulation_steps * max(args.world_size, 1)
        return Clock.from_counters(state.global_step, state.epoch, total, state.num_input_tokens_seen, state.max_steps)

    def _advance(self, args: TrainingArguments, state: TrainerState, event: str) -> None:
        if state.max_steps > 0 and state.global_step > state.max_steps:
            # Resuming a finished run from its last checkpoint makes the Trainer take one more step (at a learning
            # rate of 0 with a decaying schedule): that is not part of the run, and the averages stay as they were.
            logger.debug("Step %d is past max_steps=%d; the EMA is not updated.", state.global_step, state.max_steps)
            return
        clock = self._clock(args, state)
        if self.schedule.composer:
            # Composer's timestamp counts the epochs completed: at the end of an epoch's last batch it has not yet
            # moved (the Trainer's `state.epoch` has).
            epoch = float(state.epoch or 0.0)
            completed = round(epoch) if event == "epoch" else max(math.ceil(epoch - 1e-9) - 1, 0)
            clock = Clock(**{**clock.to_dict(), "ep": float(completed)})
        before = (self.averager.started, self.averager.num_updates)
        self.averager.step(clock, state.global_step, event)
        if (self.averager.started, self.averager.num_updates) != before:
            self._tell_averages_moved()

    def _tell_averages_moved(self) -> None:
        if self.after_averages_move is not None and self.averager.started:
            self.after_averages_move()

    def _checkpoint_wants_ema(self) -> bool:
        return self.ema_args.ema_checkpoint_weights == "ema"

    def _write_state_before_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        # Before the Trainer writes the model files, hub pushes or rotation: a crash leaves no checkpoint whose EMA
        # state is missing. An EMAMixin trainer writes it itself, into the folder it really saves to.
        if control.should_save and self.trainer is None:
            # The model files get what the model holds when the Trainer saves, after an evaluation that may come
            # first: the primary average if checkpoints hold the EMA (on_evaluate keeps it for the save), else the
            # training weights.
            model_files = self.placement.primary if self._checkpoint_wants_ema() else TRAINING
            self.save_state(run_checkpoint(self.output_dir, state.global_step), args, state, model_files=model_files)

    def _write_checkpoint_state(self, args: TrainingArguments, state: TrainerState) -> None:
        # Called on every rank (sharded averages are gathered); the main process writes.
        self.save_state(run_checkpoint(self.output_dir, state.global_step), args, state)

    def _load_best(self, state: TrainerState, model: nn.Module) -> None:
        folder = state.best_model_checkpoint
        if not has_sidecar(folder):
            logger.warning(
                "load_best_model_at_end loaded %s, which has no %s; the model holds its model-file weights and the "
                "EMA of the last step is dropped.",
                folder,
                SIDECAR_NAME,
            )
            self.averager.reset(model, self.averager.sharded)
            return
        self.averager.model = model
        self.averager.load(folder)
