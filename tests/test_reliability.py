"""Failure safety: best-model loading, faults mid-training, unusual call sequences, non-finite weights."""

import logging
import os

import pytest
import torch
from conftest import Recorder, RegressionDataset, TinyConfig, TinyModel, assert_close, state_of
from helpers import TRIAL_RATES, ShiftedEval, build, ema_at, eval_loss, search_trainer, stand_in_search
from safetensors import safe_open
from transformers import TrainerCallback

from hf_ema import EMAArguments, EMACallback, EMATrainer, posthoc


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_load_best_model_at_end_restores_best_ema_and_training(tmp_path, kind):
    trainer, recorder, callback = build(
        tmp_path,
        EMAArguments(half_life="4ba"),
        kind=kind,
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    trainer.eval_dataset = ShiftedEval()
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = min(evals, key=evals.get)
    assert 2 < best_step < 16  # the test can tell "best" from "last"
    # Chosen by the EMA's metric: the EMA's loss at each step, not the training weights'.
    for step, loss in evals.items():
        assert loss == pytest.approx(eval_loss(ema_at(recorder, step), ShiftedEval()), rel=1e-5)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert_close(state_of(trainer.model), ema_at(recorder, best_step))
    assert_close(state_of(callback.training_model(trainer.model)), recorder.weights[best_step], rtol=0, atol=0)
    # Rotation kept each remaining checkpoint's sidecar with it.
    left = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert f"checkpoint-{best_step}" in left and len(left) <= 2
    assert all(os.path.isfile(tmp_path / d / "ema_state.safetensors") for d in left)


class RaiseAt(TrainerCallback):
    def __init__(self, hook, step, error):
        self.hook, self.step, self.error = hook, step, error

    def __getattribute__(self, name):
        hook = object.__getattribute__(self, "hook")
        if name == hook:

            def raise_at(args, state, control, **kwargs):
                if state.global_step == object.__getattribute__(self, "step"):
                    raise object.__getattribute__(self, "error")

            return raise_at
        return object.__getattribute__(self, name)


FAULTS = {
    "user_callback_on_evaluate": ("on_evaluate", RuntimeError("user callback broke")),
    "user_callback_on_save": ("on_save", RuntimeError("user callback broke")),
    "keyboard_interrupt_in_on_log": ("on_log", KeyboardInterrupt()),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_mid_window_leave_training_weights(tmp_path, fault):
    hook, error = FAULTS[fault]
    trainer, recorder, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba"),
        callbacks=[RaiseAt(hook, 8, error)],
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=8,
        logging_strategy="steps",
        logging_steps=8,
    )
    with pytest.raises(type(error)):
        trainer.train()
    assert_close(state_of(trainer.model), recorder.weights[8], rtol=0, atol=0)


def test_stock_trainer_fault_then_restore(tmp_path):
    trainer, recorder, callback = build(
        tmp_path,
        EMAArguments(half_life="4ba"),
        kind="callback",
        callbacks=[RaiseAt("on_evaluate", 4, RuntimeError("boom"))],
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=4,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    callback.restore_training_weights()  # the documented way out for a stock Trainer
    assert_close(state_of(trainer.model), recorder.weights[4], rtol=0, atol=0)


def test_save_failure_leaves_training_weights(tmp_path, monkeypatch):
    trainer, recorder, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2, save_strategy="steps", save_steps=8
    )

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TinyModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert_close(state_of(trainer.model), recorder.weights[8], rtol=0, atol=0)


def test_keyboard_interrupt_between_steps_then_exact_resume(tmp_path):
    ema_args = EMAArguments(half_life="4ba", update_interval="3ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=4)
    reference, _, reference_cb = build(tmp_path / "ref", ema_args, **common)
    reference.train()

    interrupted, _, _ = build(
        tmp_path / "run", ema_args, callbacks=[RaiseAt("on_step_begin", 10, KeyboardInterrupt())], **common
    )
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed, _, resumed_cb = build(tmp_path / "run", ema_args, **common)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-8, the last complete one
    assert torch.equal(resumed.model.linear.weight, reference.model.linear.weight)
    assert_close(state_of(resumed_cb.training_model()), state_of(reference_cb.training_model()), rtol=0, atol=0)


class PoisonAt(TrainerCallback):
    """Sets the training weights to NaN at the end of one step (before EMACallback sees them)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.linear.weight.fill_(float("nan"))


def test_non_finite_weights_are_refused_when_saving(tmp_path):
    trainer, _, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2, save_strategy="steps", save_steps=8
    )
    trainer.callback_handler.callbacks.insert(0, PoisonAt(6))
    with pytest.raises(FloatingPointError, match=r"'linear.weight' holds NaN or Inf at step 8.*ema_skip_non_finite"):
        trainer.train()
    assert not os.path.exists(tmp_path / "checkpoint-8")  # nothing half-written


def test_non_finite_updates_skipped_on_request(tmp_path, caplog):
    trainer, recorder, callback = build(
        tmp_path,
        EMAArguments(half_life="4ba", ema_skip_non_finite=True),
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=8,
    )
    trainer.callback_handler.callbacks.insert(0, PoisonAt(6))
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    assert "Step 6: training tensor 'linear.weight' holds NaN or Inf" in caplog.text
    assert callback.num_updates == 5  # steps 1-5; every later step is skipped
    expected = ema_at(recorder, 5)
    assert_close(state_of(callback.ema_model()), expected)


def test_predict_mid_training_uses_ema_and_leaves_training_alone(tmp_path):
    seen = {}

    class PredictAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 8:
                seen["predictions"] = trainer.predict(RegressionDataset(16, seed=1)).predictions

    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"), callbacks=[PredictAt()], num_train_epochs=2)
    plain, plain_recorder, _ = build(tmp_path / "plain", EMAArguments(half_life="4ba"), num_train_epochs=2)
    trainer.train()
    plain.train()
    expected = ema_at(recorder, 8)
    x = RegressionDataset(16, seed=1).x.double()
    reference = x @ expected["linear.weight"].reshape(-1) + expected["linear.bias"]
    torch.testing.assert_close(torch.as_tensor(seen["predictions"]).double(), reference, rtol=1e-5, atol=1e-5)
    assert_close(recorder.weights[16], plain_recorder.weights[16], rtol=0, atol=0)


def test_model_init_reinitialises_the_average_per_run(tmp_path):
    trainer = EMATrainer(
        model_init=lambda: TinyModel(TinyConfig()),
        args=build(tmp_path, None)[0].args,
        train_dataset=RegressionDataset(32),
        ema_args=EMAArguments(half_life="4ba"),
    )
    trainer.train()
    first = state_of(trainer.model)
    first_model = trainer.model
    trainer.train()
    assert trainer.model is not first_model
    assert_close(state_of(trainer.model), first, rtol=0, atol=0)  # same seed, fresh average: identical runs
    assert trainer.ema_callback.num_updates == 8


def test_auto_find_batch_size_retry_initialises_once(tmp_path):
    class FreshRecorder(Recorder):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights.clear()
            super().on_train_begin(args, state, control, model=model, **kwargs)

    class OOMOnce(TrainerCallback):
        raised = False

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2 and not OOMOnce.raised:
                OOMOnce.raised = True
                raise RuntimeError("CUDA out of memory. (simulated)")

    recorder = FreshRecorder()
    trainer = EMATrainer(
        model=TinyModel(TinyConfig()),
        args=build(tmp_path, None, auto_find_batch_size=True, per_device_train_batch_size=8)[0].args,
        train_dataset=RegressionDataset(32),
        callbacks=[recorder, OOMOnce()],
        ema_args=EMAArguments(half_life="4ba"),
    )
    trainer.train()
    assert OOMOnce.raised and trainer.state.train_batch_size < 8  # accelerate shrank the batch and retried
    steps = trainer.state.global_step
    assert steps == len(recorder.weights) - 1 and trainer.ema_callback.num_updates == steps  # the retry's steps only
    assert_close(state_of(trainer.model), ema_at(recorder, steps))


def test_changed_settings_on_resume_warn(tmp_path, caplog):
    full, _, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2, save_strategy="steps", save_steps=8
    )
    full.train()
    resumed, _, callback = build(tmp_path, EMAArguments(half_life="8ba"), num_train_epochs=2)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert "The EMA settings differ" in caplog.text and "'half_life': '8ba'" in caplog.text
    assert callback.num_updates == 16  # the counters carried over


def test_evaluate_before_training_says_so_once(tmp_path, caplog):
    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba"))
    with caplog.at_level(logging.INFO, logger="hf_ema"):
        trainer.evaluate()
        trainer.evaluate()
    assert caplog.text.count("EMA averaging has not started yet; using the training weights.") == 1


# ---- hyper-parameter search ----
#
# With the stand-in for optuna of helpers.stand_in_search: the Trainer's own code between the backend and the trial's
# train() (`_hp_search_setup`, `_get_output_dir(trial)`, `_save_checkpoint`).


def tensors(path):
    with safe_open(os.fspath(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)


def assert_same_files(folder, reference, names):
    for name in names:
        got, expected = tensors(folder / name), tensors(reference / name)
        assert set(got) == set(expected), name
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{folder / name} {key}")


HP_SEARCH_ARGS = {
    "snapshots": dict(sigma_rel=[0.05, 0.1], ema_snapshot_every="2ba"),
    "half_life": dict(half_life=["4ba", "16ba"]),
}


@pytest.mark.parametrize("settings", list(HP_SEARCH_ARGS))
def test_hyperparameter_search_trials_keep_their_own_ema_files(tmp_path, monkeypatch, settings):
    stand_in_search(monkeypatch)
    ema_args = EMAArguments(**HP_SEARCH_ARGS[settings])
    search = search_trainer(tmp_path / "search", ema_args)
    search.hyperparameter_search(n_trials=len(TRIAL_RATES), backend="optuna")
    # Each trial's checkpoints and EMA files are in its own folder, as the Trainer puts its checkpoints: none in
    # output_dir itself, none shared or set aside by the next trial.
    assert sorted(os.listdir(tmp_path / "search")) == ["run-0", "run-1"]
    snapshot_steps = [2, 4, 6, 8] if settings == "snapshots" else []
    for number, rate in enumerate(TRIAL_RATES):
        trial = tmp_path / "search" / f"run-{number}"
        alone = tmp_path / f"alone-{number}"  # the same trial trained alone: what its files must hold
        search_trainer(alone, ema_args, learning_rate=rate, model=TinyModel(TinyConfig())).train()
        assert sorted(os.listdir(trial)) == sorted(os.listdir(alone))
        for step in (4, 8):  # each checkpoint's EMA state and model files (the primary average) are that trial's
            assert_same_files(trial / f"checkpoint-{step}", alone / f"checkpoint-{step}", ["ema_state.safetensors"])
            assert_same_files(trial / f"checkpoint-{step}", alone / f"checkpoint-{step}", ["model.safetensors"])
        assert [s.step for s in posthoc.list_snapshots(trial)] == snapshot_steps
        for step in snapshot_steps:
            assert_same_files(
                trial / "ema_snapshots", alone / "ema_snapshots", [f"snapshot-{step}/ema_state.safetensors"]
            )
        if snapshot_steps:
            synthesized, expected = posthoc.synthesize(trial, 0.07), posthoc.synthesize(alone, 0.07)
            assert_close(synthesized, {n: t.double() for n, t in expected.items()}, rtol=0, atol=0)
    if snapshot_steps:  # two series, two run ids
        assert len({posthoc.list_snapshots(tmp_path / "search" / f"run-{n}")[0].meta["run"] for n in (0, 1)}) == 2

    # A trial resumed from its own checkpoint (as optuna resumes one) continues its own EMA files and ends as if
    # uninterrupted.
    stand_in_search(monkeypatch, resume={0: str(tmp_path / "search" / "run-0" / "checkpoint-4")})
    search_trainer(tmp_path / "search", ema_args).hyperparameter_search(n_trials=1, backend="optuna")
    trial, alone = tmp_path / "search" / "run-0", tmp_path / "alone-0"
    assert_same_files(trial / "checkpoint-8", alone / "checkpoint-8", ["ema_state.safetensors", "model.safetensors"])
    assert [s.step for s in posthoc.list_snapshots(trial)] == snapshot_steps
    for step in snapshot_steps:
        assert_same_files(trial / "ema_snapshots", alone / "ema_snapshots", [f"snapshot-{step}/ema_state.safetensors"])


def test_hyperparameter_search_with_a_stock_trainer_is_refused_before_writing(tmp_path, monkeypatch):
    # A callback is not told the trial's folder (`_get_output_dir` is the Trainer's), so it cannot put the trial's
    # EMA files beside its checkpoints: refused at the first trial's start, before any file is written.
    stand_in_search(monkeypatch)
    ema_args = EMAArguments(sigma_rel=[0.05, 0.1], ema_snapshot_every="2ba")
    with pytest.raises(ValueError, match="hyperparameter_search.*EMAMixin"):
        search_trainer(tmp_path, ema_args, kind="callback").hyperparameter_search(n_trials=2, backend="optuna")
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []
    # Without checkpoints or snapshots it writes nothing, and the search runs on the EMA (its objective too).
    trainer = search_trainer(tmp_path, EMAArguments(half_life="4ba"), kind="callback", save_strategy="no")
    best = trainer.hyperparameter_search(n_trials=2, backend="optuna")
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EMACallback))
    assert best.run_id in ("0", "1") and callback.num_updates == 8 and os.listdir(tmp_path) == []
