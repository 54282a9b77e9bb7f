"""hf-ema: exponential moving average of model weights for the Hugging Face Trainer."""

from ._version import __version__
from .arguments import EMAArguments
from .checkpoint import EMAStateError
from .core import compute_ema
from .ema import EMA

__all__ = [
    "EMA",
    "EMAArguments",
    "EMACallback",
    "EMAMixin",
    "EMAStateError",
    "EMATrainer",
    "__version__",
    "average_checkpoints",
    "compute_ema",
]


def __getattr__(name):
    # The Trainer layers import transformers (slow); load them on first use so `compute_ema` stays light.
    if name == "EMACallback":
        from .callback import EMACallback

        return EMACallback
    if name == "average_checkpoints":  # lazily too: `python -m hf_ema.average` must find it not yet imported
        from .average import average_checkpoints

        return average_checkpoints
    if name == "EMAMixin":
        from .mixin import EMAMixin

        return EMAMixin
    if name == "EMATrainer":
        from .trainer import EMATrainer

        return EMATrainer
    raise AttributeError(f"module 'hf_ema' has no attribute {name!r}")
