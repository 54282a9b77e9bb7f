"""EMATrainer: a Trainer whose every manual call (evaluate, predict, save, push) uses the EMA weights.

A thin layer over `EMACallback`: the callback does the averaging, checkpoint state and resume; the overrides here
wrap the Trainer's public calls so they run under the EMA weights, and resolve the resume path for the callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import EMAArguments
from .callback import EMACallback

EMA_TAGS = ["hf-ema", "ema"]

logger = logging.getLogger(__name__)


class EMATrainer(Trainer):
    """A `transformers.Trainer` that keeps an exponential moving average (EMA) of the model weights and uses it.

    `evaluate()` and `predict()` run on the EMA weights once averaging has started; `save_model()`, checkpoints and
    `push_to_hub()` write them (checkpoints also hold `ema_state.safetensors` so that resuming is exact). The training
    weights are back in the model after each such call, bit for bit, also when the call raises. After `train()` the
    model holds the EMA weights; `training_model` gives the training weights, and `train()` again continues from them.

    Args:
        ema_args (`EMAArguments`, *optional*): the EMA settings; defaults to `EMAArguments()` (half-life 1000ba).
        *args, **kwargs: passed to `transformers.Trainer`.

    Example:

    ```python
    from hf_ema import EMAArguments, EMATrainer

    trainer = EMATrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         ema_args=EMAArguments(half_life="1000ba"))
    trainer.train()
    trainer.evaluate()      # EMA weights
    trainer.save_model()    # EMA weights
    raw = trainer.training_model
    ```
    """

    def __init__(self, *args: Any, ema_args: EMAArguments | None = None, **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        given = [cb for cb in callbacks if isinstance(cb, EMACallback)]
        if len(given) > 1:
            raise ValueError("EMATrainer got several EMACallback instances in `callbacks`; pass at most one.")
        if given and ema_args is not None:
            raise ValueError(
                "EMATrainer got both `ema_args` and an EMACallback in `callbacks`; pass the settings one way only."
            )
        callback = given[0] if given else EMACallback(ema_args)
        callback._managed_by_trainer = True
        if not given:
            callbacks.append(callback)
        self._ema_callback = callback
        self._ema_in_checkpoint = False
        self._ema_pending_log: dict[str, float] = {}
        self._ema_told_zero3_gather = False
        super().__init__(*args, callbacks=callbacks, **kwargs)

    # ---- access to both sets of weights ----

    @property
    def ema_callback(self) -> EMACallback:
        return self._ema_callback

    @property
    def ema_args(self) -> EMAArguments:
        return self._ema_callback.ema_args

    @property
    def ema_model(self) -> nn.Module:
        """A new, independent module holding the EMA weights (the training weights before averaging starts)."""
        return self._ema_callback.ema_model(self.model)

    @property
    def training_model(self) -> nn.Module:
        """A new, independent module holding the training weights."""
        return self._ema_callback.training_model(self.model)

    def ema_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with the EMA weights in `self.model`, swapped in place."""
        return self._ema_callback.ema_weights(self.model)

    def training_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager: the block runs with the training weights in `self.model`, swapped in place."""
        return self._ema_callback.training_weights(self.model)

    # ---- training ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        self._ema_callback.resume_from_checkpoint = path if isinstance(path, (str, os.PathLike)) else None
        # A second train() continues from the training weights: put them back before any callback looks.
        self._ema_callback.restore_training_weights()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._ema_callback.restore_training_weights()  # an evaluation or save raised mid-window
            raise

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The sidecar goes in first, so the checkpoint is never pushed, rotated or left by a crash without it. The
        # whole save runs under the weights the model files should hold: with FSDP's SHARDED_STATE_DICT the model
        # is written by the optimizer-state path, not save_model.
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._ema_callback.save_state(folder, self.args, self.state)
        self._ema_in_checkpoint = True
        try:
            with self._weights_to_save():
                super()._save_checkpoint(model, trial)
        finally:
            self._ema_in_checkpoint = False

    # ---- evaluation ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if isinstance(eval_dataset if eval_dataset is not None else self.eval_dataset, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # calls back here per dataset
        training_metrics: dict[str, float] = {}
        if self.ema_args.ema_eval_training_weights and self._ema_callback.started:
            with self.training_weights():
                training_metrics = self._evaluate_training_weights(eval_dataset, ignore_keys, metric_key_prefix)
        self._ema_pending_log = training_metrics  # merged into the evaluation's own log line
        try:
            with self.ema_weights():
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._ema_pending_log = {}
        return {**metrics, **training_metrics}

    def _evaluate_training_weights(self, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict[str, float]:
        dataloader = self.get_eval_dataloader(eval_dataset)
        output = self.evaluation_loop(
            dataloader,
            description="Evaluation (training weights)",
            prediction_loss_only=True if self.compute_metrics is None else None,
            ignore_keys=ignore_keys,
            metric_key_prefix=f"{metric_key_prefix}_training",
        )
        return dict(output.metrics)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._ema_pending_log:
            logs = {**logs, **self._ema_pending_log}
            self._ema_pending_log = {}
        super().log(logs, *args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with self.ema_weights():
            return super().predict(*args, **kwargs)

    # ---- saving ----

    @contextlib.contextmanager
    def _weights_to_save(self) -> Iterator[None]:
        if self._ema_in_checkpoint and self.ema_args.ema_checkpoint_weights == "training":
            with self.training_weights():
                yield
        else:
            with self.ema_weights():
                yield

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        with self._weights_to_save(), self._zero3_gathers_on_save():
            super().save_model(*args, **kwargs)

    @contextlib.contextmanager
    def _zero3_gathers_on_save(self) -> Iterator[None]:
        """Under DeepSpeed ZeRO-3, gathers the weights into model files even without
        stage3_gather_16bit_weights_on_model_save.

        Without it the Trainer writes only a DeepSpeed checkpoint, whose weights (zero_to_fp32.py) are the optimizer's
        training weights: the EMA would be silently missing from the saved model. The gather is DeepSpeed's own
        (`_zero3_consolidated_16bit_state_dict`, one parameter at a time, onto rank 0).
        """
        engine = self.model_wrapped if self.is_deepspeed_enabled else None
        zero = getattr(getattr(engine, "_config", None), "zero_config", None)
        if zero is None or zero.stage != 3 or zero.gather_16bit_weights_on_model_save:
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
        with self._weights_to_save():
            super()._save(*args, **kwargs)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        tags = kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + [t for t in EMA_TAGS if t not in tags]
        with self.ema_weights():
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
        a = self.ema_args
        scale = f"half-life `{a.half_life}`" if a.half_life is not None else f"smoothing `{a.smoothing}`"
        started = self._ema_callback.started
        weights = (
            "The weights in this repository are the **exponential moving average (EMA)** of the training weights"
            if started
            else "EMA was configured but had not started when these weights were saved; they are the training weights"
        )
        return (
            "\n## Exponential moving average\n\n"
            f"{weights}, kept with [hf-ema](https://pypi.org/project/hf-ema/): {scale}, update interval "
            f"`{a.update_interval_time}`, start `{a.ema_start}`, average dtype `{a.ema_dtype}`, "
            f"{self._ema_callback.num_updates} updates.\n"
        )
