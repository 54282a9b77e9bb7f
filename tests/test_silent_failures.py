"""Silent failures found by outside testing (issue 12): each now fails loudly or does the right thing.

Other items of that issue are tested where they belong: the explicit `training_weights()` block
(test_eval_save.py::test_evaluate_after_training_and_manual_calls, test_save_model_writes_ema), resuming from another
folder and re-running a finished job (test_resume.py), a zero start in `ep` (test_arguments.py).
"""

import logging

import pytest
from helpers import build

from hf_ema import EMAArguments


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("hf_ema")]


def test_an_update_interval_longer_than_the_run_is_said_at_begin_and_end(tmp_path, caplog):
    # half_life="1ep" defaults the interval to 1ep; 4 steps of an 8-step epoch: no update could happen.
    trainer, _, callback = build(tmp_path, EMAArguments(half_life="1ep"), max_steps=4)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    assert callback.num_updates == 0
    said = messages(caplog)
    assert any("first update needs 1ep" in m and "the run ends at 0.5ep" in m and "max_steps=4" in m for m in said)
    assert any("no update of the average since it started" in m for m in said)


def test_a_start_after_the_run_is_said_at_begin_and_end(tmp_path, caplog):
    trainer, _, callback = build(tmp_path, EMAArguments(half_life="4ba", ema_start="20ba"), num_train_epochs=2)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    said = messages(caplog)
    assert not callback.started
    assert any("averaging never starts: ema_start='20ba'" in m for m in said)
    assert any("ended at step 16 before averaging started" in m for m in said)


@pytest.mark.parametrize(
    "ema_args, steps",
    [(EMAArguments(half_life="4ba"), 16), (EMAArguments(half_life="1ep"), 16), (EMAArguments(half_life="8sp"), 16)],
)
def test_no_warning_when_updates_happen(tmp_path, caplog, ema_args, steps):
    trainer, _, callback = build(tmp_path, ema_args, num_train_epochs=2)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    assert callback.num_updates > 0
    assert not [m for m in messages(caplog) if "EMA:" in m]


def test_training_weight_evaluation_asked_of_a_stock_trainer_is_said(tmp_path, caplog):
    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba", ema_eval_training_weights=True), kind="callback")
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    assert any("ema_eval_training_weights=True has no effect with a stock Trainer" in m for m in messages(caplog))
    trainer, _, _ = build(tmp_path / "b", EMAArguments(half_life="4ba", ema_eval_training_weights=True))
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        caplog.clear()
        trainer.train()
    assert not any("has no effect" in m for m in messages(caplog))  # EMATrainer does evaluate them
