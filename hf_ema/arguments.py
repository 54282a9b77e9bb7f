"""EMAArguments: the EMA settings, parsed by `HfArgumentParser` next to `TrainingArguments`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from .time import Time, parse_time

DEFAULT_HALF_LIFE = "1000ba"
EMA_DTYPES = ("auto", "float32", "same")
CHECKPOINT_WEIGHTS = ("ema", "training")
RESUME_WITHOUT_STATE = ("error", "restart")
BUFFERS = ("average", "copy")


@dataclass
class EMAArguments:
    """Settings of the exponential moving average of the model weights.

    The average follows `ema = s * ema + (1 - s) * w` at every update. Give the time scale as a `half_life` (the time
    after which an old term's weight has halved; `s = 2 ** (-elapsed / half_life)`) or as a fixed `smoothing` per
    update. Time strings are `<number><unit>` with units `ba` (optimizer steps), `ep` (epochs), `sp` (samples), `tok`
    (input tokens; needs `include_num_input_tokens_seen`) and `dur` (fraction of the run, 0..1).

    Args:
        half_life (`str`, *optional*, defaults to `"1000ba"` when `smoothing` is not given):
            Half-life of the average, e.g. `"1000ba"`, `"2ep"`, `"0.05dur"`.
        smoothing (`float`, *optional*):
            Fixed smoothing per update in (0, 1), instead of `half_life`. Not rescaled when `update_interval` changes.
        update_interval (`str`, *optional*):
            How often the average is updated. Defaults to 1 of half_life's unit (`"1ba"` for a `dur` half-life) or to
            `"1ba"` with `smoothing`. With `half_life`, a longer interval keeps the same time constant.
        ema_start (`str`, *optional*, defaults to `"0.0dur"`):
            When averaging begins. At the start the average is set to the current weights; before it, evaluation and
            saving use the training weights.
        ema_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the average: `"auto"` keeps float32 averages of 16-bit floating-point tensors and the tensor's
            dtype otherwise, `"float32"` keeps every average in float32, `"same"` uses each tensor's own dtype.
        ema_eval_training_weights (`bool`, *optional*, defaults to `False`):
            With `EMATrainer`, also evaluate the training weights and log their metrics under `eval_training_*` in the
            same log line. Best-model selection and early stopping follow the EMA metrics.
        ema_checkpoint_weights (`str`, *optional*, defaults to `"ema"`):
            Which weights the model files of checkpoints hold: `"ema"` (as Composer) or `"training"`. The other set is
            kept in the checkpoint's `ema_state.safetensors` either way, so resuming is exact.
        ema_resume_without_state (`str`, *optional*, defaults to `"error"`):
            What resuming from a checkpoint that has no EMA state does: `"error"` refuses, `"restart"` starts a
            fresh average from the loaded weights (on purpose, with a warning).
        ema_buffers (`str`, *optional*, defaults to `"average"`):
            Floating-point buffers (BatchNorm running statistics): `"average"` them like parameters, or `"copy"` the
            training model's current values into the EMA weights. Integer buffers are always copied.
        ema_device (`str`, *optional*):
            Where the averages live: the parameters' device by default, or `"cpu"` to keep them in (pinned) host
            memory, for models whose average does not fit on the accelerator. Updates then copy the weights to the
            host without blocking and average on a background thread.
        ema_skip_non_finite (`bool`, *optional*, defaults to `False`):
            Check the training weights before each update and skip the update (with a warning) when any is NaN or
            infinite. Costs one host synchronisation per update. Without it, a non-finite average is refused with an
            error when a checkpoint is written or training ends, never saved silently.

    Example:

    ```python
    from transformers import HfArgumentParser, TrainingArguments
    from hf_ema import EMAArguments

    training_args, ema_args = HfArgumentParser((TrainingArguments, EMAArguments)).parse_args_into_dataclasses()
    ema_args = EMAArguments(half_life="500ba", update_interval="10ba")
    ```
    """

    half_life: str | None = field(
        default=None,
        metadata={
            "help": "Half-life of the average as a time string ('1000ba', '2ep', '0.05dur'). Defaults to '1000ba' "
            "unless `smoothing` is given."
        },
    )
    smoothing: float | None = field(
        default=None,
        metadata={"help": "Fixed smoothing per update in (0, 1), instead of `half_life`."},
    )
    update_interval: str | None = field(
        default=None,
        metadata={
            "help": "How often the average is updated ('1ba', '10ba', '1ep'). Defaults to 1 of half_life's unit "
            "('1ba' for a 'dur' half-life, or with `smoothing`)."
        },
    )
    ema_start: str = field(
        default="0.0dur",
        metadata={"help": "When averaging begins ('0.0dur' = at the start of training, '500ba', '0.5dur')."},
    )
    ema_dtype: Literal["auto", "float32", "same"] = field(
        default="auto",
        metadata={
            "help": "Dtype of the average: 'auto' (float32 for 16-bit float tensors), 'float32', or 'same' (the "
            "tensor's own dtype)."
        },
    )
    ema_eval_training_weights: bool = field(
        default=False,
        metadata={"help": "With EMATrainer, also evaluate the training weights and log them as eval_training_*."},
    )
    ema_checkpoint_weights: Literal["ema", "training"] = field(
        default="ema",
        metadata={"help": "Which weights checkpoints' model files hold: 'ema' or 'training'."},
    )
    ema_resume_without_state: Literal["error", "restart"] = field(
        default="error",
        metadata={
            "help": "Resuming from a checkpoint without EMA state: 'error' refuses, 'restart' starts a fresh "
            "average from the loaded weights."
        },
    )

    ema_buffers: Literal["average", "copy"] = field(
        default="average",
        metadata={"help": "Floating-point buffers (BatchNorm stats): 'average' them, or 'copy' the current values."},
    )
    ema_device: str | None = field(
        default=None,
        metadata={"help": "Where the averages live: the parameters' device (default) or 'cpu' (pinned host memory)."},
    )
    ema_skip_non_finite: bool = field(
        default=False,
        metadata={
            "help": "Skip (with a warning) updates whose training weights hold NaN or Inf; costs one host sync per "
            "update. Without it a non-finite average raises when a checkpoint is written or training ends."
        },
    )

    def __post_init__(self) -> None:
        # Normalise: HfArgumentParser hands strings; an empty string means "not given" only for optional fields.
        if isinstance(self.smoothing, str):
            try:
                self.smoothing = float(self.smoothing)
            except ValueError:
                raise ValueError(
                    f"`smoothing` must be a number in (0, 1), got {self.smoothing!r}. Use e.g. smoothing=0.999."
                ) from None
        # Validate.
        if self.half_life is not None and self.smoothing is not None:
            raise ValueError(
                f"`half_life` and `smoothing` both set (half_life={self.half_life!r}, smoothing={self.smoothing!r}); "
                "they are two ways to give the same time scale. Pass only one of them."
            )
        if self.smoothing is not None:
            if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, (int, float)):
                raise TypeError(
                    f"`smoothing` must be a float in (0, 1), got {self.smoothing!r} of type "
                    f"{type(self.smoothing).__name__}. Use e.g. smoothing=0.999."
                )
            if not (math.isfinite(self.smoothing) and 0.0 < self.smoothing < 1.0):
                raise ValueError(
                    f"`smoothing` must be in the open interval (0, 1), got {self.smoothing!r}. Use e.g. "
                    "smoothing=0.999, or give a `half_life` such as '1000ba'."
                )
            self.smoothing = float(self.smoothing)
        elif self.half_life is None:
            self.half_life = DEFAULT_HALF_LIFE
        if self.half_life is not None:
            parse_time(self.half_life, "half_life")
        if self.update_interval is not None:
            parse_time(self.update_interval, "update_interval")
        parse_time(self.ema_start, "ema_start", allow_zero=True)
        _check_choice("ema_dtype", self.ema_dtype, EMA_DTYPES)
        _check_choice("ema_checkpoint_weights", self.ema_checkpoint_weights, CHECKPOINT_WEIGHTS)
        _check_choice("ema_resume_without_state", self.ema_resume_without_state, RESUME_WITHOUT_STATE)
        _check_choice("ema_buffers", self.ema_buffers, BUFFERS)
        if self.ema_device is not None and self.ema_device != "cpu":
            raise ValueError(
                f"`ema_device` must be None (the parameters' device) or 'cpu', got {self.ema_device!r}. Use "
                "ema_device='cpu' to keep the average in host memory."
            )
        for name in ("ema_eval_training_weights", "ema_skip_non_finite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")

    @property
    def half_life_time(self) -> Time | None:
        """`half_life` parsed, or None when `smoothing` is used."""
        return parse_time(self.half_life, "half_life") if self.half_life is not None else None

    @property
    def update_interval_time(self) -> Time:
        """`update_interval` parsed, with its default filled in."""
        if self.update_interval is not None:
            return parse_time(self.update_interval, "update_interval")
        half_life = self.half_life_time
        if half_life is None or half_life.unit == "dur":
            return Time(1.0, "ba")
        return Time(1.0, half_life.unit)

    @property
    def ema_start_time(self) -> Time:
        return parse_time(self.ema_start, "ema_start", allow_zero=True)

    def units(self) -> set[str]:
        """Every time unit these settings use."""
        times = [self.half_life_time, self.update_interval_time, self.ema_start_time]
        return {t.unit for t in times if t is not None and (t is not self.ema_start_time or t.value > 0)}

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}. Pick one of those.")
