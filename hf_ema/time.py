"""Time strings (`"1000ba"`, `"0.5dur"`) and the training clock.

This module depends on nothing else in the package and does not import torch or transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNITS = ("ba", "ep", "sp", "tok", "dur")
"""Units of a time string: optimizer steps, epochs, samples, tokens, fraction of the run."""

_TIME_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]+)\s*$")

# Epoch and duration clocks are float sums (`epoch + (step + 1) / steps_in_epoch`); a boundary such as 1.0 can land at
# 0.9999999999999999. Comparisons against a boundary allow this much slack.
_EPS = 1e-9


@dataclass(frozen=True)
class Time:
    """A span of training time: `value` in `unit` (one of `UNITS`)."""

    value: float
    unit: str

    def __str__(self) -> str:
        value = int(self.value) if self.unit != "dur" else self.value
        return f"{value}{self.unit}"


def parse_time(value: str, field: str, *, allow_zero: bool = False) -> Time:
    """Parses a time string such as `"1000ba"` or `"0.5dur"`.

    Args:
        value (`str`): the string to parse.
        field (`str`): the argument's name, used in error messages.
        allow_zero (`bool`, *optional*, defaults to `False`): whether a zero span is valid (as for `ema_start`).

    Raises:
        TypeError: `value` is not a string.
        ValueError: the string is malformed, the unit is unknown, the value is not finite, not an integer for a unit
            other than `dur`, not positive (or negative when `allow_zero`), or above 1 for `dur`.
    """
    units = ", ".join(UNITS)
    if not isinstance(value, str):
        raise TypeError(
            f"`{field}` must be a time string like '1000ba' (units: {units}), got {value!r} of type "
            f"{type(value).__name__}. Pass it as a string, e.g. {field}='{value}ba'."
        )
    match = _TIME_RE.match(value)
    if match is None or match.group(2) not in UNITS:
        raise ValueError(
            f"`{field}` must look like '1000ba' (a number followed by one of the units {units}), got {value!r}. "
            "Use e.g. '1000ba' for optimizer steps, '2ep' for epochs or '0.1dur' for a fraction of the run."
        )
    number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number):
        raise ValueError(f"`{field}` must be a finite number of {unit}, got {value!r}. Use a value like '1000{unit}'.")
    if number < 0 or (number == 0 and not allow_zero):
        rule = "must not be negative" if allow_zero else "must be positive"
        example = f"'0{unit}' or '100{unit}'" if allow_zero else f"'1000{unit}'"
        raise ValueError(f"`{field}` {rule}, got {value!r}. Use a value like {example}.")
    if unit == "dur" and number > 1:
        raise ValueError(
            f"`{field}` in 'dur' is a fraction of the whole run and must be in [0, 1], got {value!r}. "
            "Use e.g. '0.1dur', or give the time in 'ba' or 'ep'."
        )
    if unit != "dur" and number != int(number):
        raise ValueError(
            f"`{field}` must be a whole number of {unit} (only 'dur' takes fractions), got {value!r}. "
            f"Use e.g. '{max(1, round(number))}{unit}'."
        )
    return Time(number, unit)


@dataclass(frozen=True)
class Clock:
    """Where training stands, in every unit at once.

    Args:
        ba (`float`): optimizer steps taken (`TrainerState.global_step`; 1 after the first optimizer step).
        ep (`float`): epochs, fractional (`TrainerState.epoch`).
        sp (`float`): samples seen (optimizer steps x total train batch size).
        tok (`float`): input tokens seen (`TrainerState.num_input_tokens_seen`).
        dur (`float`): fraction of the run (`global_step / max_steps`).
    """

    ba: float = 0.0
    ep: float = 0.0
    sp: float = 0.0
    tok: float = 0.0
    dur: float = 0.0

    def __getitem__(self, unit: str) -> float:
        return getattr(self, unit)

    @classmethod
    def from_counters(
        cls, global_step: int, epoch: float | None, total_batch_size: int, tokens: float | None, max_steps: int
    ) -> Clock:
        """Builds the clock from the Trainer's counters (all plain numbers: this module knows no Trainer)."""
        return cls(
            ba=float(global_step),
            ep=float(epoch or 0.0),
            sp=float(global_step * total_batch_size),
            tok=float(tokens or 0),
            dur=float(global_step) / max_steps if max_steps > 0 else 0.0,
        )

    def to_dict(self) -> dict[str, float]:
        return {unit: self[unit] for unit in UNITS}

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Clock:
        return cls(**{unit: float(values[unit]) for unit in UNITS})


def reached(now: float, target: float) -> bool:
    """Whether a clock reading `now` has reached `target`, allowing float slack at boundaries."""
    return now >= target - _EPS * max(1.0, abs(target))
