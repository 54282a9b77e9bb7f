"""`EMAArguments(ema_schedule="composer")` reproduces the update times of MosaicML Composer's EMA algorithm.

The reference below re-implements Composer's published `EMA.match` / `EMA.apply` (composer/algorithms/ema/ema.py)
for update times and smoothing only, on Composer's own timestamp: at a batch end the batch count has moved and the
epoch count has not; at an epoch end the epoch count has moved. The tiny run: 8 optimizer steps per epoch, 2 epochs.
"""

import pytest
from conftest import assert_close, reference_ema, state_of
from helpers import build

from hf_ema import EMAArguments
from hf_ema.time import parse_time


class ComposerEMA:
    """Composer's EMA schedule: which events start the average and which update it, with which smoothing."""

    def __init__(self, half_life=None, smoothing=None, ema_start="0.0dur", update_interval=None):
        self.half_life = parse_time(half_life, "half_life") if half_life else None
        self.ema_start = parse_time(ema_start, "ema_start", allow_zero=True)
        unit = self.half_life.unit if self.half_life else "ba"
        self.interval = (
            parse_time(update_interval, "update_interval") if update_interval else parse_time(f"1{unit}", "")
        )
        self.smoothing = 2 ** (-self.interval.value / self.half_life.value) if self.half_life else smoothing
        self.update_event = "BATCH_END" if self.interval.unit == "ba" else "EPOCH_END"
        self.started, self.start_step, self.updates = False, None, []

    def run_event(self, event, timestamp, step):
        if event != self.update_event:
            return
        if not self.started:
            now = timestamp["dur"] if self.ema_start.unit == "dur" else timestamp[self.ema_start.unit]
            if self.ema_start.value <= now:
                self.started, self.start_step = True, step  # ema_model = deepcopy(model)
        if self.started and timestamp[self.interval.unit] % self.interval.value == 0:
            self.updates.append((step, self.smoothing))  # compute_ema(model, ema_model, smoothing)


def composer_run(settings, steps_per_epoch=8, epochs=2, batch=4):
    ema = ComposerEMA(**settings)
    timestamp = {"ba": 0, "ep": 0, "sp": 0, "dur": 0.0}
    max_batches = steps_per_epoch * epochs
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            timestamp["ba"] += 1
            timestamp["sp"] += batch
            timestamp["dur"] = timestamp["ba"] / max_batches
            ema.run_event("BATCH_END", timestamp, timestamp["ba"])
        timestamp["ep"] += 1
        ema.run_event("EPOCH_END", timestamp, timestamp["ba"])
    return ema


CASES = {
    "every_batch": dict(half_life="4ba"),
    "interval_3": dict(half_life="12ba", update_interval="3ba"),
    "late_start_off_the_interval": dict(half_life="4ba", update_interval="3ba", ema_start="5ba"),
    "start_in_epochs_at_batch_ends": dict(half_life="8ba", update_interval="2ba", ema_start="1ep"),
    "epoch_interval": dict(half_life="1ep"),
    "epoch_interval_late_start": dict(half_life="2ep", ema_start="1ep"),
    "duration_start": dict(smoothing=0.8, update_interval="2ba", ema_start="0.3dur"),
    "samples_start": dict(half_life="4ba", update_interval="4ba", ema_start="26sp"),
}


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("case", list(CASES))
def test_composer_update_times(tmp_path, kind, case):
    composer = composer_run(CASES[case])
    assert composer.started and composer.updates  # each case averages something
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(**CASES[case], ema_schedule="composer"), kind=kind, num_train_epochs=2
    )
    trainer.train()
    assert callback.num_updates == len(composer.updates)
    expected = reference_ema(recorder.weights, composer.start_step, composer.updates)
    assert_close(state_of(callback.ema_model()), expected)


def test_the_default_schedule_differs_where_documented(tmp_path):
    """The differences docs/usage.md lists, seen on one setting: Composer starts after the first step and updates at
    multiples of the interval; hf-ema starts at train begin / at ema_start and counts the interval from the start."""
    settings = dict(half_life="4ba", update_interval="3ba", ema_start="5ba")
    composer = composer_run(settings)
    assert composer.start_step == 5 and [k for k, _ in composer.updates] == [6, 9, 12, 15]
    trainer, recorder, callback = build(tmp_path, EMAArguments(**settings), num_train_epochs=2)
    trainer.train()
    ours = [(k, 2 ** (-3 / 4)) for k in (8, 11, 14)]
    assert_close(state_of(callback.ema_model()), reference_ema(recorder.weights, 5, ours))
    assert composer_run(dict(half_life="4ba")).start_step == 1  # Composer: after the first step; hf-ema: step 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(half_life="4ba", update_interval="10sp"), ["update_interval", "'ba' or 'ep'", "10sp"]),
        (dict(half_life="1ep", update_interval="2ba"), ["half_life", "unit of `update_interval`"]),
        (dict(sigma_rel=0.1), ["sigma_rel", "hf-ema"]),
        (dict(half_life="0.1dur"), ["half_life", "unit of `update_interval`", "0.1dur"]),
    ],
)
def test_what_composer_does_not_accept_is_refused(kwargs, words):
    with pytest.raises(ValueError) as info:
        EMAArguments(**kwargs, ema_schedule="composer")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
