"""Which weights evaluation, prediction, save_model, checkpoints and hub pushes use."""

import json
import os
import shutil

import pytest
import torch
from conftest import RegressionDataset, assert_close, state_of
from helpers import ShiftedEval, build, ema_at, eval_loss
from safetensors import safe_open
from safetensors.torch import load_file

from hf_ema import EMAArguments


def as_float64(tensors):
    return {n: t.double() for n, t in tensors.items()}


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_evaluation_during_training_uses_ema(tmp_path, kind):
    trainer, recorder, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), kind=kind, num_train_epochs=2, eval_strategy="steps", eval_steps=4
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [4, 8, 12, 16]
    for entry in evals:
        expected = eval_loss(ema_at(recorder, entry["step"]))
        training = eval_loss(recorder.weights[entry["step"]])
        assert entry["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert abs(expected - training) > 1e-3  # the check can tell the two sets apart


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_training_weights_restored_after_evaluations(tmp_path, kind):
    from transformers import TrainerCallback

    seen = {}

    class LookAtStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = state_of(model)

    trainer, recorder, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba"),
        kind=kind,
        callbacks=[LookAtStepBegin()],
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=5,
    )
    trainer.train()
    for step in range(1, 16):  # the forward pass of every step sees the training weights, bit for bit
        assert_close(seen[step], recorder.weights[step], rtol=0, atol=0)


def test_evaluate_after_training_and_manual_calls(tmp_path):
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2)
    trainer.train()
    expected = ema_at(recorder, 16)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    x = RegressionDataset(16, seed=1).x.double()
    with trainer.training_weights():  # an explicit block wins over EMATrainer's own use of the EMA
        training = recorder.weights[16]
        assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss(training), rel=1e-5)
        assert_close(state_of(trainer.model), training, rtol=0, atol=0)
        predictions = trainer.predict(RegressionDataset(16, seed=1)).predictions
        reference = x @ training["linear.weight"].reshape(-1) + training["linear.bias"]
        torch.testing.assert_close(torch.as_tensor(predictions).double(), reference, rtol=1e-5, atol=1e-5)
    assert_close(state_of(trainer.model), expected)  # the block put the EMA back
    predictions = trainer.predict(RegressionDataset(16, seed=1)).predictions
    reference = x @ expected["linear.weight"].reshape(-1) + expected["linear.bias"]
    torch.testing.assert_close(torch.as_tensor(predictions).double(), reference, rtol=1e-5, atol=1e-5)
    assert_close(state_of(trainer.training_model), recorder.weights[16], rtol=0, atol=0)
    assert_close(state_of(trainer.ema_model), expected)


def test_evaluate_before_training_uses_training_weights(tmp_path):
    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba"))
    before = state_of(trainer.model)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss(before), rel=1e-5)


def test_training_weights_back_when_compute_metrics_raises_mid_training(tmp_path):
    def broken_metrics(eval_prediction):
        raise RuntimeError("metric exploded")

    trainer, recorder, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2, eval_strategy="steps", eval_steps=4
    )
    trainer.compute_metrics = broken_metrics
    with pytest.raises(RuntimeError, match="metric exploded"):
        trainer.train()
    assert_close(state_of(trainer.model), recorder.weights[4], rtol=0, atol=0)


def test_training_weights_back_when_manual_evaluate_raises(tmp_path):
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2)
    trainer.train()
    trainer.compute_metrics = lambda p: 1 / 0
    with trainer.training_weights():
        with pytest.raises(ZeroDivisionError):
            trainer.evaluate()
        assert_close(state_of(trainer.model), recorder.weights[16], rtol=0, atol=0)
    assert_close(state_of(trainer.model), ema_at(recorder, 16))  # the EMA that was in the model is back too


def test_evaluate_both_sets_in_one_log_line(tmp_path):
    trainer, recorder, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba", ema_eval_training_weights=True),
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=8,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [8, 16]
    for entry in evals:
        assert entry["eval_loss"] == pytest.approx(eval_loss(ema_at(recorder, entry["step"])), rel=1e-5)
        assert entry["eval_training_loss"] == pytest.approx(eval_loss(recorder.weights[entry["step"]]), rel=1e-5)


def test_dict_eval_datasets(tmp_path):
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba", ema_eval_training_weights=True))
    trainer.eval_dataset = {"a": RegressionDataset(16, seed=1), "b": RegressionDataset(8, seed=2)}
    trainer.train()
    metrics = trainer.evaluate()
    expected = ema_at(recorder, 8)
    assert metrics["eval_a_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    assert metrics["eval_b_loss"] == pytest.approx(eval_loss(expected, RegressionDataset(8, seed=2)), rel=1e-5)
    assert metrics["eval_b_training_loss"] == pytest.approx(
        eval_loss(recorder.weights[8], RegressionDataset(8, seed=2)), rel=1e-5
    )


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("holds", ["ema", "training"])
def test_checkpoint_files(tmp_path, kind, holds):
    trainer, recorder, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba", ema_checkpoint_weights=holds),
        kind=kind,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=8,
    )
    trainer.train()
    for step in (8, 16):
        folder = tmp_path / f"checkpoint-{step}"
        model_file = as_float64(load_file(folder / "model.safetensors"))
        ema = ema_at(recorder, step)
        training = recorder.weights[step]
        assert_close(model_file, ema if holds == "ema" else training, rtol=0 if holds == "training" else 1e-6)
        with safe_open(folder / "ema_state.safetensors", "pt") as handle:
            meta = json.loads(handle.metadata()["hf_ema"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        assert meta["format_version"] == 2 and meta["global_step"] == step and meta["model_files"] == holds
        assert meta["averages"] == ["4ba"] and meta["model_files_average"] == ("4ba" if holds == "ema" else None)
        prefix = "average/4ba/"
        assert_close(as_float64({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}), ema)
        if holds == "ema":
            training_in_file = {k[9:]: v for k, v in tensors.items() if k.startswith("training/")}
            assert_close(as_float64(training_in_file), training, rtol=0, atol=0)
        else:
            assert not any(k.startswith("training/") for k in tensors)
        assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_save_model_writes_ema(tmp_path):
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert_close(as_float64(load_file(tmp_path / "final" / "model.safetensors")), ema_at(recorder, 8))
    with trainer.training_weights():
        trainer.save_model(str(tmp_path / "final2"))  # the explicit block wins: the training weights
    assert_close(as_float64(load_file(tmp_path / "final2" / "model.safetensors")), recorder.weights[8], rtol=0, atol=0)
    with trainer.ema_weights():
        trainer.save_model(str(tmp_path / "final3"))
    assert_close(as_float64(load_file(tmp_path / "final3" / "model.safetensors")), ema_at(recorder, 8))


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_stock_trainer_save_after_training_writes_ema(tmp_path, kind):
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"), kind=kind)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert_close(as_float64(load_file(tmp_path / "final" / "model.safetensors")), ema_at(recorder, 8))


class FakeHub:
    """Stands in for huggingface_hub.HfApi.create_repo / upload_folder and snapshots each uploaded folder."""

    def __init__(self, root):
        self.root, self.uploads = root, []
        self.step = lambda: None  # a test may tell it the trainer's global_step at upload time

    def create_repo(self, api, repo_id, *args, **kwargs):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *args, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        snapshot = self.root / f"upload-{len(self.uploads)}"
        shutil.copytree(folder_path, snapshot, ignore=shutil.ignore_patterns("checkpoint-*", "_*"))
        self.uploads.append({"path_in_repo": path_in_repo, "snapshot": snapshot, "step": self.step(), **kwargs})
        if run_as_future:
            from concurrent.futures import Future

            future = Future()
            future.set_result(None)
            return future
        return None


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **k: hub.upload_folder(api, *a, **k))
    monkeypatch.setattr(HfApi, "whoami", lambda api, *a, **k: {"name": "tester"}, raising=False)
    import transformers.trainer

    for name in ("create_repo", "upload_folder"):  # transformers 4.x calls huggingface_hub's functions, 5.x HfApi's
        if hasattr(transformers.trainer, name):
            monkeypatch.setattr(
                transformers.trainer, name, lambda *a, _name=name, **k: getattr(hub, _name)(None, *a, **k)
            )
    return hub


def test_push_to_hub_pushes_ema_and_sidecar(tmp_path, fake_hub):
    out = tmp_path / "out"
    trainer, recorder, _ = build(
        out,
        EMAArguments(half_life="4ba"),
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=8,
        push_to_hub=True,
        hub_model_id="tester/tiny-ema",
        hub_strategy="checkpoint",
        hub_token="fake",
    )
    trainer.train()
    checkpoint_pushes = [u for u in fake_hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert len(checkpoint_pushes) == 2
    for push, step in zip(checkpoint_pushes, (8, 16), strict=True):
        snapshot = push["snapshot"]
        assert (snapshot / "ema_state.safetensors").is_file()  # sidecar uploaded with its checkpoint
        assert_close(as_float64(load_file(snapshot / "model.safetensors")), ema_at(recorder, step))
    intermediate = [u for u in fake_hub.uploads if u["path_in_repo"] is None]
    assert_close(as_float64(load_file(intermediate[0]["snapshot"] / "model.safetensors")), ema_at(recorder, 8))
    count = len(fake_hub.uploads)
    trainer.push_to_hub()
    final = fake_hub.uploads[count]["snapshot"]
    assert_close(as_float64(load_file(final / "model.safetensors")), ema_at(recorder, 16))
    card = (final / "README.md").read_text()
    assert "exponential moving average (EMA)" in card and "half-life `4ba`" in card and "16 updates" in card
    assert "hf-ema" in card.split("---")[1]  # tag in the card's metadata


def train_best(tmp_path, ema_args, kind, hub=None, **overrides):
    """Trains 16 steps under save_strategy="best" on `eval_loss` of ShiftedEval, evaluated every 2 steps; returns the
    trainer, its recorder and the steps whose evaluation was a new best (those the Trainer saves)."""
    best = dict(eval_strategy="steps", eval_steps=2, save_strategy="best", metric_for_best_model="eval_loss")
    trainer, recorder, _ = build(tmp_path, ema_args, kind=kind, num_train_epochs=2, **best, **overrides)
    trainer.eval_dataset = ShiftedEval()
    if hub is not None:
        hub.step = lambda: trainer.state.global_step
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    saved = [s for s in evals if evals[s] == min(v for t, v in evals.items() if t <= s)]
    assert 0 < len(saved) < len(evals)  # some evaluations save, some do not
    return trainer, recorder, saved


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("hub_strategy", ["every_save", "checkpoint"])
def test_best_checkpoint_pushes_hold_ema_and_their_sidecar(tmp_path, fake_hub, kind, hub_strategy):
    """save_strategy="best" decides a save after the evaluation, after every on_step_end: each upload, made inside
    the Trainer's checkpoint save (transformers 4.x has no on_push_begin), must already hold the EMA in its model file
    and, for a checkpoint folder, the EMA state of that step (issue 21 item 6)."""
    hub = dict(push_to_hub=True, hub_model_id="tester/tiny-ema", hub_strategy=hub_strategy, hub_token="fake")
    _, recorder, saved = train_best(tmp_path / "out", EMAArguments(half_life="4ba"), kind, hub=fake_hub, **hub)
    model_pushes = [u for u in fake_hub.uploads if u["path_in_repo"] is None]
    checkpoint_pushes = [u for u in fake_hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert [u["step"] for u in model_pushes] == saved
    assert [u["step"] for u in checkpoint_pushes] == (saved if hub_strategy == "checkpoint" else [])
    for push in model_pushes + checkpoint_pushes:  # the model file as uploaded, against the float64 reference EMA
        assert_close(as_float64(load_file(push["snapshot"] / "model.safetensors")), ema_at(recorder, push["step"]))
    for push in checkpoint_pushes:
        step, sidecar = push["step"], push["snapshot"] / "ema_state.safetensors"
        assert sidecar.is_file(), f"checkpoint-{step} was uploaded without its EMA state: {os.listdir(sidecar.parent)}"
        with safe_open(sidecar, "pt") as handle:
            meta = json.loads(handle.metadata()["hf_ema"])
            average = {k[len("average/4ba/") :]: handle.get_tensor(k) for k in handle.keys() if "average/4ba/" in k}
        assert meta["global_step"] == step and meta["model_files"] == "ema"
        assert_close(as_float64(average), ema_at(recorder, step))


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("holds", ["ema", "training"])
def test_best_checkpoints_hold_what_was_asked(tmp_path, kind, holds):
    """save_strategy="best": a checkpoint for each new best and no other folder (none holding only EMA state), each
    with the model files `ema_checkpoint_weights` asks for and its EMA state saying so."""
    _, recorder, saved = train_best(tmp_path, EMAArguments(half_life="4ba", ema_checkpoint_weights=holds), kind)
    assert sorted(os.listdir(tmp_path)) == sorted(f"checkpoint-{s}" for s in saved)
    for step in saved:
        folder = tmp_path / f"checkpoint-{step}"
        with safe_open(folder / "ema_state.safetensors", "pt") as handle:
            assert json.loads(handle.metadata()["hf_ema"])["model_files"] == holds
        model_file = as_float64(load_file(folder / "model.safetensors"))
        if holds == "training":
            assert_close(model_file, recorder.weights[step], rtol=0, atol=0)
        else:
            assert_close(model_file, ema_at(recorder, step))


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_best_checkpoints_with_several_eval_datasets_hold_the_ema(tmp_path, kind):
    """Several eval datasets: the Trainer evaluates each (one on_evaluate per dataset, each with its own metrics) and
    judges the best on one of them after all: an evaluation of another dataset, listed last, must not put the
    training weights back before the save."""
    best = dict(eval_strategy="steps", eval_steps=2, save_strategy="best", metric_for_best_model="eval_shifted_loss")
    trainer, recorder, _ = build(tmp_path, EMAArguments(half_life="4ba"), kind=kind, num_train_epochs=2, **best)
    trainer.eval_dataset = {"shifted": ShiftedEval(), "plain": RegressionDataset(16, seed=1)}
    trainer.train()
    evals = {h["step"]: h["eval_shifted_loss"] for h in trainer.state.log_history if "eval_shifted_loss" in h}
    saved = [s for s in evals if evals[s] == min(v for t, v in evals.items() if t <= s)]
    assert 0 < len(saved) < len(evals)
    assert sorted(os.listdir(tmp_path)) == sorted(f"checkpoint-{s}" for s in saved)
    for step in saved:
        folder = tmp_path / f"checkpoint-{step}"
        with safe_open(folder / "ema_state.safetensors", "pt") as handle:
            assert json.loads(handle.metadata()["hf_ema"])["model_files"] == "ema"
        assert_close(as_float64(load_file(folder / "model.safetensors")), ema_at(recorder, step))
