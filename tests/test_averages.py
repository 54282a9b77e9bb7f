"""Several averages and the averaging rules in one callback, against float64 references from the recorded weights.

The tiny run: 32 samples, batch 4 -> 8 optimizer steps per epoch (2 epochs: 16 steps).
"""

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import (
    Recorder,
    RegressionDataset,
    TinyConfig,
    TinyModel,
    assert_close,
    make_args,
    reference_ema,
    state_of,
)
from helpers import build, eval_loss
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_ema import EMAArguments, EMACallback, EMAStateError, EMATrainer
from hf_ema.checkpoint import SIDECAR_NAME as SIDECAR
from hf_ema.rules import SIGMA_REL_MAX, gamma_of_sigma_rel, sigma_rel_of_gamma

TWO = EMAArguments(half_life=["4ba", "8ba"])


def half_life_updates(half_life, steps, start=0, every=1):
    return [(k, 2 ** (-every / half_life)) for k in range(start + every, steps + 1, every)]


def power_reference(weights, gamma, steps, start=0, every=1):
    """EDM2's power-function average in closed form: the weights of the updates at t_i (i >= 1, steps since the
    start) with weight (t_i ** (g+1) - t_(i-1) ** (g+1)) / T ** (g+1); the start value has weight 0."""
    times = list(range(every, steps - start + 1, every))
    total = float(times[-1]) ** (gamma + 1)
    out = {n: torch.zeros_like(t) for n, t in weights[start].items()}
    previous = 0.0
    for t in times:
        share = (float(t) ** (gamma + 1) - previous ** (gamma + 1)) / total
        previous = float(t)
        for name in out:
            out[name] += share * weights[start + t][name]
    return out


# ---- arguments ----


def test_several_values_from_python_cli_json_and_yaml(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    _, from_cli = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--half_life", "500ba", "2000ba"])
    (tmp_path / "a.json").write_text(json.dumps({"output_dir": str(tmp_path), "half_life": ["500ba", "2000ba"]}))
    _, from_json = parser.parse_json_file(str(tmp_path / "a.json"))
    (tmp_path / "a.yaml").write_text(f"output_dir: {tmp_path}\nhalf_life:\n  - 500ba\n  - 2000ba\n")
    _, from_yaml = parser.parse_yaml_file(str(tmp_path / "a.yaml"))
    for parsed in (from_cli, from_json, from_yaml):
        assert parsed == EMAArguments(half_life=["500ba", "2000ba"])
        assert parsed.labels == ["500ba", "2000ba"] and parsed.primary_label == "500ba"
    _, one = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--half_life", "500ba"])
    assert one.half_life == "500ba" == EMAArguments(half_life=["500ba"]).half_life  # one value stays a scalar
    _, sigma = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sigma_rel", "0.05", "0.10"])
    assert sigma.labels == ["0.05", "0.1"] and sigma.update_interval_time.unit == "ba"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(half_life=["4ba", "4ba"]), ["must differ", "'4ba', '4ba'"]),
        (dict(half_life=["4ba", " 4ba"]), ["must differ"]),
        (dict(half_life="4ba", sigma_rel=0.1), ["`half_life` and `sigma_rel` are both set", "one kind"]),
        (dict(sigma_rel=[0.05, 0.5]), ["sigma_rel", "0.2887", "0.5"]),
        (dict(sigma_rel=0.1, ema_warmup_power=0.5), ["ema_warmup_power", "power-function"]),
        (dict(smoothing=0.99, ema_warmup_power=-1.0), ["ema_warmup_power", "positive", "-1.0"]),
        (dict(smoothing=0.99, ema_warmup_power=0.5, ema_warmup_inv_gamma=0), ["ema_warmup_inv_gamma", "positive"]),
        (dict(smoothing=[0.9, 1.5]), ["smoothing", "(0, 1)", "1.5"]),
        (dict(half_life=[]), ["half_life", "empty list"]),
        (dict(ema_eval_during_training="some"), ["ema_eval_during_training", "'all', 'primary'"]),
    ],
)
def test_bad_averages_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError) as info:
        EMAArguments(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_sigma_rel_and_gamma():
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)  # the issue's and EDM2's value
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma in (0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
        gamma = gamma_of_sigma_rel(sigma)
        # sigma_rel**2 = (g+1) / ((g+2)**2 (g+3)), checked in float64 by hand
        assert sigma**2 == pytest.approx((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)), rel=1e-12)
        assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma, rel=1e-12)
    assert gamma_of_sigma_rel(SIGMA_REL_MAX) == 0.0
    assert EMAArguments(sigma_rel=0.2887).rules()["0.2887"].gamma == 0.0  # SWA as users type it


# ---- rules, several at once ----


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_two_half_lives_match_their_references(tmp_path, kind):
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(half_life=["4ba", "2ep"]), kind=kind, num_train_epochs=2
    )
    trainer.train()
    assert callback.labels == ["4ba", "2ep"] and callback.num_updates == 16
    models = callback.ema_models()
    assert list(models) == ["4ba", "2ep"]
    assert_close(state_of(models["4ba"]), reference_ema(recorder.weights, 0, half_life_updates(4, 16)))
    # 2ep = 16 steps; updates every 1ba (half-lives in two units): the 2ep average uses elapsed/16 per step
    assert_close(state_of(models["2ep"]), reference_ema(recorder.weights, 0, half_life_updates(16, 16)))
    assert_close(state_of(trainer.model), state_of(models["4ba"]))  # the model holds the primary after train()
    assert_close(state_of(callback.training_model()), recorder.weights[16], rtol=0, atol=0)


def peers_warmup_decay(step: int, decay: float, update_after_step: int, power: float, inv_gamma: float) -> float:
    """The decay at optimizer step `step` of timm's `ModelEmaV3.get_decay(step)` and diffusers'
    `EMAModel.get_decay(optimization_step)` with warmup on and `min_decay=0` (timm 1.0.31, diffusers 0.42.1): both
    count `max(0, step - update_after_step - 1)`, and 0 steps is a copy of the weights."""
    count = max(0, step - update_after_step - 1)
    if count <= 0:
        return 0.0
    return min(1 - (1 + count / inv_gamma) ** -power, decay)


def peers_ema(weights, steps, **rule):
    """Float64 EMA as timm and diffusers run it: a copy of the weights when built (step 0), then every optimizer step
    `ema = decay * ema + (1 - decay) * w` with their decay."""
    return reference_ema(weights, 0, [(k, peers_warmup_decay(k, **rule)) for k in range(1, steps + 1)])


def test_warmup_rule(tmp_path):
    args = EMAArguments(smoothing=[0.8, 0.95], ema_warmup_power=2 / 3, ema_warmup_inv_gamma=2.0)
    trainer, recorder, callback = build(tmp_path, args, num_train_epochs=2)
    trainer.train()
    for smoothing in (0.8, 0.95):
        updates = [(t, min(smoothing, 1 - (1 + (t - 1) / 2.0) ** (-2 / 3))) for t in range(1, 17)]
        assert_close(state_of(callback.ema_model(label=str(smoothing))), reference_ema(recorder.weights, 0, updates))


@pytest.mark.parametrize("start", [0, 3])
def test_warmup_equals_timm_and_diffusers_at_every_update(tmp_path, start):
    """The warmup's smoothing at each optimizer step is timm's and diffusers' decay at that step (their
    `update_after_step` is `ema_start`): the first update copies the weights, and the averages agree after every
    update, not only at the end."""
    args = EMAArguments(smoothing=0.95, ema_warmup_power=2 / 3, ema_start=f"{start}ba")
    averages = {}

    class Averages(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # the average as the previous step left it
            if callback.num_updates:
                averages[state.global_step] = state_of(callback.ema_model())

        on_train_end = on_step_begin

    trainer, recorder, callback = build(tmp_path, args, num_train_epochs=2, callbacks=[Averages()])
    trainer.train()
    rule = dict(decay=0.95, update_after_step=start, power=2 / 3, inv_gamma=1.0)
    assert sorted(averages) == list(range(start + 1, 17))
    assert_close(averages[start + 1], recorder.weights[start + 1], rtol=0, atol=1e-7)  # the first update is a copy
    for step, average in averages.items():
        assert_close(average, peers_ema(recorder.weights, step, **rule))


def test_resuming_a_warmup_written_with_the_old_count_says_so(tmp_path, caplog):
    """A checkpoint whose warmup counted t (hf-ema before issue 21's item 7) continues with the count of timm and
    diffusers; the resume says so, naming the average, and a checkpoint written now resumes without the warning."""
    args = EMAArguments(smoothing=0.95, ema_warmup_power=2 / 3)
    first, _, _ = build(tmp_path, args, num_train_epochs=2, save_strategy="steps", save_steps=8)
    first.train()
    path = tmp_path / "checkpoint-8" / SIDECAR
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert meta["rules"]["0.95"]["count"] == "t-1"
    for old in (False, True):
        if old:
            del meta["rules"]["0.95"]["count"]
            meta["hf_ema_version"] = "0.1.0"
            save_file(tensors, path, metadata={"hf_ema": json.dumps(meta, sort_keys=True)})
        shutil.rmtree(tmp_path / "checkpoint-16")
        resumed, _, _ = build(tmp_path, args, num_train_epochs=2, save_strategy="steps", save_steps=8)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_ema"):
            resumed.train(resume_from_checkpoint=True)
        told = [r.getMessage() for r in caplog.records if "counted t optimizer steps" in r.getMessage()]
        assert len(told) == int(old), told
        if old:
            assert "hf-ema 0.1.0" in told[0] and "(averages 0.95)" in told[0] and "timm and diffusers" in told[0]


def test_warmup_counts_steps_since_a_late_start(tmp_path):
    args = EMAArguments(smoothing=0.9, ema_warmup_power=1.0, ema_start="5ba", update_interval="2ba")
    trainer, recorder, callback = build(tmp_path, args, num_train_epochs=2)
    trainer.train()
    # t = k - 5 steps since the start, counted as t - 1 (timm, diffusers): 1 optimizer step at the first update
    updates = [(k, min(0.9, 1 - 1 / (1 + (k - 6)))) for k in range(7, 17, 2)]
    assert_close(state_of(callback.ema_model()), reference_ema(recorder.weights, 5, updates))


@pytest.mark.parametrize("every", [1, 2])
def test_power_function_averages(tmp_path, every):
    args = EMAArguments(sigma_rel=[0.05, 0.10, 0.2887], update_interval=f"{every}ba")
    trainer, recorder, callback = build(tmp_path, args, num_train_epochs=2)
    trainer.train()
    for label, sigma in (("0.05", 0.05), ("0.1", 0.10)):
        gamma = gamma_of_sigma_rel(sigma)
        expected = power_reference(recorder.weights, gamma, 16, every=every)
        assert_close(state_of(callback.ema_model(label=label)), expected)
    # gamma 0 (sigma_rel 0.2887) is the uniform average of the weights at the updates: SWA
    swa = {n: sum(recorder.weights[k][n] for k in range(every, 17, every)) / (16 // every) for n in expected}
    assert_close(state_of(callback.ema_model(label="0.2887")), swa)


def test_power_function_from_a_late_start(tmp_path):
    trainer, recorder, callback = build(tmp_path, EMAArguments(sigma_rel=0.1, ema_start="6ba"), num_train_epochs=2)
    trainer.train()
    expected = power_reference(recorder.weights, gamma_of_sigma_rel(0.1), 16, start=6)
    assert_close(state_of(callback.ema_model()), expected)


# ---- evaluation, access, export ----


def test_every_average_evaluated_in_one_log_line(tmp_path):
    trainer, recorder, _ = build(
        tmp_path,
        EMAArguments(half_life=["4ba", "8ba"], ema_eval_training_weights=True),
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=8,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [8, 16]
    for entry in evals:
        step = entry["step"]
        assert entry["eval_loss"] == pytest.approx(
            eval_loss(reference_ema(recorder.weights, 0, half_life_updates(4, step))), rel=1e-5
        )
        expected_8 = reference_ema(recorder.weights, 0, half_life_updates(8, step))
        assert entry["eval_ema_8ba_loss"] == pytest.approx(eval_loss(expected_8), rel=1e-5)
        assert entry["eval_training_loss"] == pytest.approx(eval_loss(recorder.weights[step]), rel=1e-5)
    metrics = trainer.evaluate()  # after training: the same keys
    assert metrics["eval_ema_8ba_loss"] == pytest.approx(eval_loss(expected_8), rel=1e-5)
    assert_close(state_of(trainer.model), reference_ema(recorder.weights, 0, half_life_updates(4, 16)))
    with trainer.ema_weights(label="8ba"):  # an explicit block: evaluate exactly what it placed
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(eval_loss(expected_8), rel=1e-5)
        assert not any(key.startswith("eval_ema_") for key in metrics)
    prediction = trainer.predict(RegressionDataset(16, seed=1)).metrics
    assert not any(key.startswith("test_ema_") for key in prediction)  # predict: the primary only


def test_eval_during_training_limited_to_the_primary(tmp_path):
    args = EMAArguments(half_life=["4ba", "8ba"], ema_eval_during_training="primary")
    trainer, recorder, _ = build(tmp_path, args, num_train_epochs=2, eval_strategy="steps", eval_steps=8)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and not any("eval_ema_8ba_loss" in h for h in evals)
    assert "eval_ema_8ba_loss" in trainer.evaluate()  # after training, all of them


def test_metric_for_best_model_may_name_another_average(tmp_path):
    # The 8ba average's loss picks the best checkpoint; load_best_model_at_end restores that checkpoint's averages.
    trainer, recorder, callback = build(
        tmp_path,
        TWO,
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        metric_for_best_model="ema_8ba_loss",
        load_best_model_at_end=True,
    )
    trainer.train()
    losses = {h["step"]: h["eval_ema_8ba_loss"] for h in trainer.state.log_history if "eval_ema_8ba_loss" in h}
    best = min(losses, key=losses.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert_close(
        state_of(callback.ema_model(label="8ba")), reference_ema(recorder.weights, 0, half_life_updates(8, best))
    )
    assert_close(state_of(trainer.model), reference_ema(recorder.weights, 0, half_life_updates(4, best)))


def test_ema_models_are_independent_and_save_model_exports_every_average(tmp_path):
    args = EMAArguments(half_life=["4ba", "8ba"], ema_save_all_averages=True)
    trainer, recorder, _ = build(tmp_path, args)
    trainer.train()
    models = trainer.ema_models
    with torch.no_grad():
        models["8ba"].linear.weight.add_(1.0)  # an independent copy: nothing else moves
    expected = {label: reference_ema(recorder.weights, 0, half_life_updates(int(label[0]), 8)) for label in models}
    assert_close(state_of(trainer.ema_models["8ba"]), expected["8ba"])
    trainer.save_model(str(tmp_path / "final"))
    assert_close(as64(load_file(tmp_path / "final" / "model.safetensors")), expected["4ba"])
    loaded = TinyModel.from_pretrained(tmp_path / "final" / "ema-8ba")
    assert_close(state_of(loaded), expected["8ba"])
    assert_close(state_of(trainer.model), expected["4ba"])  # the primary is back in the model
    with trainer.training_weights():  # an explicit block: the training weights only, no other folders
        trainer.save_model(str(tmp_path / "raw"))
    assert not (tmp_path / "raw" / "ema-8ba").exists()
    assert_close(as64(load_file(tmp_path / "raw" / "model.safetensors")), recorder.weights[8], rtol=0, atol=0)


def as64(tensors):
    return {n: t.double() for n, t in tensors.items()}


# ---- one callback per trainer ----


def test_second_ema_callback_is_refused_before_any_step(tmp_path):
    model = TinyModel(TinyConfig())
    before = state_of(model)
    common = dict(model=model, train_dataset=RegressionDataset(32), args=build(tmp_path, TWO)[0].args)
    with pytest.raises(ValueError, match=r"already has an EMACallback.*half_life=\['500ba', '2000ba'\]"):
        Trainer(callbacks=[EMACallback(), EMACallback()], **common)
    trainer = Trainer(callbacks=[EMACallback()], **common)
    trainer.add_callback(EMACallback())
    with pytest.raises(ValueError, match="already has an EMACallback"):
        trainer.train()
    assert_close(state_of(model), before, rtol=0, atol=0)  # no step was taken
    ema_trainer, _, _ = build(tmp_path / "b", TWO)
    with pytest.raises(ValueError, match="already keeps an EMA"):
        ema_trainer.add_callback(EMACallback())
    with pytest.raises(ValueError, match="one callback keeps several averages"):
        EMATrainer(callbacks=[EMACallback(), EMACallback()], **common)
    # The same callback on a new Trainer (a notebook re-run) is fine.
    callback = EMACallback()
    Trainer(callbacks=[callback], **common)
    Trainer(callbacks=[callback], **common).train()


# ---- placement ----


class LateSave(TrainerCallback):
    """Asks for a checkpoint at step 4 after EMACallback.on_step_end has run (listed after it)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            control.should_save = True


def test_late_save_request_gets_an_honest_checkpoint(tmp_path, caplog):
    callback, recorder = EMACallback(TWO), Recorder()
    trainer = Trainer(
        model=TinyModel(TinyConfig()),
        args=make_args(tmp_path, num_train_epochs=2),
        train_dataset=RegressionDataset(32),
        callbacks=[recorder, callback, LateSave()],
    )
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        trainer.train()
    assert "checkpoint-4 holds the training weights" in caplog.text
    folder = tmp_path / "checkpoint-4"
    assert_close(as64(load_file(folder / "model.safetensors")), recorder.weights[4], rtol=0, atol=0)
    with safe_open(folder / "ema_state.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
        keys = set(handle.keys())
    assert meta["model_files"] == "training" and meta["model_files_average"] is None  # what the files really hold
    assert not any(key.startswith("training/") for key in keys)
    # Resuming from it is exact.
    final = {label: state_of(m) for label, m in callback.ema_models().items()}
    resumed_cb = EMACallback(TWO)
    resumed = Trainer(
        model=TinyModel(TinyConfig()),
        args=make_args(tmp_path, num_train_epochs=2),
        train_dataset=RegressionDataset(32),
        callbacks=[resumed_cb],
    )
    resumed.train(resume_from_checkpoint=str(folder))
    for label, weights in final.items():
        assert_close(state_of(resumed_cb.ema_model(label=label)), weights, rtol=0, atol=0)


def test_ema_trainer_keeps_its_callback_last(tmp_path):
    trainer, recorder, callback = build(tmp_path, TWO, callbacks=[LateSave()], num_train_epochs=2)
    trainer.add_callback(LateSave())
    assert trainer.callback_handler.callbacks[-1] is callback
    trainer.train()
    expected = reference_ema(recorder.weights, 0, half_life_updates(4, 4))
    assert_close(as64(load_file(tmp_path / "checkpoint-4" / "model.safetensors")), expected)


# ---- checkpoints ----


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize(
    "ema_args",
    [
        EMAArguments(half_life=["4ba", "8ba"], update_interval="3ba"),
        EMAArguments(sigma_rel=[0.05, 0.2], ema_start="3ba"),
        EMAArguments(smoothing=[0.8, 0.9], ema_warmup_power=0.75),
    ],
    ids=["half_lives", "power", "warmup"],
)
def test_resume_is_bit_exact_for_every_average(tmp_path, kind, ema_args):
    common = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 8}
    full, _, full_cb = build(tmp_path, ema_args, kind=kind, **common)
    full.train()
    expected = {label: state_of(m) for label, m in full_cb.ema_models().items()}
    training = state_of(full_cb.training_model())
    shutil.rmtree(tmp_path / "checkpoint-16")
    resumed, _, resumed_cb = build(tmp_path, ema_args, kind=kind, **common)
    resumed.train(resume_from_checkpoint=True)
    for label, weights in expected.items():
        assert_close(state_of(resumed_cb.ema_model(label=label)), weights, rtol=0, atol=0)
    assert_close(state_of(resumed_cb.training_model()), training, rtol=0, atol=0)


def test_resume_with_other_averages_is_refused(tmp_path):
    common = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 8}
    build(tmp_path, TWO, **common)[0].train()
    resumed, _, _ = build(tmp_path, EMAArguments(half_life=["4ba", "16ba"]), **common)
    with pytest.raises(EMAStateError, match=r"holds the averages \['4ba', '8ba'\].*ask for \['4ba', '16ba'\]"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


V1_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
V1_RUN = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)


def _v1_run(output_dir):
    return build(output_dir, EMAArguments(half_life="4ba"), model=TinyModel(TinyConfig(with_norm=True)), **V1_RUN)


def _final_tensors(callback, model):
    return {f"ema/{n}": t.clone() for n, t in callback.store.ema_tensors(model).items()} | {
        f"training/{n}": t.clone() for n, t in callback.store.training_tensors(model).items()
    }


def _assert_equal(actual, expected):
    assert set(actual) == set(expected), (set(actual), set(expected))
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def _as_format_1(checkpoint):
    """Rewrites a checkpoint's format-2 EMA state (one average) the way hf-ema 0.1.0 wrote it: `ema/<name>` tensors
    and the format-1 metadata (taken from the fixture, with this checkpoint's counters and fingerprint)."""
    with safe_open(os.path.join(V1_FIXTURES, "whole", "checkpoint-8", SIDECAR), "pt") as handle:
        template = json.loads(handle.metadata()["hf_ema"])
    path = os.path.join(checkpoint, SIDECAR)
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert meta["averages"] == ["4ba"] and meta["format_version"] == 2
    old = {k: meta[k] for k in ("fingerprint", "flat_names", "global_step", "model_files", "schedule")}
    save_file(
        {key.replace("average/4ba/", "ema/"): t for key, t in tensors.items()},
        path,
        metadata={"hf_ema": json.dumps({**template, **old, "format_version": 1}, sort_keys=True)},
    )


def test_format_version_1_checkpoint_resumes_as_the_uninterrupted_run(tmp_path):
    """A format-1 EMA state (hf-ema 0.1.0) continues the run exactly: an uninterrupted run made here, its checkpoint-8
    rewritten in format 1, resumed, ends bit for bit where the uninterrupted run ended (both on this machine: CPU
    kernels differ between machines, so a run is never compared bit for bit with numbers stored elsewhere)."""
    full, _, full_cb = _v1_run(tmp_path)
    full.train()
    expected = _final_tensors(full_cb, full.model)
    shutil.rmtree(tmp_path / "checkpoint-16")
    _as_format_1(tmp_path / "checkpoint-8")
    resumed, _, resumed_cb = _v1_run(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    _assert_equal(_final_tensors(resumed_cb, resumed.model), expected)
    with safe_open(tmp_path / "checkpoint-16" / SIDECAR, "pt") as handle:  # and it continues in format 2
        assert json.loads(handle.metadata()["hf_ema"])["format_version"] == 2


class _LoadedState(TrainerCallback):
    """Records the EMA callback's averages and training weights as loaded, before the first step after resuming."""

    def __init__(self, ema_callback):
        self.ema_callback, self.loaded = ema_callback, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.loaded is None:
            self.loaded = _final_tensors(self.ema_callback, model)


def test_format_version_1_fixture_checkpoints_load_exactly(tmp_path):
    """tests/fixtures/v1 was written by hf-ema 0.1.0 (tests/fixtures/make_v1.py) on another machine. Both forms load
    into exactly the tensors their files hold, continue to the same weights as each other, and end where that
    machine's uninterrupted run ended, to the precision the CPU kernels of two machines agree on."""
    stored = load_file(os.path.join(V1_FIXTURES, "expected_final.safetensors"))
    with safe_open(os.path.join(V1_FIXTURES, "whole", "checkpoint-8", SIDECAR), "pt") as handle:
        in_file = {key: handle.get_tensor(key) for key in handle.keys()}
    finals = {}
    for form in ("whole", "sharded"):
        shutil.copytree(os.path.join(V1_FIXTURES, form, "checkpoint-8"), tmp_path / form / "checkpoint-8")
        trainer, _, callback = _v1_run(tmp_path / form)
        probe = _LoadedState(callback)
        trainer.add_callback(probe)
        trainer.train(resume_from_checkpoint=True)
        _assert_equal(probe.loaded, in_file)
        finals[form] = _final_tensors(callback, trainer.model)
    _assert_equal(finals["sharded"], finals["whole"])
    assert_close(finals["whole"], {key: t.double() for key, t in stored.items()}, rtol=1e-5, atol=1e-7)


def test_stock_trainer_checkpoint_of_training_weights_after_an_evaluation(tmp_path):
    # Evaluation and checkpoint at the same step, checkpoints holding the training weights: the evaluation runs on the
    # EMA, the model files and the EMA state say training weights, and resuming is exact.
    args = EMAArguments(half_life=["4ba", "8ba"], ema_checkpoint_weights="training")
    common = dict(num_train_epochs=2, eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=8)
    trainer, recorder, callback = build(tmp_path, args, kind="callback", **common)
    trainer.train()
    folder = tmp_path / "checkpoint-8"
    assert_close(as64(load_file(folder / "model.safetensors")), recorder.weights[8], rtol=0, atol=0)
    with safe_open(folder / "ema_state.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
    assert meta["model_files"] == "training" and meta["model_files_average"] is None
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    expected = reference_ema(recorder.weights, 0, half_life_updates(4, 8))
    assert evals[0]["eval_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    final = {label: state_of(m) for label, m in callback.ema_models().items()}
    shutil.rmtree(tmp_path / "checkpoint-16")
    resumed, _, resumed_cb = build(tmp_path, args, kind="callback", **common)
    resumed.train(resume_from_checkpoint=True)
    for label, weights in final.items():
        assert_close(state_of(resumed_cb.ema_model(label=label)), weights, rtol=0, atol=0)
