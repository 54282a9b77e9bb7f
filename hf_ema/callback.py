"""EMACallback: all EMA work hooks into the Trainer here, so any Trainer or subclass gets it."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
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
    check_fingerprint,
    has_sidecar,
    load_sharded_tensors,
    load_sidecar,
    read_sharded_meta,
    save_sharded_sidecar,
    save_sidecar,
    sharded_sidecar_path,
    sidecar_path,
)
from .core import first_non_finite
from .distributed import check_backend, comm_device
from .schedule import START, EMASchedule
from .shadow import ShadowStore
from .time import Clock

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, checked by a test


class EMACallback(TrainerCallback):
    """Keeps an exponential moving average of the model weights during `Trainer.train()`.

    Works with the stock `Trainer` and any subclass (TRL's `SFTTrainer` ...). The callback

    - sets the average to the weights at train begin (or at `ema_start`) and updates it after optimizer steps, per
      `EMAArguments` (never per micro-batch; optimizer steps that were skipped do not update it);
    - swaps the EMA weights into the model, in place, for the evaluations and checkpoints the Trainer runs during
      training, and swaps the training weights back afterwards;
    - writes the EMA state into each checkpoint (before the Trainer writes the model files): `ema_state.safetensors`,
      or `ema_state/` sharded by rank for FSDP2 and DeepSpeed ZeRO-3, and reads it back on resume, so the average
      continues exactly;
    - leaves the EMA weights in the model when training ends (the training weights stay available through
      `training_model()` / `training_weights()`, and a later `train()` continues from them).

    Manual calls after training (`trainer.evaluate()`, `save_model()`, `push_to_hub()`) use the EMA weights because
    the model holds them. During training, only `EMATrainer` makes manual calls use the EMA too.

    Args:
        ema_args (`EMAArguments`, *optional*): the EMA settings; defaults to `EMAArguments()` (half-life 1000ba).
        resume_from_checkpoint (`str`, *optional*): the checkpoint folder a stock `Trainer` resumes from when it is
            not `output_dir/checkpoint-<step>` (a stock Trainer does not tell callbacks the path; `EMATrainer` does).

    Example:

    ```python
    from transformers import Trainer
    from hf_ema import EMAArguments, EMACallback

    ema = EMACallback(EMAArguments(half_life="50ba"))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[ema])
    trainer.train()  # evaluations during training use the EMA; afterwards the model holds it
    raw = ema.training_model()
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
        self.store: ShadowStore | None = None
        self.model: nn.Module | None = None
        self._window = False  # EMA swapped in by the callback for a training-time evaluation or save
        self._sidecar_step: int | None = None
        self._managed_by_trainer = False  # EMATrainer writes the sidecar itself, into the right run folder
        self._told_not_started = False
        self._sharded = False

    # ---- public helpers ----

    @property
    def started(self) -> bool:
        """Whether averaging has begun (before it, the EMA weights are the training weights)."""
        return self.store is not None and self.schedule.started

    @property
    def num_updates(self) -> int:
        return self.schedule.num_updates

    @contextlib.contextmanager
    def ema_weights(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Runs the block with the EMA weights in the model, swapped in place (no copy where dtypes match).

        Re-entrant; the weights that were in the model before are back afterwards, also when the block raises.
        Before averaging starts the block runs on the training weights (logged once).
        """
        model = self._resolve(model)
        if not self.started:
            if not self._told_not_started:
                logger.info("EMA averaging has not started yet; using the training weights.")
                self._told_not_started = True
            yield model
            return
        if self.store.ema_in_model:
            yield model
            return
        self.store.swap_in(model)
        try:
            yield model
        finally:
            if self.store.ema_in_model:
                self.store.swap_out(model)

    @contextlib.contextmanager
    def training_weights(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Runs the block with the training weights in the model (swapped in place), restoring what was there."""
        model = self._resolve(model)
        if not self.started or not self.store.ema_in_model:
            yield model
            return
        self.store.swap_out(model)
        try:
            yield model
        finally:
            if not self.store.ema_in_model:
                self.store.swap_in(model)

    def ema_model(self, model: nn.Module | None = None) -> nn.Module:
        """A new, independent module holding the EMA weights (the training weights before averaging starts)."""
        model = self._resolve(model)
        self._refuse_copy_of_zero3("ema_model()", "ema_weights()")
        copied = copy.deepcopy(model)
        if self.started:
            self.store.copy_ema_to(copied, model)
        return copied

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
        self._window = False
        if self.store is not None and self.model is not None:
            self.store.swap_out(self.model)

    def save_state(self, checkpoint_dir: str, args: TrainingArguments, state: TrainerState) -> str | None:
        """Writes the EMA state for the checkpoint of `state.global_step` into `checkpoint_dir`.

        Every rank must call it. Whole tensors (one device, DDP, ZeRO-1/2) go into `ema_state.safetensors`, written by
        the main process; sharded ones (FSDP2, ZeRO-3) into the `ema_state/` folder, each rank writing its own shards
        with torch.distributed.checkpoint. Returns the path written on the main process, else None (also when it was
        written for this step already).
        """
        if self._sidecar_step == state.global_step:
            return None
        self._sidecar_step = state.global_step
        holds_ema = self.started and self.ema_args.ema_checkpoint_weights == "ema"
        self._check_finite(state, f"The checkpoint in {checkpoint_dir} was not given EMA state")
        if self._sharded or (self.started and self.store.sharded):
            # One process finishes the folder (a rename), on a filesystem all ranks share, as DCP needs: the global
            # main process, also with save_on_each_node.
            meta = self._sidecar_meta(state, holds_ema) if args.process_index == 0 else None
            tensors = self.store.sharded_state(self.model, holds_ema) if self.started else {}
            return save_sharded_sidecar(checkpoint_dir, meta, tensors)
        if not args.should_save:
            return None
        meta = self._sidecar_meta(state, holds_ema)
        ema = self.store.ema_tensors(self.model) if self.started else {}
        training = self.store.training_tensors(self.model) if holds_ema else None
        return save_sidecar(checkpoint_dir, meta, ema, training)

    def _sidecar_meta(self, state: TrainerState, holds_ema: bool) -> dict:
        return {
            "hf_ema_version": __version__,
            "global_step": state.global_step,
            "schedule": self.schedule.state_dict(),
            "ema_args": self.ema_args.to_dict(),
            "model_files": "ema" if holds_ema else "training",
            "fingerprint": self.store.fingerprint() if self.started else None,
            "flat_names": self.store.flat_names if self.started else [],
        }

    # ---- Trainer hooks ----

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.store is not None and self.store.ema_in_model:
            if state.global_step > 0 or model is not self.model:
                self.store.discard_swap()  # the model was reloaded or replaced; what it held is gone
            else:
                self.store.swap_out(self.model)  # a second train(): continue from the training weights
        self.model = model
        if self.store is not None:
            self.store.close()
        self.store, self._window, self._sidecar_step = None, False, None
        self.schedule = self._new_schedule()
        self._check_units(args, state)
        self._sharded = self._check_backend(args, model) == "sharded"
        if state.global_step > 0:
            self._resume(args, state, model)
        elif self.schedule.starts_at_zero:
            self._start(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_window()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._close_window()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.store is not None:
            self.store.fence()  # an offloaded update's copies must be out before the weights change

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._close_window()
        if getattr(optimizer, "step_was_skipped", False):
            logger.debug("Optimizer step %d was skipped (fp16 overflow); the EMA is not updated.", state.global_step)
        else:
            self._advance(args, state)
        self._open_window(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._close_window()
        self._advance(args, state)  # at most one action per step: a no-op when on_step_end already acted
        self._open_window(args, state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        # Keep the EMA in for a checkpoint that follows; with save_strategy="best" the Trainer decides after this
        # hook, so the weights go back at the next hook instead (on_save, on_step_begin, ...).
        if self._window and not (self._checkpoint_wants_ema() and control.should_save) and not _is_best(args):
            self._close_window()

    def on_save(self, args, state, control, **kwargs):
        self._write_checkpoint_state(args, state)
        self._close_window()

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
            self._window = False
            self._load_best(args, state, model)
        else:
            self._close_window()
        if self.started:
            self._check_finite(state, "The EMA weights were not put into the model; it holds the training weights")
            self.store.swap_in(model)  # what the user does next (save, push, evaluate) uses the EMA

    # ---- internals ----

    def _new_schedule(self) -> EMASchedule:
        a = self.ema_args
        return EMASchedule(
            update_interval=a.update_interval_time,
            ema_start=a.ema_start_time,
            half_life=a.half_life_time,
            smoothing=a.smoothing,
        )

    def _resolve(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise RuntimeError("EMACallback has no model yet: pass `model`, or call this after `trainer.train()`.")
        return model

    def _check_backend(self, args: TrainingArguments, model: nn.Module) -> str:
        config = deepspeed_config(args)
        layout = check_backend(model, config)
        zero = (config or {}).get("zero_optimization") or {}
        gathers = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save"))
        if zero.get("stage") == 3 and not gathers and not self._managed_by_trainer:
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

    def _new_store(self, model: nn.Module) -> ShadowStore:
        if self.store is not None:
            self.store.close()
        a = self.ema_args
        return ShadowStore(model, a.ema_dtype, device=a.ema_device, buffers=a.ema_buffers)

    def _start(self, args: TrainingArguments, state: TrainerState) -> None:
        self.store = self._new_store(self.model)
        self.schedule.start(self._clock(args, state), state.global_step)
        if args.should_log:
            logger.info(
                "EMA started at step %d: %d tensors, %d elements, %.1f MiB of averages.",
                state.global_step,
                len(self.store.names()),
                self.store.numel(),
                self.store.nbytes() / 2**20,
            )

    def _advance(self, args: TrainingArguments, state: TrainerState) -> None:
        before = self.schedule.state_dict() if self.ema_args.ema_skip_non_finite else None
        action = self.schedule.step(self._clock(args, state), state.global_step)
        if isinstance(action, float) and before is not None:
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
        """Raises if the average holds NaN or Inf (on any rank's shards): one host sync, at checkpoints and the end."""
        if not self.started:
            return
        ema = self.store.ema_tensors(self.model)
        bad = self._on_any_rank(first_non_finite(list(ema), list(ema.values())))
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

    def _open_window(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        if not self.started:
            return
        if control.should_evaluate or (control.should_save and self._checkpoint_wants_ema()):
            self.store.swap_in(self.model)
            self._window = True
        if control.should_save and not self._managed_by_trainer:
            # Before the Trainer writes the model files, hub pushes or rotation: a crash leaves no checkpoint
            # whose EMA state is missing. (With hyper-parameter search the folder differs; on_save writes it then.)
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if state.trial_name is None:
                self.save_state(folder, args, state)

    def _close_window(self) -> None:
        if self._window:
            self._window = False
            self.store.swap_out(self.model)

    def _write_checkpoint_state(self, args: TrainingArguments, state: TrainerState) -> None:
        # Called on every rank (sharded averages are gathered); the main process writes. Hyper-parameter search
        # trials save under output_dir/run-<id>/, a folder callbacks are not told: EMATrainer writes those itself.
        if state.trial_name is not None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.save_state(folder, args, state)

    def _checkpoint_folder(self, args: TrainingArguments, state: TrainerState) -> str:
        if self.resume_from_checkpoint is not None:
            return os.fspath(self.resume_from_checkpoint)
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _resume(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        folder = self._checkpoint_folder(args, state)
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
        # A folder written sharded (FSDP2, ZeRO-3) or whole; either loads into either layout, at any world size.
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
                "The EMA settings differ from those in %s (%s now, %s then); the average continues with the new "
                "settings.",
                path,
                self.ema_args.to_dict(),
                meta.get("ema_args"),
            )
        schedule = self._new_schedule()
        schedule.load_state_dict(meta["schedule"])
        if not schedule.started:
            self.schedule, self.store = schedule, None
            return
        store = self._new_store(model)
        check_fingerprint(path, store.fingerprint(), meta["fingerprint"])
        with_training = meta["model_files"] == "ema"
        if sharded:
            saved_flat = meta.get("flat_names", [])
            tensors = store.empty_sharded_state(model, with_training, saved_flat)
            load_sharded_tensors(folder, tensors)
            store.load_sharded_(model, tensors, saved_flat)
        else:
            if with_training and sidecar.training is None:
                raise EMAStateError(f"{path} says the model files hold EMA weights but has no training weights.")
            store.load_state_(model, sidecar.ema, sidecar.training if with_training else None)
        self.schedule, self.store = schedule, store

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


def deepspeed_config(args: TrainingArguments) -> dict | None:
    """The DeepSpeed config the Trainer trains with (its "auto" values filled in), or None without DeepSpeed."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if config is None and isinstance(getattr(args, "deepspeed", None), dict):
        config = args.deepspeed
    return config


def _is_best(args: TrainingArguments) -> bool:
    return str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
