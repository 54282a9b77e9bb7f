"""Averaging rules: the schedule's counters -> the smoothing of one update. Pure: no torch, no transformers.

Every rule is a small frozen dataclass called with the `Counters` of an update and returning the smoothing `s` of
`ema = s * ema + (1 - s) * w` for it; it also describes itself for checkpoints (`describe()`) and says whether it reads
the start of averaging (`needs_start`). A new rule is one class here plus the `EMAArguments` field that selects it.

- `HalfLife`: Composer's rule, `s = 2 ** (-elapsed / half_life)` (the default).
- `FixedSmoothing`: the same `s` at every update.
- `Warmup`: timm's and diffusers' warmup around another rule, `min(inner, 1 - (1 + (t - 1) / inv_gamma) ** -power)`.
- `PowerFunction`: EDM2's power-function average, `s = (1 - elapsed / t) ** (gamma + 1)`; `gamma = 0` is the uniform
  average (SWA).
- `BEMA`: Block & Zhang's bias-corrected EMA, `s = 1 - (lag + multiplier * t) ** -ema_power`; its readout adds
  `alpha * (w - theta_0)` (`BEMA.alpha`), which the store computes when the average is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

from .time import Clock, Time

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
SIGMA_REL_LIMIT = round(
    SIGMA_REL_MAX, 4
)  # 0.2887, as users type the uniform average's sigma_rel: taken as SIGMA_REL_MAX
"""The largest `sigma_rel` of a power-function average: that of `gamma = 0`, the uniform average (SWA)."""


@dataclass(frozen=True)
class Counters:
    """Where the schedule stands at an update.

    Args:
        now (`Clock`): the clock at this update.
        previous (`Clock`): the clock at the previous update (at the start, for the first update).
        start (`Clock`): the clock when averaging started (the average was set to the weights then).
    """

    now: Clock
    previous: Clock
    start: Clock

    @property
    def steps(self) -> float:
        """Optimizer steps since averaging started (`t` of the warmup and power-function rules; 1 at the first update
        of a per-step schedule)."""
        return self.now.ba - self.start.ba

    def elapsed(self, unit: str) -> float:
        """Time since the previous update in `unit`."""
        return max(self.now[unit] - self.previous[unit], 0.0)


class Rule(Protocol):
    """Turns the counters of an update into its smoothing, in [0, 1]."""

    needs_start: bool
    """Whether it reads the steps since the start (which format-1 checkpoints did not record)."""

    def __call__(self, counters: Counters) -> float: ...

    def describe(self) -> dict:
        """A JSON-able description, for checkpoints and model cards."""
        ...


@dataclass(frozen=True)
class HalfLife:
    """Composer's rule: an old term's weight halves every `half_life`, whatever the update interval.

    `s = 2 ** (-elapsed / half_life)` with `elapsed` the time since the previous update in half_life's unit; with a
    fixed interval in the same unit this is Composer's `2 ** (-update_interval / half_life)`.
    """

    half_life: Time
    needs_start: ClassVar[bool] = False

    def __call__(self, counters: Counters) -> float:
        return 2.0 ** (-counters.elapsed(self.half_life.unit) / self.half_life.value)

    def describe(self) -> dict:
        return {"rule": "half_life", "half_life": str(self.half_life)}


@dataclass(frozen=True)
class FixedSmoothing:
    """The same smoothing at every update (not rescaled when the interval changes)."""

    smoothing: float
    needs_start: ClassVar[bool] = False

    def __call__(self, counters: Counters) -> float:
        return self.smoothing

    def describe(self) -> dict:
        return {"rule": "smoothing", "smoothing": self.smoothing}


@dataclass(frozen=True)
class Warmup:
    """timm's and diffusers' warmup: the smoothing grows from 0 towards the inner rule's.

    `s = min(inner, 1 - (1 + (t - 1) / inv_gamma) ** -power)` with `t` the optimizer steps since averaging started:
    timm's `ModelEmaV3.get_decay(step)` and diffusers' `EMAModel.get_decay(step)`, which count
    `max(0, step - update_after_step - 1)`, at the same optimizer step. The first update of a per-step schedule
    (t = 1) is a copy of the weights (s = 0); power 2/3 reaches 0.999 near 31k steps, 3/4 near 10k.
    """

    inner: Rule
    power: float
    inv_gamma: float = 1.0
    needs_start: ClassVar[bool] = True
    COUNT: ClassVar[str] = "t-1"
    """How the description names the step count (checkpoints written before it counted `t`, without the key)."""

    def __call__(self, counters: Counters) -> float:
        warm = 1.0 - (1.0 + max(counters.steps - 1.0, 0.0) / self.inv_gamma) ** -self.power
        return min(self.inner(counters), warm)

    def describe(self) -> dict:
        return {
            "rule": "warmup",
            "power": self.power,
            "inv_gamma": self.inv_gamma,
            "count": self.COUNT,
            "inner": self.inner.describe(),
        }


@dataclass(frozen=True)
class PowerFunction:
    """EDM2's power-function average (Karras et al., CVPR 2024): at time `t` after the start, the average of the
    weights seen so far with weight proportional to `tau ** gamma`.

    `s = (1 - elapsed / t) ** (gamma + 1)`, both in optimizer steps since the start; with an update every step this is
    `(1 - 1 / t) ** (gamma + 1)`. The first update (elapsed == t) replaces the start value, as in EDM2.
    """

    gamma: float
    needs_start: ClassVar[bool] = True

    def __call__(self, counters: Counters) -> float:
        t = counters.steps
        if t <= 0:
            return 1.0
        return max(1.0 - counters.elapsed("ba") / t, 0.0) ** (self.gamma + 1.0)

    def describe(self) -> dict:
        return {"rule": "power_function", "gamma": self.gamma, "sigma_rel": sigma_rel_of_gamma(self.gamma)}


@dataclass(frozen=True)
class BEMA:
    """BEMA, the bias-corrected EMA of Block & Zhang (arXiv 2508.00180), as TRL's `BEMACallback` computes it.

    The average follows `EMA_t = (1 - beta_t) EMA_(t-1) + beta_t w_t` from the weights at the start (`theta_0`, which
    the store keeps), so the smoothing of an update is `s = 1 - beta_t`; what is read (evaluated, saved, exported) is
    `EMA_t + alpha_t (w - theta_0)`. Both decay with `t`, the optimizer steps since averaging started:
    `beta_t = (lag + multiplier * t) ** -ema_power`, `alpha_t = (lag + multiplier * t) ** -bias_power`.

    Args:
        ema_power (`float`, *optional*, defaults to 0.5): kappa, in [0, 1]; 0 makes the average follow the weights.
        bias_power (`float`, *optional*, defaults to 0.2): eta, >= 0; 0 keeps `alpha_t = 1`, large values turn the
            correction off.
        lag (`float`, *optional*, defaults to 10.0): rho, >= 0: the age the average starts with.
        multiplier (`float`, *optional*, defaults to 1.0): gamma, > 0: how fast the age grows per step.
    """

    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0
    needs_start: ClassVar[bool] = True

    def beta(self, t: float) -> float:
        """The weight `beta_t = (lag + multiplier * t) ** -ema_power` of the weights in the update at `t`."""
        return (self.lag + self.multiplier * t) ** -self.ema_power

    def alpha(self, t: float) -> float:
        """The bias correction's weight `alpha_t = (lag + multiplier * t) ** -bias_power` of the readout at `t`."""
        if self.bias_power == 0:
            return 1.0  # also at lag 0 and t 0, where the power is 0 ** 0
        return (self.lag + self.multiplier * t) ** -self.bias_power

    def __call__(self, counters: Counters) -> float:
        t = counters.steps
        if t <= 0:
            return 1.0
        return 1.0 - self.beta(t)

    def describe(self) -> dict:
        return {
            "rule": "bema",
            "ema_power": self.ema_power,
            "bias_power": self.bias_power,
            "lag": self.lag,
            "multiplier": self.multiplier,
        }


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of a power-function average's weights: `sqrt((g+1) / ((g+2)**2 (g+3)))`."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def checked_sigma_rel(sigma_rel: float, example: str = "sigma_rel=0.07") -> float:
    """`sigma_rel` if it is in (0, `SIGMA_REL_LIMIT`], read as at most `SIGMA_REL_MAX` (0.2887, as typed, is the
    uniform average); the one range check of every function and argument that takes a `sigma_rel`."""
    if not (math.isfinite(sigma_rel) and 0.0 < sigma_rel <= SIGMA_REL_LIMIT):
        raise ValueError(
            f"`sigma_rel` must be in (0, {SIGMA_REL_LIMIT}] (the relative width of an EDM2 power-function average; "
            f"{SIGMA_REL_LIMIT} is the uniform average, SWA), got {sigma_rel!r}. Use e.g. {example}."
        )
    return min(float(sigma_rel), SIGMA_REL_MAX)


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent `gamma >= 0` of the power-function average whose relative width is `sigma_rel` (EDM2 eq. 3).

    `sigma_rel` falls as gamma grows, from `SIGMA_REL_MAX` (gamma 0, SWA) towards 0; solved by bisection to machine
    precision. `sigma_rel` 0.05 gives gamma 16.97, 0.10 gives 6.94.
    """
    sigma_rel = checked_sigma_rel(sigma_rel)
    if sigma_rel >= SIGMA_REL_MAX:
        return 0.0
    low, high = 0.0, 1.0
    while sigma_rel_of_gamma(high) > sigma_rel:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if sigma_rel_of_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def half_life_of_sigma_rel(sigma_rel: float, steps: float) -> float:
    """The half-life, in optimizer steps, of the exponential average as wide as a power-function average of relative
    width `sigma_rel` after `steps` optimizer steps of averaging.

    Both are matched by the standard deviation of their weights' ages: `sigma_rel * steps` for the power function,
    `half_life / ln 2` for an exponential average (whose weights halve every half_life). So `half_life = ln 2 *
    sigma_rel * steps`: sigma_rel 0.05 after 100k steps is a half-life of about 3466 steps. A power-function average
    grows with training; the matching half-life holds at `steps` only.

    Args:
        sigma_rel (`float`): the relative width, in (0, 0.2887].
        steps (`float`): optimizer steps since averaging started (`t` of the power-function rule).
    """
    sigma_rel = checked_sigma_rel(sigma_rel)
    if not (math.isfinite(steps) and steps > 0):
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps!r}.")
    return math.log(2.0) * sigma_rel * steps


def sigma_rel_of_half_life(half_life: float, steps: float) -> float:
    """The relative width of the power-function average that matches an exponential average with `half_life`
    (optimizer steps) after `steps` optimizer steps of averaging: `half_life / (ln 2 * steps)`, the inverse of
    `half_life_of_sigma_rel`.

    Raises:
        ValueError: the half-life is not positive, or so long for `steps` that no power-function average is as wide
            (above `SIGMA_REL_MAX`, the uniform average of every step since the start).
    """
    if not (math.isfinite(half_life) and half_life > 0):
        raise ValueError(f"half_life must be a positive number of optimizer steps, got {half_life!r}.")
    if not (math.isfinite(steps) and steps > 0):
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps!r}.")
    sigma_rel = half_life / (math.log(2.0) * steps)
    if sigma_rel > SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(
            f"A half-life of {half_life:g} steps after {steps:g} steps of averaging is wider than any power-function "
            f"average (sigma_rel {sigma_rel:.4f} > {SIGMA_REL_MAX:.4f}, the uniform average of every step; its "
            f"half-life equivalent is {half_life_of_sigma_rel(SIGMA_REL_MAX, steps):.0f} steps). Ask for a shorter "
            "half-life, or for a later step."
        )
    return min(sigma_rel, SIGMA_REL_MAX)
