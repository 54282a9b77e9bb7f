"""The update schedule, exactly, against a float64 reference built from the recorded training weights.

The tiny run: 32 samples, batch 4 -> 8 optimizer steps per epoch, 2 epochs -> 16 steps (unless stated).
"""

import math

import pytest
from conftest import assert_close, reference_ema, state_of
from helpers import build

from hf_ema import EMAArguments

H = 2 ** (-1 / 4)  # half-life 4ba, one step


CASES = {
    "half_life_interval_1": (dict(half_life="4ba"), {}, 0, [(k, H) for k in range(1, 17)]),
    "half_life_interval_3": (
        dict(half_life="4ba", update_interval="3ba"),
        {},
        0,
        [(k, 2 ** (-3 / 4)) for k in (3, 6, 9, 12, 15)],
    ),
    "smoothing_interval_2": (dict(smoothing=0.8, update_interval="2ba"), {}, 0, [(k, 0.8) for k in range(2, 17, 2)]),
    "late_start_ba": (dict(half_life="4ba", ema_start="5ba"), {}, 5, [(k, H) for k in range(6, 17)]),
    "late_start_dur": (dict(half_life="4ba", ema_start="0.25dur"), {}, 4, [(k, H) for k in range(5, 17)]),
    "late_start_dur_interval": (
        dict(half_life="4ba", update_interval="5ba", ema_start="0.25dur"),
        {},
        4,
        [(9, 2 ** (-5 / 4)), (14, 2 ** (-5 / 4))],
    ),
    "epoch_units": (dict(half_life="1ep"), {}, 0, [(8, 0.5), (16, 0.5)]),
    "mixed_half_life_ep_interval_ba": (
        dict(half_life="1ep", update_interval="2ba"),
        {},
        0,
        [(k, 2 ** (-(2 / 8))) for k in range(2, 17, 2)],
    ),
    "samples": (dict(half_life="64sp", update_interval="8sp"), {}, 0, [(k, 2 ** (-8 / 64)) for k in range(2, 17, 2)]),
    "dur_half_life": (dict(half_life="0.25dur"), {}, 0, [(k, 2 ** (-(1 / 16) / 0.25)) for k in range(1, 17)]),
    "gradient_accumulation": (
        dict(half_life="4ba"),
        {"gradient_accumulation_steps": 2},
        0,
        [(k, H) for k in range(1, 9)],  # 8 optimizer steps from 16 micro-batches
    ),
    "epoch_start": (dict(half_life="4ba", ema_start="1ep"), {}, 8, [(k, H) for k in range(9, 17)]),
}


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_reference(tmp_path, case, kind):
    ema_kwargs, arg_overrides, start, updates = CASES[case]
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(**ema_kwargs), kind=kind, num_train_epochs=2, **arg_overrides
    )
    trainer.train()
    last = trainer.state.global_step
    assert last == (8 if "gradient_accumulation_steps" in arg_overrides else 16)
    assert callback.num_updates == len(updates)
    expected = reference_ema(recorder.weights, start, updates)
    assert_close(state_of(trainer.model), expected)  # the model holds the EMA after train()
    assert_close(state_of(callback.ema_model()), expected)
    assert_close(state_of(callback.training_model()), recorder.weights[last], rtol=0, atol=0)


def test_tokens_unit(tmp_path):
    trainer, recorder, callback = build(
        tmp_path,
        EMAArguments(half_life="24tok", update_interval="12tok"),
        num_train_epochs=2,
        include_num_input_tokens_seen=True,
    )
    trainer.train()
    # Each batch of 4 samples x 3 features counts 12 "tokens": one update per step, elapsed 12 of a 24-token half-life.
    assert trainer.state.num_input_tokens_seen == 16 * 12
    expected = reference_ema(recorder.weights, 0, [(k, 2 ** (-12 / 24)) for k in range(1, 17)])
    assert_close(state_of(trainer.model), expected)


def test_tokens_unit_needs_token_counting(tmp_path):
    trainer, _, _ = build(tmp_path, EMAArguments(half_life="1000tok"))
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the first optimizer step


def test_epoch_unit_needs_sized_dataset(tmp_path):
    import torch
    from conftest import RegressionDataset

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = RegressionDataset(32)
            for i in range(len(data)):
                yield data[i]

    trainer, _, _ = build(tmp_path, EMAArguments(half_life="1ep"), max_steps=4)
    trainer.train_dataset = Stream()
    with pytest.raises(ValueError, match="'ep' unit"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_skipped_optimizer_steps_do_not_update(tmp_path):
    """A step the optimizer skipped (fp16 overflow) must leave the average alone."""
    from transformers import TrainerCallback

    class SkipEveryThird(TrainerCallback):
        # Runs before EMACallback's on_step_end: marks the step as skipped as an fp16 GradScaler would.
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            optimizer.__dict__["_hf_ema_test_skip"] = state.global_step % 3 == 0

    trainer, recorder, callback = build(tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2)
    trainer.callback_handler.callbacks.insert(0, SkipEveryThird())
    import accelerate.optimizer as accelerate_optimizer

    original_property = accelerate_optimizer.AcceleratedOptimizer.step_was_skipped
    accelerate_optimizer.AcceleratedOptimizer.step_was_skipped = property(
        lambda self: self.__dict__.get("_hf_ema_test_skip", False)
    )
    try:
        trainer.train()
    finally:
        accelerate_optimizer.AcceleratedOptimizer.step_was_skipped = original_property
    # Steps 3, 6, ... skipped: the next update spans two steps of elapsed time.
    updates, previous = [], 0
    for k in range(1, 17):
        if k % 3 == 0:
            continue
        updates.append((k, 2 ** (-(k - previous) / 4)))
        previous = k
    assert callback.num_updates == len(updates)
    assert_close(state_of(trainer.model), reference_ema(recorder.weights, 0, updates))
    assert math.isclose(updates[2][1], 2 ** (-2 / 4))
