"""When the average starts and updates, and with which smoothing. Pure: no torch, no transformers.

The schedule is told the clock at the end of each optimizer step (and of each epoch) and answers what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from .time import Clock, Time, reached

START = "start"
"""`EMASchedule.step` returns this when the shadow is to be set to the current weights."""


def smoothing_from_half_life(elapsed: float, half_life: float) -> float:
    """Smoothing of one update after `elapsed` time, for a half-life in the same unit: `2 ** (-elapsed / half_life)`."""
    return 2.0 ** (-elapsed / half_life)


@dataclass
class EMASchedule:
    """The EMA schedule of DESIGN.md section 2, with its counters.

    Args:
        update_interval (`Time`): how much the clock must advance between updates.
        ema_start (`Time`): when averaging begins; a zero start begins at train begin.
        half_life (`Time`, *optional*): the half-life; the smoothing of an update is `2 ** (-elapsed / half_life)`
            with `elapsed` the time since the previous update (or the start) in half_life's unit.
        smoothing (`float`, *optional*): a fixed smoothing per update, used when `half_life` is None.
    """

    update_interval: Time
    ema_start: Time
    half_life: Time | None = None
    smoothing: float | None = None
    started: bool = False
    last_clock: Clock | None = None
    last_step: int = -1
    num_updates: int = 0

    def __post_init__(self) -> None:
        if (self.half_life is None) == (self.smoothing is None):
            raise ValueError("EMASchedule needs exactly one of `half_life` and `smoothing`.")

    @property
    def starts_at_zero(self) -> bool:
        return self.ema_start.value == 0

    def step(self, clock: Clock, step: int) -> str | float | None:
        """Says what to do at the end of optimizer step `step` (`global_step`) with the clock at `clock`.

        Returns `START` (set the shadow to the current weights), a smoothing in (0, 1] (update the shadow with it), or
        None (nothing to do). At most one action per step: asking twice for the same step (end of step, then end of
        epoch) answers None the second time.
        """
        if step == self.last_step:
            return None
        if not self.started:
            if reached(clock[self.ema_start.unit], self.ema_start.value):
                self.start(clock, step)
                return START
            return None
        assert self.last_clock is not None
        interval = self.update_interval
        if not reached(clock[interval.unit] - self.last_clock[interval.unit], interval.value):
            return None
        if self.half_life is not None:
            elapsed = clock[self.half_life.unit] - self.last_clock[self.half_life.unit]
            smoothing = smoothing_from_half_life(max(elapsed, 0.0), self.half_life.value)
        else:
            smoothing = float(self.smoothing)
        self.last_clock, self.last_step = clock, step
        self.num_updates += 1
        return smoothing

    def start(self, clock: Clock, step: int) -> None:
        """Marks the average as started now (the shadow is set to the current weights by the caller)."""
        self.started, self.last_clock, self.last_step = True, clock, step

    def state_dict(self) -> dict:
        return {
            "started": self.started,
            "last_clock": self.last_clock.to_dict() if self.last_clock is not None else None,
            "last_step": self.last_step,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.started = bool(state["started"])
        self.last_clock = Clock.from_dict(state["last_clock"]) if state["last_clock"] is not None else None
        self.last_step = int(state["last_step"])
        self.num_updates = int(state["num_updates"])
