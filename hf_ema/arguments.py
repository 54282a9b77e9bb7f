"""EMAArguments: the EMA settings, parsed by `HfArgumentParser` next to `TrainingArguments`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from .rules import (
    BEMA,
    FixedSmoothing,
    HalfLife,
    PowerFunction,
    Rule,
    Warmup,
    checked_sigma_rel,
    gamma_of_sigma_rel,
)
from .time import Time, parse_time

DEFAULT_HALF_LIFE = "1000ba"
EMA_DTYPES = ("auto", "float32", "same")
CHECKPOINT_WEIGHTS = ("ema", "training")
RESUME_WITHOUT_STATE = ("error", "restart")
BUFFERS = ("average", "copy")
SCHEDULES = ("hf-ema", "composer")
EVAL_DURING_TRAINING = ("all", "primary")
BEMA_LABEL = "bema"
"""The label of the BEMA average (`bema=True`)."""
BEMA_FIELDS = ("bema_ema_power", "bema_bias_power", "bema_lag", "bema_multiplier")


@dataclass
class EMAArguments:
    """Settings of the exponential moving average of the model weights.

    The average follows `ema = s * ema + (1 - s) * w` at every update. Give the time scale as a `half_life` (the time
    after which an old term's weight has halved; `s = 2 ** (-elapsed / half_life)`), as a fixed `smoothing` per
    update, or as EDM2 power-function averages by `sigma_rel`. Time strings are `<number><unit>` with units `ba`
    (optimizer steps), `ep` (epochs), `sp` (samples), `tok` (input tokens; needs `include_num_input_tokens_seen`) and
    `dur` (fraction of the run, 0..1).

    A list of values keeps several averages in one callback (`half_life=["500ba", "2000ba"]`), each labelled by its
    value as written; the first is the primary, which `ema_model`, evaluation's `eval_*` metrics, checkpoints' model
    files, `save_model` and `push_to_hub` use. All averages share `update_interval` and `ema_start`.

    Args:
        half_life (`str` or `list[str]`, *optional*, defaults to `"1000ba"`):
            Used when neither `smoothing` nor `sigma_rel` is given. Half-life of the average, e.g. `"1000ba"`, `"2ep"`, `"0.05dur"`; a list keeps one average per value.
        smoothing (`float` or `list[float]`, *optional*):
            Fixed smoothing per update in (0, 1), instead of `half_life`. Not rescaled when `update_interval` changes.
        sigma_rel (`float` or `list[float]`, *optional*):
            Power-function averages (EDM2, Karras et al. 2024) by relative width in (0, 0.2887], instead of
            `half_life`: an update `t` optimizer steps after the start, `elapsed` steps after the previous one, uses
            `s = (1 - elapsed / t) ** (gamma + 1)` with `sigma_rel ** 2 = (gamma + 1) / ((gamma + 2) ** 2 (gamma + 3))`
            (0.05 -> gamma 16.97). The average's length grows with training; 0.2887 (gamma 0) is the uniform average
            (SWA) of the weights since `ema_start`.
        bema (`bool`, *optional*, defaults to `False`):
            Also keep BEMA, the bias-corrected EMA of Block & Zhang (arXiv 2508.00180), labelled `"bema"`: the only
            average (then the primary) when no `half_life`, `smoothing` or `sigma_rel` is given, else the last one. An
            update `t` optimizer steps after `ema_start` uses `ema = (1 - beta_t) ema + beta_t w` with `beta_t = (lag +
            multiplier * t) ** -ema_power`, from `theta_0`, the weights at the start (kept: one more copy); what is
            evaluated, saved and exported is `ema + alpha_t (w - theta_0)`, `alpha_t = (lag + multiplier * t) **
            -bias_power`, computed when read, with `t` of the last update and `w` the training weights then in the
            model. `update_interval` plays TRL's `update_freq`, `ema_start` its `update_after` (docs/usage.md, "BEMA").
        bema_ema_power (`float`, *optional*, defaults to 0.5):
            kappa of BEMA (TRL's `ema_power`), in [0, 1]: how fast `beta_t` decays; 0 makes the average follow the
            weights.
        bema_bias_power (`float`, *optional*, defaults to 0.2):
            eta of BEMA (TRL's `bias_power`), >= 0: how fast the bias correction `alpha_t` decays; 0 keeps it at 1.
        bema_lag (`float`, *optional*, defaults to 10.0):
            rho of BEMA (TRL's `lag`), >= 0 (> 0 unless `bema_bias_power` is 0): the age the average starts with.
        bema_multiplier (`float`, *optional*, defaults to 1.0):
            gamma of BEMA (TRL's `multiplier`), > 0, with `bema_lag + bema_multiplier >= 1` (so `beta_t <= 1`): how
            much the age grows per optimizer step.
        ema_warmup_power (`float`, *optional*):
            Warm the smoothing up as timm and diffusers do: an update `t` optimizer steps after the start uses
            `min(s, 1 - (1 + (t - 1) / ema_warmup_inv_gamma) ** -ema_warmup_power)`, their decay at the same step
            (`update_after_step` = `ema_start`); the first update copies the weights. Usual values: 2/3 (long runs),
            3/4.
        ema_warmup_inv_gamma (`float`, *optional*, defaults to 1.0):
            `inv_gamma` of the warmup; larger values warm up more slowly.
        update_interval (`str`, *optional*):
            How often the averages are updated. Defaults to 1 of half_life's unit (`"1ba"` for a `dur` half-life or
            half-lives in several units) or to `"1ba"` with `smoothing` and `sigma_rel`. With `half_life`, a longer
            interval keeps the same time constant; with `sigma_rel`, it samples the same power-function average
            more coarsely.
        ema_snapshot_every (`str`, *optional*):
            With `sigma_rel`: write every power-function average to `<output_dir>/ema_snapshots/` at this interval
            (e.g. `"1000ba"`), outside checkpoint rotation, so that `hf_ema.posthoc` can synthesise the average of
            any other `sigma_rel` after training (docs/posthoc.md).
        ema_snapshot_dtype (`str`, *optional*, defaults to `"float32"`):
            Dtype of the snapshots: `"float32"`, or `"bfloat16"` to halve the disk (it costs 1-3% of the EMA's lag
            in the synthesis, docs/posthoc.md).
        ema_schedule (`str`, *optional*, defaults to `"hf-ema"`):
            `"hf-ema"`: a zero start sets the averages to the weights at train begin, and updates come every
            `update_interval` counted from the start, in any unit. `"composer"`: MosaicML Composer's update times
            exactly (docs/usage.md, "Differences from Composer"): the start waits for the first update event, updates
            come at multiples of the interval, with its fixed smoothing; intervals in `ba` or `ep` only.
        ema_start (`str`, *optional*, defaults to `"0.0dur"`):
            When averaging begins. At the start the average is set to the current weights; before it, evaluation and
            saving use the training weights.
        ema_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the average: `"auto"` keeps float32 averages of 16-bit floating-point tensors and the tensor's
            dtype otherwise, `"float32"` keeps every average in float32, `"same"` uses each tensor's own dtype.
        ema_eval_training_weights (`bool`, *optional*, defaults to `False`):
            With `EMATrainer`, also evaluate the training weights and log their metrics under `eval_training_*` in the
            same log line. Best-model selection and early stopping follow the EMA metrics.
        ema_eval_during_training (`str`, *optional*, defaults to `"all"`):
            With `EMATrainer` and several averages, evaluations during training run `"all"` averages (the primary
            under `eval_*`, the others under `eval_ema_<label>_*` in the same log line) or only the `"primary"`.
            Evaluations after training always run all of them.
        ema_save_all_averages (`bool`, *optional*, defaults to `False`):
            With `EMATrainer` and several averages, `save_model()` also writes every other average into
            `<output_dir>/ema-<label>/` (a folder `from_pretrained` loads).
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
        ema_reference (`str`, *optional*):
            The label of an average that serves as the reference model of TRL's `DPOTrainer` (and its subclasses)
            trained as an `EMAMixin` trainer: the trainer's `ref_model` holds that average from the start of
            averaging and after every update (TR-DPO's soft update `ref = (1 - alpha) ref + alpha policy` every `k`
            steps is `smoothing=1 - alpha, update_interval="<k>ba"`). That average is never placed into the policy:
            evaluation, checkpoints' model files, `save_model` and `push_to_hub` use the first other average, or the
            training weights when it is the only one. It is kept in the EMA state, so resume is exact
            (docs/usage.md, "The EMA as DPO's reference model").
        ema_switch_every (`str`, *optional*):
            Switch-EMA (Li et al., arXiv 2402.09240; Hare & Tortoise, arXiv 2406.02596): every so often (e.g.
            `"1ep"`, `"500ba"`), right after an update, copy the primary average into the training weights, which
            training continues from. The optimizer and its state (momentum, Adam moments, step counts) are kept. It is
            counted from `ema_start`, and a switch comes with the first update at or after the time since the start
            or the last switch reaches it (docs/usage.md, "Switch-EMA"). Refused with `ema_schedule="composer"`, a
            `ba` value that is not a multiple of a `ba` `update_interval`, DeepSpeed and sharded averages.

    Example:

    ```python
    from transformers import HfArgumentParser, TrainingArguments
    from hf_ema import EMAArguments

    training_args, ema_args = HfArgumentParser((TrainingArguments, EMAArguments)).parse_args_into_dataclasses()
    ema_args = EMAArguments(half_life="500ba", update_interval="10ba")
    ```
    """

    # HfArgumentParser puts the fields under this heading in --help, apart from TrainingArguments' options.
    _argument_group_name = "EMA arguments (hf-ema)"

    half_life: list[str] | None = field(
        default=None,
        metadata={
            "help": "Half-life of the average as a time string ('1000ba', '2ep', '0.05dur'); several keep several "
            "averages ('500ba 2000ba'), the first is the primary. Defaults to '1000ba' unless `smoothing` or "
            "`sigma_rel` is given."
        },
    )
    smoothing: list[float] | None = field(
        default=None,
        metadata={
            "help": "Fixed smoothing per update in (0, 1), instead of `half_life`; several keep several averages."
        },
    )
    sigma_rel: list[float] | None = field(
        default=None,
        metadata={
            "help": "EDM2 power-function averages by relative width in (0, 0.2887] ('0.05 0.10'), instead of "
            "`half_life`; 0.2887 (gamma 0) is the uniform average (SWA)."
        },
    )
    bema: bool = field(
        default=False,
        metadata={
            "help": "Also keep BEMA, the bias-corrected EMA (Block & Zhang 2025; TRL's BEMACallback), labelled "
            "'bema': ema = (1 - beta_t) ema + beta_t w from the start weights theta_0, read as ema + alpha_t (w - "
            "theta_0). The primary when no other average is given."
        },
    )
    bema_ema_power: float = field(
        default=0.5,
        metadata={"help": "kappa of BEMA, in [0, 1]: beta_t = (bema_lag + bema_multiplier * t) ** -kappa."},
    )
    bema_bias_power: float = field(
        default=0.2,
        metadata={"help": "eta of BEMA, >= 0: alpha_t = (bema_lag + bema_multiplier * t) ** -eta (0: alpha_t = 1)."},
    )
    bema_lag: float = field(
        default=10.0,
        metadata={"help": "rho of BEMA, >= 0 (> 0 unless bema_bias_power is 0): the age the average starts with."},
    )
    bema_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "gamma of BEMA, > 0 with bema_lag + bema_multiplier >= 1: the age added per optimizer step."
        },
    )
    ema_warmup_power: float | None = field(
        default=None,
        metadata={
            "help": "Warm the smoothing up as timm/diffusers do: min(s, 1 - (1 + (t - 1) / inv_gamma) ** -power), t = "
            "optimizer steps since the start (2/3 or 3/4 are usual). Off by default."
        },
    )
    ema_warmup_inv_gamma: float = field(
        default=1.0,
        metadata={"help": "`inv_gamma` of the warmup (timm/diffusers): larger values warm up more slowly."},
    )
    update_interval: str | None = field(
        default=None,
        metadata={
            "help": "How often the average is updated ('1ba', '10ba', '1ep'). Defaults to 1 of half_life's unit "
            "('1ba' for a 'dur' half-life, for half-lives in several units, with `smoothing` or `sigma_rel`)."
        },
    )
    ema_schedule: Literal["hf-ema", "composer"] = field(
        default="hf-ema",
        metadata={
            "help": "Update times: 'hf-ema' (the default: start at train begin, updates every interval counted from "
            "the start, any units) or 'composer' (MosaicML Composer's exactly: start at the first update event, "
            "updates at multiples of the interval, 'ba'/'ep' intervals with a half-life in the same unit)."
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
    ema_eval_during_training: Literal["all", "primary"] = field(
        default="all",
        metadata={
            "help": "With EMATrainer and several averages: evaluations during training run 'all' averages (the others "
            "logged as eval_ema_<label>_*) or only the 'primary'."
        },
    )
    ema_save_all_averages: bool = field(
        default=False,
        metadata={
            "help": "With EMATrainer and several averages: save_model() also writes every other average into "
            "<output_dir>/ema-<label>/."
        },
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
    ema_reference: str | None = field(
        default=None,
        metadata={
            "help": "DPO (TRL's DPOTrainer as an EMAMixin trainer): the label of the average the trainer's ref_model "
            "holds (e.g. '0.4' with smoothing=0.4, update_interval='512ba': TR-DPO); never evaluated or saved as the "
            "policy."
        },
    )
    ema_snapshot_every: str | None = field(
        default=None,
        metadata={
            "help": "Post-hoc EMA (EDM2): write every power-function average (`sigma_rel`) to "
            "<output_dir>/ema_snapshots/ at this interval ('1000ba', '1ep', '0.05dur') and at the last step, so any "
            "sigma_rel can be synthesised after training (hf_ema.posthoc). Off by default."
        },
    )
    ema_snapshot_dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata={"help": "Dtype of the snapshots: 'float32', or 'bfloat16' to halve their disk space."},
    )
    ema_switch_every: str | None = field(
        default=None,
        metadata={
            "help": "Switch-EMA: at this interval ('1ep', '500ba'), counted from ema_start, copy the primary average "
            "into the training weights right after an update; the optimizer state is kept. Off by default."
        },
    )

    def __post_init__(self) -> None:
        # Normalise: one value stays a scalar (as before several averages existed, so settings and checkpoints of a
        # single average are unchanged); HfArgumentParser hands lists, JSON and Python may hand either.
        self.half_life = _one_or_list(self.half_life, "half_life", _as_time_string)
        self.smoothing = _one_or_list(self.smoothing, "smoothing", _as_number)
        self.sigma_rel = _one_or_list(self.sigma_rel, "sigma_rel", _as_number)
        for name in BEMA_FIELDS:
            if isinstance(getattr(self, name), str):
                setattr(self, name, _as_number(getattr(self, name), name))
        if isinstance(self.ema_warmup_power, str) or isinstance(self.ema_warmup_inv_gamma, str):
            self.ema_warmup_power = _as_number(self.ema_warmup_power, "ema_warmup_power")
            self.ema_warmup_inv_gamma = _as_number(self.ema_warmup_inv_gamma, "ema_warmup_inv_gamma")
        # Validate.
        given = [name for name in ("half_life", "smoothing", "sigma_rel") if getattr(self, name) is not None]
        if len(given) > 1:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in given)
            raise ValueError(
                f"{' and '.join(f'`{name}`' for name in given)} are {'both' if len(given) == 2 else 'all'} set ({values}); each is a way to give the "
                "averages' time scale, and one callback keeps averages of one kind. Pass only one of them (a list "
                "of values keeps several averages)."
            )
        if not isinstance(self.bema, bool):
            raise TypeError(f"`bema` must be True or False, got {self.bema!r}.")
        if not given and not self.bema:
            self.half_life = DEFAULT_HALF_LIFE
        for value in _values(self.half_life):
            parse_time(value, "half_life")
        for value in _values(self.smoothing):
            if not (math.isfinite(value) and 0.0 < value < 1.0):
                raise ValueError(
                    f"`smoothing` must be in the open interval (0, 1), got {value!r}. Use e.g. smoothing=0.999, or "
                    "give a `half_life` such as '1000ba'."
                )
        for value in _values(self.sigma_rel):
            checked_sigma_rel(value, example="sigma_rel=[0.05, 0.10]")
        labels = self._kind_labels()
        if len(set(labels)) != len(labels) or len(set(self._parsed_values())) != len(labels):
            raise ValueError(
                f"The averages' values must differ, got {labels}: two averages with the same setting are the same "
                "average. Drop the repeated value."
            )
        if self.ema_warmup_power is not None:
            if self.sigma_rel is not None:
                raise ValueError(
                    f"`ema_warmup_power` ({self.ema_warmup_power!r}) does not apply to power-function averages "
                    "(`sigma_rel`), which start from a smoothing of 0 by construction. Remove ema_warmup_power."
                )
            for name in ("ema_warmup_power", "ema_warmup_inv_gamma"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(
                        f"`{name}` must be a positive number, got {value!r}. Use e.g. ema_warmup_power=2/3 (timm, "
                        "diffusers) and ema_warmup_inv_gamma=1.0."
                    )
        if self.update_interval is not None:
            parse_time(self.update_interval, "update_interval")
        parse_time(self.ema_start, "ema_start", allow_zero=True)
        _check_choice("ema_dtype", self.ema_dtype, EMA_DTYPES)
        _check_choice("ema_eval_during_training", self.ema_eval_during_training, EVAL_DURING_TRAINING)
        _check_choice("ema_checkpoint_weights", self.ema_checkpoint_weights, CHECKPOINT_WEIGHTS)
        _check_choice("ema_resume_without_state", self.ema_resume_without_state, RESUME_WITHOUT_STATE)
        _check_choice("ema_buffers", self.ema_buffers, BUFFERS)
        _check_choice("ema_schedule", self.ema_schedule, SCHEDULES)
        if self.ema_schedule == "composer":
            self._check_composer()
        if self.ema_device is not None and self.ema_device != "cpu":
            raise ValueError(
                f"`ema_device` must be None (the parameters' device) or 'cpu', got {self.ema_device!r}. Use "
                "ema_device='cpu' to keep the average in host memory."
            )
        for name in ("ema_eval_training_weights", "ema_save_all_averages", "ema_skip_non_finite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        _check_bema(self)
        _check_snapshots(self)
        _check_switch(self)
        self._check_reference()

    def _check_reference(self) -> None:
        if self.ema_reference is None:
            return
        if isinstance(self.ema_reference, (int, float)) and not isinstance(self.ema_reference, bool):
            self.ema_reference = str(self.ema_reference)  # smoothing=0.4, ema_reference=0.4
        labels = self._base_labels()
        if not isinstance(self.ema_reference, str) or self.ema_reference.strip() not in labels:
            raise ValueError(
                f"`ema_reference` must be the label of one of the averages, {labels}, got {self.ema_reference!r}: "
                "it names the average the DPO reference model holds. Use e.g. smoothing=0.4, update_interval='512ba', "
                "ema_reference='0.4' (TR-DPO with ref_model_mixup_alpha=0.6, ref_model_sync_steps=512)."
            )
        self.ema_reference = self.ema_reference.strip()
        if self.ema_switch_every is not None and not self.placed_labels:
            raise ValueError(
                f"`ema_switch_every` ({self.ema_switch_every!r}) would copy the DPO reference's average "
                f"(ema_reference={self.ema_reference!r}, the only average) into the policy: a switch copies the "
                "average evaluation uses, and there is none besides the reference. Add an average to switch to (e.g. "
                f"smoothing=[{self.ema_reference}, 0.99]), or drop ema_switch_every."
            )

    def _check_composer(self) -> None:
        """What Composer's EMA accepts: an interval in 'ba' or 'ep', a half-life in the interval's unit (or a fixed
        smoothing), no warmup or power function."""
        interval = self.update_interval_time
        if interval.unit not in ("ba", "ep"):
            raise ValueError(
                f"`ema_schedule='composer'` updates at the end of batches or epochs, so `update_interval` must be in "
                f"'ba' or 'ep', got {str(interval)!r}. Use e.g. update_interval='10ba', or ema_schedule='hf-ema'."
            )
        units = {time.unit for time in self._parsed_values()} if self.half_life is not None else set()
        if units - {interval.unit}:
            raise ValueError(
                f"`ema_schedule='composer'` needs `half_life` in the unit of `update_interval` (as Composer does), got "
                f"half_life={self.half_life!r} with update_interval {str(interval)!r}. Give both in one unit, or use "
                "ema_schedule='hf-ema', which accepts mixed units."
            )
        if self.sigma_rel is not None or self.ema_warmup_power is not None or self.bema:
            raise ValueError(
                "`ema_schedule='composer'` reproduces Composer's half-life and smoothing rules only; `sigma_rel`, "
                "`ema_warmup_power` and `bema` need ema_schedule='hf-ema'."
            )

    # ---- the averages ----

    @property
    def labels(self) -> list[str]:
        """The averages' labels, primary first: each value as written (`"2000ba"`, `"0.999"`, `"0.05"`), then `"bema"`
        with `bema=True`; the `ema_reference` average comes last."""
        return self._reference_last(self._base_labels())

    def _base_labels(self) -> list[str]:
        return self._kind_labels() + ([BEMA_LABEL] if self.bema else [])

    def _reference_last(self, items: list) -> list:
        """`items` (labels, or `(label, rule)` pairs in label order) with the `ema_reference` average moved last."""
        reference = self.ema_reference
        return sorted(items, key=lambda item: (item if isinstance(item, str) else item[0]) == reference)

    @property
    def placed_labels(self) -> list[str]:
        """The averages evaluation, checkpoints and `save_model` may place into the model, primary first: all but
        the `ema_reference` average."""
        return [label for label in self.labels if label != self.ema_reference]

    def _kind_labels(self) -> list[str]:
        """The labels of the `half_life`, `smoothing` or `sigma_rel` averages (none with only `bema`)."""
        if self.half_life is not None:
            return [value.strip() for value in _values(self.half_life)]
        return [str(value) for value in _values(self.smoothing if self.smoothing is not None else self.sigma_rel)]

    @property
    def primary_label(self) -> str:
        """The label of the primary average: the one evaluation's `eval_*`, checkpoints and save_model use (unless it
        is the `ema_reference` average, the only one: they then use the training weights)."""
        return self.labels[0]

    def _parsed_values(self) -> list:
        if self.half_life is not None:
            return [parse_time(value, "half_life") for value in _values(self.half_life)]
        return _values(self.smoothing if self.smoothing is not None else self.sigma_rel)

    def rules(self) -> dict[str, Rule]:
        """`{label: rule}` for every average, primary first (see `hf_ema.rules`)."""
        if self.half_life is not None:
            rules = [HalfLife(time) for time in self._parsed_values()]
        elif self.smoothing is not None:
            rules = [FixedSmoothing(value) for value in _values(self.smoothing)]
        else:
            rules = [PowerFunction(gamma_of_sigma_rel(value)) for value in _values(self.sigma_rel)]
        if self.ema_warmup_power is not None:
            rules = [Warmup(rule, float(self.ema_warmup_power), float(self.ema_warmup_inv_gamma)) for rule in rules]
        if self.bema:
            rules.append(self.bema_rule())
        return dict(self._reference_last(list(zip(self._base_labels(), rules, strict=True))))

    def bema_rule(self) -> BEMA:
        """The BEMA rule of these settings (whether or not `bema` is set)."""
        return BEMA(
            ema_power=float(self.bema_ema_power),
            bias_power=float(self.bema_bias_power),
            lag=float(self.bema_lag),
            multiplier=float(self.bema_multiplier),
        )

    # ---- times ----

    @property
    def half_life_time(self) -> Time | None:
        """The primary average's `half_life` parsed, or None when `smoothing` or `sigma_rel` is used."""
        return self._parsed_values()[0] if self.half_life is not None else None

    @property
    def update_interval_time(self) -> Time:
        """`update_interval` parsed, with its default filled in."""
        if self.update_interval is not None:
            return parse_time(self.update_interval, "update_interval")
        units = {time.unit for time in self._parsed_values()} if self.half_life is not None else {"ba"}
        if len(units) != 1 or "dur" in units:
            return Time(1.0, "ba")
        return Time(1.0, units.pop())

    @property
    def ema_start_time(self) -> Time:
        return parse_time(self.ema_start, "ema_start", allow_zero=True)

    @property
    def switch_every_time(self) -> Time | None:
        """`ema_switch_every` parsed, or None without Switch-EMA."""
        return parse_time(self.ema_switch_every, "ema_switch_every") if self.ema_switch_every is not None else None

    def units(self) -> set[str]:
        """Every time unit these settings need the Trainer to count (a zero start needs none)."""
        times = list(self._parsed_values()) if self.half_life is not None else []
        times.append(self.update_interval_time)
        start = self.ema_start_time
        if start.value > 0:
            times.append(start)
        if self.ema_switch_every is not None:
            times.append(self.switch_every_time)
        if self.ema_warmup_power is not None or self.sigma_rel is not None or self.bema:
            times.append(Time(1.0, "ba"))
        return {t.unit for t in times}

    def to_dict(self) -> dict:
        return asdict(self)

    def same_as(self, saved: dict | None) -> bool:
        """Whether `saved` (`to_dict()` of the settings a checkpoint was written with) are these settings; a field
        that a checkpoint of an older hf-ema lacks counts as its default."""
        if saved is None:
            return False
        defaults = {f.name: f.default for f in fields(self)}
        return {name: saved.get(name, default) for name, default in defaults.items()} == self.to_dict()


def _values(value) -> list:
    """A scalar or list setting as a list (empty for None)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _one_or_list(value, name: str, convert):
    """Normalises a setting that takes one value or several: a list of one becomes the value itself."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` is an empty list; give at least one value, or leave it unset (None).")
        values = [convert(item, name) for item in value]
        return values[0] if len(values) == 1 else values
    return convert(value, name)


def _as_time_string(value, name: str) -> str:
    if not isinstance(value, str):
        parse_time(value, name)  # raises the TypeError that names the field
    return value


def _as_number(value, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"`{name}` must be a number, got {value!r}. Use e.g. {name}=0.999.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a number, got {value!r} of type {type(value).__name__}. Use e.g. {name}=0.999."
        )
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}. Pick one of those.")


SNAPSHOT_DTYPES = ("float32", "bfloat16")


def _check_snapshots(args: EMAArguments) -> None:
    """Validates the post-hoc EMA settings (`ema_snapshot_every`, `ema_snapshot_dtype`)."""
    _check_choice("ema_snapshot_dtype", args.ema_snapshot_dtype, SNAPSHOT_DTYPES)
    if args.ema_snapshot_every is None:
        return
    parse_time(args.ema_snapshot_every, "ema_snapshot_every")
    if args.sigma_rel is None:
        kind = "half_life" if args.half_life is not None else "smoothing"
        raise ValueError(
            f"`ema_snapshot_every` ({args.ema_snapshot_every!r}) needs power-function averages: post-hoc synthesis "
            f"combines snapshots of EDM2 power-function averages (`sigma_rel`), and these settings keep `{kind}` "
            "averages. Set sigma_rel=[0.05, 0.10] (EDM2's choice) instead, or drop ema_snapshot_every."
        )


def _check_switch(args: EMAArguments) -> None:
    """Validates Switch-EMA (`ema_switch_every`): a time string, on the hf-ema schedule, landing on updates."""
    every = args.switch_every_time
    if every is None:
        return
    if args.ema_schedule == "composer":
        raise ValueError(
            f"`ema_switch_every` ({args.ema_switch_every!r}) needs ema_schedule='hf-ema': Switch-EMA is not part of "
            "Composer's EMA, whose update times ema_schedule='composer' reproduces. Use ema_schedule='hf-ema', or "
            "drop ema_switch_every."
        )
    interval = args.update_interval_time
    if every.unit == "ba" and interval.unit == "ba" and int(every.value) % int(interval.value) != 0:
        multiple = max(1, round(every.value / interval.value)) * int(interval.value)
        raise ValueError(
            f"`ema_switch_every` ({args.ema_switch_every!r}) must be a multiple of `update_interval` "
            f"({str(interval)!r}) when both are in 'ba': a switch happens right after an update, so one due between "
            f"two updates would wait for the next, and the switches would drift off every {every}. Use e.g. "
            f"ema_switch_every='{multiple}ba'."
        )


def _check_bema(args: EMAArguments) -> None:
    """Validates the BEMA settings: the fields in their ranges, and no setting BEMA cannot follow."""
    set_without = [
        name for name in BEMA_FIELDS if getattr(args, name) != EMAArguments.__dataclass_fields__[name].default
    ]
    if not args.bema:
        if set_without:
            raise ValueError(
                f"`{set_without[0]}` ({getattr(args, set_without[0])!r}) sets BEMA, but `bema` is False, so it would "
                "have no effect. Set bema=True to keep the BEMA average, or drop the setting."
            )
        return
    for name in BEMA_FIELDS:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a number, got {value!r} of type {type(value).__name__}.")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}. Use the default, e.g. bema_lag=10.")
    kappa, eta, rho, gamma = (float(getattr(args, name)) for name in BEMA_FIELDS)
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(
            f"`bema_ema_power` (kappa of BEMA's beta_t = (lag + multiplier * t) ** -kappa) must be in [0, 1], got "
            f"{kappa!r}: above 1 the weights of later steps shrink so fast that the average stops following training. "
            "Use e.g. bema_ema_power=0.5 (the paper's and TRL's default)."
        )
    if eta < 0.0:
        raise ValueError(
            f"`bema_bias_power` (eta of BEMA's alpha_t = (lag + multiplier * t) ** -eta) must be >= 0, got {eta!r}: "
            "a negative power makes the bias correction grow without bound. Use e.g. bema_bias_power=0.2 (the "
            "default), or a large value such as 8.0 to turn the correction off."
        )
    if rho < 0.0:
        raise ValueError(
            f"`bema_lag` (rho, the age BEMA's average starts with) must be >= 0, got {rho!r}. Use e.g. bema_lag=10 "
            "(the default)."
        )
    if gamma <= 0.0:
        raise ValueError(
            f"`bema_multiplier` (gamma, the age BEMA adds per optimizer step) must be positive, got {gamma!r}. Use "
            "e.g. bema_multiplier=1.0 (the default)."
        )
    if rho == 0.0 and eta > 0.0:
        raise ValueError(
            f"`bema_lag` is 0 with bema_bias_power={eta!r}: the bias correction alpha_t = (lag + multiplier * t) ** "
            "-eta is infinite at the start (t = 0). Use a positive lag, e.g. bema_lag=10 (the default), or "
            "bema_bias_power=0."
        )
    if kappa > 0.0 and rho + gamma < 1.0:
        raise ValueError(
            f"`bema_lag` + `bema_multiplier` must be at least 1 (got {rho!r} + {gamma!r}): the first update's weight "
            "beta_1 = (lag + multiplier) ** -kappa would exceed 1 and push the average beyond the weights. Raise "
            "bema_lag, e.g. bema_lag=10 (the default)."
        )
    if args.ema_warmup_power is not None:
        raise ValueError(
            f"`ema_warmup_power` ({args.ema_warmup_power!r}) does not apply to BEMA (`bema=True`), whose beta_t "
            "already starts large and decays by its own schedule. Remove ema_warmup_power, or keep the warmup "
            "average without bema."
        )
    if args.ema_snapshot_every is not None:
        raise ValueError(
            f"`ema_snapshot_every` ({args.ema_snapshot_every!r}) cannot be combined with `bema`: post-hoc synthesis "
            "combines snapshots of EDM2 power-function averages, and BEMA's weights are neither a power-function "
            "average nor stored (its readout is computed from the training weights when read). Drop bema, or drop "
            "ema_snapshot_every."
        )
