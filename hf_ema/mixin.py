"""EMAMixin: the overrides that make every manual Trainer call use the EMA, for any Trainer subclass.

A thin layer over `EMACallback`: the callback does the averaging, checkpoint state and resume, and owns what the model
holds (`callback.placement`); the overrides here wrap the Trainer's public calls in implicit placements, evaluate the
other averages and the training weights inside the same evaluation, and resolve the resume path for the callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import BEMA_LABEL, EMAArguments
from .callback import EMACallback
from .core import tracked_tensors
from .placement import TRAINING, Target

EMA_TAGS = ["hf-ema", "ema"]

logger = logging.getLogger(__name__)


def _is_ema_callback(callback: Any) -> bool:
    return isinstance(callback, EMACallback) or (isinstance(callback, type) and issubclass(callback, EMACallback))


class EMAMixin:
    """Mix into any `transformers.Trainer` subclass, before it, to keep EMAs of the weights and use them.

    `evaluate()` and `predict()` run on the primary average once averaging has started (the other averages and, with
    `ema_eval_training_weights`, the training weights are evaluated in the same evaluation and logged as
    `eval_ema_<label>_*` and `eval_training_*`); `save_model()`, checkpoints and `push_to_hub()` write the primary
    average. The training weights are back in the model after each such call, bit for bit, also when the call raises.
    Inside `with trainer.training_weights():` or `with trainer.ema_weights(label):` those calls use what the block
    placed instead. After `train()` the model holds the primary average; `training_model` gives the training weights,
    and `train()` again continues from them.

    Args:
        ema_args (`EMAArguments`, *optional*): the EMA settings; defaults to `EMAArguments()` (half-life 1000ba).
        *args, **kwargs: passed to the Trainer class mixed with.

    Example:

    ```python
    from transformers import Seq2SeqTrainer
    from hf_ema import EMAArguments, EMAMixin

    class EMASeq2SeqTrainer(EMAMixin, Seq2SeqTrainer):
        pass

    trainer = EMASeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                ema_args=EMAArguments(half_life=["500ba", "2000ba"]))
    trainer.train()
    trainer.evaluate(max_new_tokens=32)  # eval_* of 500ba, eval_ema_2000ba_* of 2000ba, same generation settings
    ```
    """

    def __init__(self, *args: Any, ema_args: EMAArguments | None = None, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        given = [cb for cb in callbacks if _is_ema_callback(cb)]
        if len(given) > 1:
            raise ValueError(
                f"{type(self).__name__} got {len(given)} EMACallbacks in `callbacks`; one callback keeps several "
                "averages. Pass ema_args=EMAArguments(half_life=['500ba', '2000ba']) and no EMACallback."
            )
        if given and ema_args is not None:
            raise ValueError(
                f"{type(self).__name__} got both `ema_args` and an EMACallback in `callbacks`; pass the settings one "
                "way only (ema_args=EMAArguments(...))."
            )
        callback = given[0] if given else EMACallback(ema_args)
        if isinstance(callback, type):
            callback = callback()
        callback.bind(self)
        # Last, so that it sees the evaluate/save flags every other callback set at the end of a step.
        callbacks = [cb for cb in callbacks if not _is_ema_callback(cb)] + [callback]
        self._ema_callback = callback
        self._ema_evaluating = 0  # open evaluate() calls: their evaluation loop also runs the other weights
        self._ema_in_passes = False
        self._ema_told_zero3_gather = False
        self._ema_reference_checked = False
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._ema_reference: dict[str, Any] | None = None  # the reference model's tensors, with ema_reference
        if callback.ema_args.ema_reference is not None:
            self._ema_reference = self._ema_reference_tensors()  # refuses now what cannot hold the average
            callback.after_averages_move = self._ema_sync_reference

    def add_callback(self, callback: Any) -> None:
        if _is_ema_callback(callback):
            raise ValueError(
                f"{type(self).__name__} already keeps an EMA; a second EMACallback would place its average into the "
                "same model and corrupt the training weights. Keep several averages in one: "
                "ema_args=EMAArguments(half_life=['500ba', '2000ba']) (or smoothing=[...], sigma_rel=[...])."
            )
        super().add_callback(callback)
        self.callback_handler.remove_callback(self._ema_callback)  # keep the EMA callback last
        self.callback_handler.add_callback(self._ema_callback)

    # ---- access to the weights ----

    @property
    def ema_callback(self) -> EMACallback:
        return self._ema_callback

    @property
    def ema_args(self) -> EMAArguments:
        return self._ema_callback.ema_args

    @property
    def ema_model(self) -> nn.Module:
        """A new, independent module holding the primary average (the training weights before averaging starts)."""
        return self._ema_callback.ema_model(self.model)

    @property
    def ema_models(self) -> dict[str, nn.Module]:
        """`{label: independent module}` for every average, primary first."""
        return self._ema_callback.ema_models(self.model)

    @property
    def training_model(self) -> nn.Module:
        """A new, independent module holding the training weights."""
        return self._ema_callback.training_model(self.model)

    def ema_weights(self, label: str | None = None) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with an average (the primary by default) in `self.model`, in place; the
        Trainer calls in the block (`evaluate`, `predict`, `save_model` ...) use it."""
        return self._ema_callback.ema_weights(self.model, label=label)

    def training_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with the training weights in `self.model`, in place; the Trainer calls in
        the block (`evaluate`, `predict`, `save_model` ...) use them. The way to evaluate the training weights after
        training."""
        return self._ema_callback.training_weights(self.model)

    def _ema_implicit(self, training: bool = False) -> contextlib.AbstractContextManager[None]:
        """The placement a wrapper asks for: the primary average (or the training weights)."""
        callback = self._ema_callback
        if not training:
            callback.note_if_not_started()
        return callback.placement.holding(TRAINING if training else callback.placement.primary, explicit=False)

    # ---- the DPO reference model (`ema_reference`) ----

    def _ema_reference_tensors(self) -> dict[str, Any]:
        """The reference model's tensors by the names the policy's average has, refusing a trainer whose reference
        cannot hold that average."""
        a = self.ema_args
        setting = f"EMAArguments(ema_reference={a.ema_reference!r})"
        if getattr(self.args, "sync_ref_model", False):
            raise ValueError(
                f"{setting} and {type(self.args).__name__}(sync_ref_model=True) would both write the reference model. "
                "Set sync_ref_model=False: the average replaces TRL's soft update (ref_model_mixup_alpha=a every "
                "ref_model_sync_steps=k is smoothing=1 - a, update_interval='<k>ba')."
            )
        reference = getattr(self, "ref_model", None)
        if reference is None:
            if not hasattr(self, "ref_model"):
                why = f"{type(self).__name__} has no reference model (`ref_model`); ema_reference is for DPOTrainer"
            elif getattr(self.args, "precompute_ref_log_probs", False):
                why = (
                    "precompute_ref_log_probs=True computes the reference's log-probabilities once, before training, "
                    "so a reference that follows the policy cannot be used; set precompute_ref_log_probs=False"
                )
            else:
                why = (
                    "the trainer keeps no reference model (with a PEFT model, DPOTrainer disables the adapter "
                    "instead); train the full model and pass ref_model=copy.deepcopy(model)"
                )
            raise ValueError(f"{setting} needs a reference model to hold the average: {why}.")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{setting} is not supported with DeepSpeed or FSDP (the reference model is sharded or wrapped there, "
                "untested); train without them (one device; DDP is allowed, untested), or drop ema_reference."
            )
        policy = self.accelerator.unwrap_model(self.model)
        reference = self.accelerator.unwrap_model(reference)
        theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
        ours = {n: t for n, t, kind in tracked_tensors(policy, buffers=a.ema_buffers) if kind == "average"}
        wrong = [n for n, t in ours.items() if n not in theirs or theirs[n].shape != t.shape]
        if wrong:
            raise ValueError(
                f"{setting}: the reference model ({type(reference).__name__}) lacks tensors the policy averages, or "
                f"holds them in other shapes ({wrong[:3]}{' ...' if len(wrong) > 3 else ''}); the reference must be a "
                "copy of the policy's architecture. Pass ref_model=copy.deepcopy(model)."
            )
        return {n: theirs[n] for n in ours}

    def _ema_sync_reference(self) -> None:
        """Copies the `ema_reference` average into the reference model (after the averages start, load or update)."""
        callback = self._ema_callback
        reference = self._ema_reference
        callback.store.copy_ema_to(self.ref_model, callback.model, self.ema_args.ema_reference, tensors=reference)

    def _ema_check_reference_starts_as_policy(self) -> None:
        """A fresh run's reference model must equal the policy: the average starts from the policy's weights and
        replaces the reference at the start of averaging."""
        policy = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        policy |= dict(self.accelerator.unwrap_model(self.model).named_buffers())
        for name, theirs in self._ema_reference.items():
            ours = policy[name].detach().to(device=theirs.device, dtype=theirs.dtype)
            if not torch.equal(ours, theirs):
                difference = float((ours.double() - theirs.detach().double()).abs().max())
                raise ValueError(
                    f"EMAArguments(ema_reference={self.ema_args.ema_reference!r}) starts the reference from the "
                    f"policy's weights, but the ref_model given differs from the policy ({name!r} by up to "
                    f"{difference:.3g}); hf-ema would replace it when averaging starts. Pass "
                    "ref_model=copy.deepcopy(model) (TR-DPO starts both from the same model), or drop ema_reference "
                    "to keep a fixed reference."
                )

    # ---- training ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        self._ema_callback.resume_from_checkpoint = path if isinstance(path, (str, os.PathLike)) else None
        # A hyper-parameter search trial's checkpoints go into the Trainer's folder for it; its EMA files go there too.
        self._ema_callback.trial_output_dir = self._get_output_dir(trial=trial) if trial is not None else None
        # A second train() continues from the training weights: put them back before any callback looks.
        self._ema_callback.restore_training_weights()
        if self.ema_args.ema_reference is not None:
            self._ema_reference = self._ema_reference_tensors()  # once per train(): the models may be replaced
            if not self._ema_reference_checked and not path:
                self._ema_check_reference_starts_as_policy()
        self._ema_reference_checked = True
        try:
            return super().train(resume_from_checkpoint, trial, *args, **kwargs)
        except BaseException:
            self._ema_callback.restore_training_weights()  # an evaluation or save raised mid-window
            raise

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The EMA state goes in first, so the checkpoint is never pushed, rotated or left by a crash without it. The
        # whole save runs under the weights the model files should hold: with FSDP's SHARDED_STATE_DICT the model
        # is written by the optimizer-state path, not save_model.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with self._ema_implicit(training=self.ema_args.ema_checkpoint_weights == "training"):
            self._ema_callback.save_state(folder, self.args, self.state)
            super()._save_checkpoint(model, trial)

    # ---- evaluation ----

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._ema_evaluating += 1
        try:
            with self._ema_implicit():
                return super().evaluate(*args, **kwargs)
        finally:
            self._ema_evaluating -= 1

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        prefix = kwargs.pop("metric_key_prefix", "eval")
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix=prefix, **kwargs
        )
        # Inside evaluate() (not predict()), the same loop with the same settings (a Seq2SeqTrainer's generation
        # arguments included) runs on the other weights; their metrics join this evaluation's, so one log line and
        # one on_evaluate carry them all, and metric_for_best_model may name any of them.
        passes = self._ema_other_passes(prefix)
        if not passes:
            return output
        self._ema_in_passes = True  # the passes run this loop again: no passes of their own
        try:
            for target, key_prefix in passes:
                with self._ema_callback.placement.visiting(target):
                    other = super().evaluation_loop(
                        dataloader,
                        f"{description} ({'training weights' if target is TRAINING else f'EMA {target}'})",
                        prediction_loss_only,
                        ignore_keys,
                        metric_key_prefix=key_prefix,
                        **kwargs,
                    )
                output.metrics.update(other.metrics)
        finally:
            self._ema_in_passes = False
        return output

    def _ema_other_passes(self, prefix: str) -> list[tuple[Target, str]]:
        callback = self._ema_callback
        if not self._ema_evaluating or self._ema_in_passes or not callback.started or callback.placement.explicit:
            return []
        passes: list[tuple[Target, str]] = []
        if not (callback.training and self.ema_args.ema_eval_during_training == "primary"):
            passes += [(label, f"{prefix}_ema_{label}") for label in self.ema_args.placed_labels[1:]]
        if self.ema_args.ema_eval_training_weights and callback.placement.primary is not TRAINING:
            passes.append((TRAINING, f"{prefix}_training"))
        return passes

    def predict(self, *args: Any, **kwargs: Any):
        with self._ema_implicit():
            return super().predict(*args, **kwargs)

    # ---- saving ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, **kwargs: Any) -> None:
        with self._ema_implicit(), self._zero3_gathers_on_save():
            super().save_model(output_dir, _internal_call=_internal_call, **kwargs)
            if _internal_call or not self.ema_args.ema_save_all_averages or self._ema_callback.placement.explicit:
                return
            folder = output_dir if output_dir is not None else self.args.output_dir
            for label in self.ema_args.placed_labels[1:]:
                with self._ema_callback.placement.visiting(label):
                    # _internal_call: no hub push of the extra folders
                    super().save_model(os.path.join(folder, f"ema-{label}"), _internal_call=True, **kwargs)

    @contextlib.contextmanager
    def _zero3_gathers_on_save(self) -> Iterator[None]:
        """Under DeepSpeed ZeRO-3, gathers the weights into model files even without
        stage3_gather_16bit_weights_on_model_save.

        Without it the Trainer writes only a DeepSpeed checkpoint, whose weights (zero_to_fp32.py) are the optimizer's
        training weights: the EMA would be silently missing from the saved model. The gather is DeepSpeed's own
        (`_zero3_consolidated_16bit_state_dict`, one parameter at a time, onto rank 0).
        """
        if not self.is_deepspeed_enabled or self.model_wrapped is self.model:  # no engine yet: nothing to gather
            yield
            return
        try:  # checked by name on a real engine in the DeepSpeed tests; a rename must not skip the gather silently
            zero = self.model_wrapped._config.zero_config
        except AttributeError as error:
            raise RuntimeError(
                "hf-ema reads DeepSpeed's ZeRO settings from `engine._config.zero_config`, which this DeepSpeed "
                "version does not have; saved model files could miss the EMA. Use a DeepSpeed version hf-ema "
                "supports, or report it."
            ) from error
        if zero.stage != 3 or zero.gather_16bit_weights_on_model_save:
            yield
            return
        if not self._ema_told_zero3_gather and self.is_world_process_zero():
            self._ema_told_zero3_gather = True
            logger.warning(
                "DeepSpeed ZeRO-3 runs with stage3_gather_16bit_weights_on_model_save=false; EMATrainer gathers the "
                "weights anyway so that saved model files hold the EMA (one parameter at a time onto rank 0). Set it "
                "to true to silence this."
            )
        zero.gather_16bit_weights_on_model_save = True
        try:
            yield
        finally:
            zero.gather_16bit_weights_on_model_save = False

    def _save(self, *args: Any, **kwargs: Any) -> None:
        with self._ema_implicit():
            super()._save(*args, **kwargs)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        tags = kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + [t for t in EMA_TAGS if t not in tags]
        with self._ema_implicit():
            return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if os.path.isfile(path):
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(self._ema_model_card_section())

    def _ema_model_card_section(self) -> str:
        a, callback = self.ema_args, self._ema_callback
        kind = "half-life" if a.half_life is not None else "smoothing" if a.smoothing is not None else "sigma_rel"
        warmup = f", warmup power `{a.ema_warmup_power}`" if a.ema_warmup_power is not None else ""
        holds = callback.placement.holds if callback.started else TRAINING
        if holds is TRAINING:
            weights = (
                "EMA was configured but had not started when these weights were saved; they are the training weights"
                if not callback.started
                else "These are the **training weights** (hf-ema kept an exponential moving average beside them)"
            )
        elif holds == BEMA_LABEL:
            weights = (
                "The weights in this repository are the **bias-corrected exponential moving average (BEMA**, Block & "
                "Zhang 2025) of the training weights"
            )
        else:
            weights = (
                "The weights in this repository are the **exponential moving average (EMA)** of the training "
                f"weights with {kind} `{holds}`"
            )
        others = ""
        if len(callback.labels) > 1:
            others = f" Averages kept during training: {', '.join(f'`{label}`' for label in callback.labels)}."
        if a.ema_reference is not None:
            others += f" The average `{a.ema_reference}` was the DPO reference model."
        if a.ema_switch_every is not None:
            others += (
                f" Switch-EMA: the average `{a.primary_label}` was copied into the training weights "
                f"{callback.num_switches} times (every `{a.ema_switch_every}`)."
            )
        return (
            "\n## Exponential moving average\n\n"
            f"{weights}, kept with [hf-ema](https://pypi.org/project/hf-ema/): update interval "
            f"`{a.update_interval_time}`, start `{a.ema_start}`, average dtype `{a.ema_dtype}`{warmup}, "
            f"{callback.num_updates} updates.{others}\n"
        )
