"""When the averages start and update, and with which smoothing. Pure: no torch, no transformers.

The schedule is told the clock at the end of each optimizer step (and of each epoch) and answers what to do: `START`,
an `Update` with each average's smoothing, or None. The smoothing comes from each average's rule (`hf_ema.rules`),
given the schedule's counters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .rules import Counters, Rule
from .time import Clock, Time, reached


class Start:
    """The answer of `EMASchedule.step` when the averages are to be set to the current weights (`START`)."""

    def __repr__(self) -> str:
        return "START"


START = Start()


@dataclass(frozen=True)
class Update:
    """The answer of `EMASchedule.step` when every average moves towards the weights, each with its smoothing; with
    `switch`, the primary average is then copied into the training weights (Switch-EMA, `switch_every`)."""

    smoothings: dict[str, float]
    switch: bool = False


Action = Start | Update | None


@dataclass
class EMASchedule:
    """When averaging starts and updates (`ema_start`, `update_interval`), with its counters, shared by every average.

    Args:
        update_interval (`Time`): how much the clock must advance between updates.
        ema_start (`Time`): when averaging begins; a zero start begins at train begin.
        rules (`Mapping[str, Rule]`): the rule of each average, by label, primary first.
        switch_every (`Time`, *optional*): Switch-EMA: how much the clock must advance, counted from the start or the
            last switch, before an update also copies the primary average into the training weights (the first update
            at or after that time does). None: never.
    """

    update_interval: Time
    ema_start: Time
    rules: Mapping[str, Rule] = field(default_factory=dict)
    composer: bool = False
    started: bool = False
    start_clock: Clock | None = None
    last_clock: Clock | None = None
    last_step: int = -1
    num_updates: int = 0
    switch_every: Time | None = None
    last_switch_clock: Clock | None = None
    num_switches: int = 0

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("EMASchedule needs at least one rule.")

    @property
    def starts_at_zero(self) -> bool:
        """Whether averaging starts at train begin (Composer's schedule waits for the first update event)."""
        return self.ema_start.value == 0 and not self.composer

    def step_composer(self, clock: Clock, step: int, event: str) -> Action:
        """Composer's `EMA.match`/`apply` at the end of a batch (`event="batch"`) or an epoch (`"epoch"`).

        Only the update event counts (batch ends for a `ba` interval, epoch ends for `ep`). There, averaging starts
        once the clock reaches `ema_start` (the averages are set to the current weights), and an update happens when
        the interval's clock is a multiple of the interval, with the smoothing of one interval. `clock` is Composer's:
        at a batch end its epoch count is the epochs completed before it. An update at the start event leaves the
        averages equal to the weights; it is counted, not computed.
        """
        interval = self.update_interval
        if event != ("batch" if interval.unit == "ba" else "epoch") or step == self.last_step:
            return None
        action = None
        if not self.started and reached(clock[self.ema_start.unit], self.ema_start.value):
            self.start(clock, step)
            action = START
        if not self.started or round(clock[interval.unit]) % int(interval.value) != 0:
            return action
        self.last_clock, self.last_step = clock, step
        self.num_updates += 1
        if action is START:
            return START
        previous = Clock(**{**clock.to_dict(), interval.unit: clock[interval.unit] - interval.value})
        return self._update(Counters(now=clock, previous=previous, start=self.start_clock))

    def step(self, clock: Clock, step: int) -> Action:
        """Says what to do at the end of optimizer step `step` (`global_step`) with the clock at `clock`.

        Returns `START` (set the averages to the current weights), an `Update` (move each average with its
        smoothing), or None (nothing to do). At most one action per step: asking twice for the same step (end of step,
        then end of epoch) answers None the second time.
        """
        if step == self.last_step:
            return None
        if not self.started:
            if reached(clock[self.ema_start.unit], self.ema_start.value):
                self.start(clock, step)
                return START
            return None
        interval = self.update_interval
        if not reached(clock[interval.unit] - self.last_clock[interval.unit], interval.value):
            return None
        update = self._update(Counters(now=clock, previous=self.last_clock, start=self.start_clock))
        self.last_clock, self.last_step = clock, step
        self.num_updates += 1
        every = self.switch_every
        if every is not None and reached(clock[every.unit] - self.last_switch_clock[every.unit], every.value):
            self.last_switch_clock = clock
            self.num_switches += 1
            update = Update(update.smoothings, switch=True)
        return update

    def _update(self, counters: Counters) -> Update:
        return Update({label: float(rule(counters)) for label, rule in self.rules.items()})

    def start(self, clock: Clock, step: int) -> None:
        """Marks the averages as started now (they are set to the current weights by the caller)."""
        self.started, self.start_clock, self.last_clock, self.last_step = True, clock, clock, step
        self.last_switch_clock = clock  # switches are counted from the start

    def state_dict(self) -> dict:
        return {
            "started": self.started,
            "start_clock": self.start_clock.to_dict() if self.start_clock is not None else None,
            "last_clock": self.last_clock.to_dict() if self.last_clock is not None else None,
            "last_step": self.last_step,
            "num_updates": self.num_updates,
            "last_switch_clock": self.last_switch_clock.to_dict() if self.last_switch_clock is not None else None,
            "num_switches": self.num_switches,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores the counters. Format-1 checkpoints did not record `start_clock`; rules that need it then fail.
        States written before Switch-EMA (no `last_switch_clock`) count switches from the start, none made yet."""
        self.started = bool(state["started"])
        self.last_clock = Clock.from_dict(state["last_clock"]) if state["last_clock"] is not None else None
        self.start_clock = Clock.from_dict(state["start_clock"]) if state.get("start_clock") is not None else None
        self.last_step = int(state["last_step"])
        self.num_updates = int(state["num_updates"])
        switched = state.get("last_switch_clock")
        self.last_switch_clock = Clock.from_dict(switched) if switched is not None else None
        self.num_switches = int(state.get("num_switches", 0))
        if self.started and self.start_clock is None:
            if any(rule.needs_start for rule in self.rules.values()):
                raise ValueError(
                    "the EMA state does not record when averaging started (format version 1), which the warmup and "
                    "power-function rules need"
                )
            self.start_clock = self.last_clock  # unused by the half-life and fixed rules
        if self.started and self.last_switch_clock is None:
            self.last_switch_clock = self.start_clock
