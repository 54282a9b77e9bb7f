"""EMATrainer: `EMAMixin` + `transformers.Trainer`."""

from __future__ import annotations

from transformers import Trainer

from .mixin import EMAMixin


class EMATrainer(EMAMixin, Trainer):
    """A `transformers.Trainer` that keeps exponential moving averages (EMA) of the model weights and uses them.

    `evaluate()` and `predict()` run on the primary average once averaging has started; `save_model()`, checkpoints
    and `push_to_hub()` write it (checkpoints also hold `ema_state.safetensors` with every average, so that resuming is
    exact). The training weights are back in the model after each such call, bit for bit, also when the call raises.
    After `train()` the model holds the primary average; `training_model` gives the training weights, and `train()`
    again continues from them. For another Trainer subclass, mix `EMAMixin` into it the same way.

    Args:
        ema_args (`EMAArguments`, *optional*): the EMA settings; defaults to `EMAArguments()` (half-life 1000ba).
        *args, **kwargs: passed to `transformers.Trainer`.

    Example:

    ```python
    from hf_ema import EMAArguments, EMATrainer

    trainer = EMATrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                         ema_args=EMAArguments(half_life=["1000ba", "4000ba"]))
    trainer.train()
    trainer.evaluate()      # eval_* of the primary (1000ba), eval_ema_4000ba_* of the other
    trainer.save_model()    # the primary average
    raw = trainer.training_model
    slow = trainer.ema_models["4000ba"]
    ```
    """
