"""BEMA (bias-corrected EMA, Block & Zhang, arXiv 2508.00180) as one of hf-ema's averages, against float64 references
computed by hand from the recorded training weights, and against TRL's `BEMACallback` on the same run.

The tiny run: 32 samples, batch 4 -> 8 optimizer steps per epoch; 3 epochs are 24 steps.
"""

import json
import logging
import shutil

import pytest
import torch
from conftest import Recorder, RegressionDataset, TinyConfig, TinyModel, assert_close, make_args, state_of
from helpers import build, eval_loss
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator

from hf_ema import EMA, EMAArguments, EMACallback, EMAStateError
from hf_ema.averager import Averager
from hf_ema.rules import BEMA
from hf_ema.store import EMAStore, Origin
from hf_ema.time import Clock

STEPS = 24
RUN = dict(num_train_epochs=3)
CUSTOM = dict(bema_ema_power=0.8, bema_bias_power=0.5, bema_lag=3.0, bema_multiplier=2.0)
"""Non-default kappa, eta, rho, gamma."""


def bema_reference(weights, steps, every=1, start=0, now=None, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0):
    """Float64 BEMA by hand: from theta_0 = the weights at `start`, `ema = (1 - b) ema + b w_k` at each update `k`
    (every `every` steps), `b = (rho + gamma t) ** -kappa` with `t = k - start`; read at step `now` (the last step by
    default) as `ema + a (w_now - theta_0)`, `a = (rho + gamma t_last) ** -eta`, `t_last` the t of the last update."""
    now = steps if now is None else now
    theta0 = weights[start]
    ema = {n: t.clone() for n, t in theta0.items()}
    last = start
    for k in range(start + every, steps + 1, every):
        beta = (rho + gamma * (k - start)) ** -kappa
        ema = {n: (1.0 - beta) * ema[n] + beta * weights[k][n] for n in ema}
        last = k
    alpha = (rho + gamma * (last - start)) ** -eta
    return {n: ema[n] + alpha * (weights[now][n] - theta0[n]) for n in ema}


def reference_kwargs(settings: dict) -> dict:
    names = {"bema_ema_power": "kappa", "bema_bias_power": "eta", "bema_lag": "rho", "bema_multiplier": "gamma"}
    return {names[key]: value for key, value in settings.items() if key in names}


def as64(tensors):
    return {n: t.double() for n, t in tensors.items()}


# ---- the rule ----


def test_rule_math_is_the_papers():
    rule = BEMA(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0)
    assert rule.beta(1) == 11.0**-0.5 and rule.alpha(0) == 10.0**-0.2 and rule.alpha(7) == 17.0**-0.2
    rule = BEMA(**{"ema_power": 0.8, "bias_power": 0.5, "lag": 3.0, "multiplier": 2.0})
    assert rule.beta(4) == pytest.approx(11.0**-0.8, rel=1e-15) and rule.alpha(4) == pytest.approx(11.0**-0.5)
    assert BEMA(bias_power=0.0, lag=0.0).alpha(0) == 1.0  # 0 ** 0: no correction weight to decay
    assert BEMA(ema_power=0.0).beta(5) == 1.0  # kappa 0: the average follows the weights
    assert EMAArguments(bema=True).rules() == {"bema": BEMA()}


# ---- the Trainer against the reference ----


@pytest.mark.parametrize(
    "settings, every",
    [({}, 1), ({}, 4), (CUSTOM, 1), (CUSTOM, 4)],
    ids=["defaults-1ba", "defaults-4ba", "custom-1ba", "custom-4ba"],
)
def test_ema_trainer_follows_the_reference(tmp_path, settings, every):
    args = EMAArguments(bema=True, update_interval=f"{every}ba", **settings)
    trainer, recorder, callback = build(tmp_path, args, **RUN)
    trainer.train()
    assert callback.labels == ["bema"] and callback.primary_label == "bema"
    assert callback.num_updates == STEPS // every
    expected = bema_reference(recorder.weights, STEPS, every=every, **reference_kwargs(settings))
    assert_close(state_of(trainer.model), expected)  # the model holds the readout after train()
    assert_close(state_of(trainer.ema_model), expected)
    assert_close(state_of(trainer.training_model), recorder.weights[STEPS], rtol=0, atol=0)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    assert_close(as64(load_file(tmp_path / "final" / "model.safetensors")), expected)
    with trainer.training_weights():
        trainer.save_model(str(tmp_path / "raw"))
    assert_close(as64(load_file(tmp_path / "raw" / "model.safetensors")), recorder.weights[STEPS], rtol=0, atol=0)


def test_readout_between_updates_uses_the_current_training_weights(tmp_path):
    # Updates every 5 steps: the last at step 20. At step 24 the readout is the average of step 20 with alpha of
    # t = 20 and the training weights of step 24 (TRL's running model keeps those of step 20).
    trainer, recorder, callback = build(tmp_path, EMAArguments(bema=True, update_interval="5ba"), **RUN)
    trainer.train()
    assert callback.num_updates == 4
    assert_close(state_of(trainer.ema_model), bema_reference(recorder.weights, 20, every=5, now=STEPS))


def test_late_start_counts_t_from_the_start(tmp_path):
    args = EMAArguments(bema=True, ema_start="6ba", update_interval="2ba", **CUSTOM)
    trainer, recorder, callback = build(tmp_path, args, **RUN)
    trainer.train()
    expected = bema_reference(recorder.weights, STEPS, every=2, start=6, **reference_kwargs(CUSTOM))
    assert_close(state_of(trainer.ema_model), expected)


def test_checkpoint_model_files_hold_the_readout_and_the_sidecar_theta0(tmp_path):
    trainer, recorder, _ = build(
        tmp_path, EMAArguments(bema=True, update_interval="3ba"), save_strategy="steps", save_steps=8, **RUN
    )
    trainer.train()
    folder = tmp_path / "checkpoint-8"
    # The last update before step 8 was at step 6; the model files hold its readout with the weights of step 8.
    assert_close(as64(load_file(folder / "model.safetensors")), bema_reference(recorder.weights, 6, every=3, now=8))
    with safe_open(folder / "ema_state.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    assert meta["averages"] == ["bema"] and meta["rules"]["bema"]["rule"] == "bema"
    assert meta["model_files"] == "ema" and meta["model_files_average"] == "bema"
    assert set(stored) == {
        f"{kind}/{n}" for kind in ("average/bema", "origin/bema", "training") for n in state_of(trainer.model)
    }

    def part(prefix):
        return {k.removeprefix(prefix): t.double() for k, t in stored.items() if k.startswith(prefix)}

    assert_close(part("origin/bema/"), recorder.weights[0], rtol=0, atol=0)  # theta_0: the weights at the start
    assert_close(part("training/"), recorder.weights[8], rtol=0, atol=0)
    assert_close(part("average/bema/"), bema_reference(recorder.weights, 6, every=3, now=0))  # EMA_6 itself


# ---- TRL ----


@pytest.mark.parametrize("settings, every", [({}, 1), (CUSTOM, 1), (CUSTOM, 4)], ids=["defaults", "custom", "4ba"])
def test_trl_bema_callback_agrees_with_the_reference_and_with_hf_ema(tmp_path, settings, every):
    from trl import BEMACallback

    names = {"bema_ema_power": "ema_power", "bema_bias_power": "bias_power", "bema_lag": "lag",
             "bema_multiplier": "multiplier"}  # fmt: skip
    trl_callback = BEMACallback(update_freq=every, **{names[k]: v for k, v in settings.items()})
    recorder = Recorder()
    stock = Trainer(
        model=TinyModel(TinyConfig()),
        args=make_args(tmp_path / "trl", **RUN),
        train_dataset=RegressionDataset(32, seed=0),
        callbacks=[recorder, trl_callback],
    )
    stock.train()
    expected = bema_reference(recorder.weights, STEPS, every=every, **reference_kwargs(settings))
    assert_close(state_of(trl_callback.running_model), expected)
    assert_close(as64(load_file(tmp_path / "trl" / "bema" / "model.safetensors")), expected)  # what TRL saves
    args = EMAArguments(bema=True, update_interval=f"{every}ba", **settings)
    trainer, ours, _ = build(tmp_path / "hf-ema", args, **RUN)
    trainer.train()
    assert_close(ours.weights[STEPS], recorder.weights[STEPS], rtol=0, atol=0)  # the same run
    assert_close(state_of(trainer.ema_model), state_of(trl_callback.running_model))


def test_trl_late_start_equals_a_longer_lag(tmp_path):
    # TRL's update_after=4 takes theta_0 at step 4 but puts the global step into beta and alpha; hf-ema counts t from
    # ema_start, so bema_lag = lag + multiplier * update_after gives TRL's numbers (docs/usage.md, "BEMA").
    from trl import BEMACallback

    trl_callback = BEMACallback(update_freq=1, update_after=4)
    stock = Trainer(
        model=TinyModel(TinyConfig()),
        args=make_args(tmp_path / "trl", **RUN),
        train_dataset=RegressionDataset(32, seed=0),
        callbacks=[trl_callback],
    )
    stock.train()
    trainer, recorder, _ = build(tmp_path / "hf-ema", EMAArguments(bema=True, ema_start="4ba", bema_lag=14.0), **RUN)
    trainer.train()
    expected = bema_reference(recorder.weights, STEPS, start=4, rho=14.0)
    assert_close(state_of(trainer.ema_model), expected)
    assert_close(state_of(trl_callback.running_model), expected)


# ---- the other faces ----


def test_stock_trainer_callback_equals_ema_trainer(tmp_path):
    args = EMAArguments(bema=True, update_interval="2ba", **CUSTOM)
    trainer, recorder, _ = build(tmp_path / "a", args, **RUN)
    trainer.train()
    stock, stock_recorder, callback = build(tmp_path / "b", args, kind="callback", **RUN)
    stock.train()
    assert_close(stock_recorder.weights[STEPS], recorder.weights[STEPS], rtol=0, atol=0)
    assert_close(state_of(callback.ema_model()), state_of(trainer.ema_model), rtol=0, atol=0)
    assert_close(state_of(stock.model), state_of(trainer.model), rtol=0, atol=0)  # the readout after train()
    expected = bema_reference(recorder.weights, STEPS, every=2, **reference_kwargs(CUSTOM))
    assert_close(state_of(callback.ema_model()), expected)


def test_ema_object_in_a_hand_loop_equals_ema_trainer(tmp_path):
    args = EMAArguments(bema=True, update_interval="2ba", **CUSTOM)
    batches = []

    def recording_collator(features):
        batches.append(default_data_collator(features))
        return batches[-1]

    trainer, recorder, _ = build(tmp_path, args, **RUN)
    trainer.data_collator = recording_collator
    trainer.train()
    assert len(batches) == STEPS
    # The same batches through the same steps by hand: SGD at 0.05, gradients clipped to 1.0 as the Trainer does.
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = EMA(model, args)
    weights = {0: state_of(model)}
    for step, batch in enumerate(batches, start=1):
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        weights[step] = state_of(model)
    assert_close(weights[STEPS], recorder.weights[STEPS])
    expected = bema_reference(weights, STEPS, every=2, **reference_kwargs(CUSTOM))
    assert_close(state_of(ema.ema_model()), expected)
    assert_close(state_of(ema.ema_model()), state_of(trainer.ema_model))
    with ema.average_weights():
        assert_close(state_of(model), expected)
    assert_close(state_of(model), weights[STEPS], rtol=0, atol=0)  # the training weights back, bit for bit
    ema.save_pretrained(tmp_path / "saved")
    assert_close(state_of(TinyModel.from_pretrained(tmp_path / "saved")), expected)


def test_ema_object_state_dict_resumes_bit_exactly():
    args = EMAArguments(bema=True, update_interval="3ba")

    def loop(ema, model, optimizer, steps):
        for step in range(ema.steps + 1, steps + 1):
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(4, 3, generator=generator)
            model(x=x, labels=x.sum(-1))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.step()

    def fresh():
        model = TinyModel(TinyConfig())
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    model, optimizer = fresh()
    ema = EMA(model, args)
    loop(ema, model, optimizer, 8)
    with ema.average_weights():
        state = ema.state_dict()  # taken while the readout is in the model: it holds the training weights
        saved_model = {n: t.clone() for n, t in model.state_dict().items()}
    assert {k for k in state["tensors"] if k.startswith("origin/bema/")} == {"origin/bema/linear.weight",
                                                                           "origin/bema/linear.bias"}  # fmt: skip
    loop(ema, model, optimizer, 20)
    resumed_model, resumed_optimizer = fresh()
    resumed_model.load_state_dict(saved_model)  # what the model files saved in the block hold: the readout
    resumed = EMA(resumed_model, args)
    resumed.load_state_dict(state)
    loop(resumed, resumed_model, resumed_optimizer, 20)
    assert_close(state_of(resumed_model), state_of(model), rtol=0, atol=0)
    assert_close(state_of(resumed.ema_model()), state_of(ema.ema_model()), rtol=0, atol=0)


# ---- several averages ----


def test_half_life_and_bema_together(tmp_path):
    args = EMAArguments(half_life="4ba", bema=True, ema_save_all_averages=True)
    trainer, recorder, callback = build(tmp_path, args, **RUN)
    trainer.train()
    assert callback.labels == ["4ba", "bema"] and callback.primary_label == "4ba"
    models = trainer.ema_models
    assert list(models) == ["4ba", "bema"]
    from conftest import reference_ema

    half_life = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 4)) for k in range(1, STEPS + 1)])
    bema = bema_reference(recorder.weights, STEPS)
    assert_close(state_of(models["4ba"]), half_life)
    assert_close(state_of(models["bema"]), bema)
    assert_close(state_of(trainer.model), half_life)  # the primary
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(eval_loss(half_life), rel=1e-5)
    assert metrics["eval_ema_bema_loss"] == pytest.approx(eval_loss(bema), rel=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    assert_close(as64(load_file(tmp_path / "final" / "model.safetensors")), half_life)
    assert_close(state_of(TinyModel.from_pretrained(tmp_path / "final" / "ema-bema")), bema)
    with trainer.ema_weights(label="bema"):
        assert_close(state_of(trainer.model), bema)
    assert_close(state_of(trainer.model), half_life)


def test_power_function_and_bema_together(tmp_path):
    # sigma_rel 0.2887 (gamma 0) is the uniform average of the weights at every update: SWA beside BEMA.
    trainer, recorder, callback = build(tmp_path, EMAArguments(sigma_rel=0.2887, bema=True), **RUN)
    trainer.train()
    assert callback.labels == ["0.2887", "bema"]
    swa = {n: sum(recorder.weights[k][n] for k in range(1, STEPS + 1)) / STEPS for n in recorder.weights[0]}
    assert_close(state_of(callback.ema_model()), swa)
    assert_close(state_of(callback.ema_model(label="bema")), bema_reference(recorder.weights, STEPS))


# ---- resume ----


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize(
    "ema_args",
    [EMAArguments(bema=True), EMAArguments(half_life=["4ba", "8ba"], bema=True, update_interval="3ba", **CUSTOM)],
    ids=["bema", "half_lives_and_bema_3ba"],
)
def test_resume_at_step_8_is_bit_exact(tmp_path, kind, ema_args):
    common = {"save_strategy": "steps", "save_steps": 8, **RUN}
    full, _, full_cb = build(tmp_path, ema_args, kind=kind, **common)
    full.train()
    expected = {label: state_of(m) for label, m in full_cb.ema_models().items()}
    raw = {key: t.clone() for key, t in full_cb.store.state(full.model, with_training=True).items()}
    final_model = state_of(full.model)
    shutil.rmtree(tmp_path / "checkpoint-16")
    shutil.rmtree(tmp_path / "checkpoint-24")
    resumed, _, resumed_cb = build(tmp_path, ema_args, kind=kind, **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    for label, weights in expected.items():
        assert_close(state_of(resumed_cb.ema_model(label=label)), weights, rtol=0, atol=0)
    again = resumed_cb.store.state(resumed.model, with_training=True)
    assert set(again) == set(raw) and any(isinstance(label, Origin) for label, _ in raw)
    for key, tensor in raw.items():
        assert torch.equal(again[key], tensor), key  # every average, theta_0 and the training weights
    assert_close(state_of(resumed.model), final_model, rtol=0, atol=0)


def test_sharded_ema_state_keeps_theta0(tmp_path):
    # One process: the sharded form (torch.distributed.checkpoint) writes plain tensors, read back the same way.
    model = TinyModel(TinyConfig())
    args = EMAArguments(half_life="4ba", bema=True)
    averager = Averager(args)
    averager.reset(model, sharded=True)
    averager.start(Clock(), 0)
    for step in range(1, 6):
        with torch.no_grad():
            model.linear.weight.add_(0.1 * step)
            model.linear.bias.sub_(0.05)
        averager.step(Clock(ba=float(step)), step)
    with averager.ema_weights(label="bema"):
        readout = state_of(model)
        averager.save(str(tmp_path / "checkpoint-5"), 5, main=True, holds="bema")
    assert (tmp_path / "checkpoint-5" / "ema_state").is_dir()
    before = {key: t.clone() for key, t in averager.store.state(model, with_training=True).items()}
    loaded_model = TinyModel(TinyConfig())
    loaded_model.load_state_dict({n: t.float() for n, t in readout.items()})  # the model files: the readout
    loaded = Averager(args)
    loaded.reset(loaded_model, sharded=True)
    loaded.load(str(tmp_path / "checkpoint-5"), expected_step=5)
    after = loaded.store.state(loaded_model, with_training=True)
    assert set(after) == set(before) and (Origin("bema"), "linear.weight") in after
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    assert_close(state_of(loaded.ema_model(label="bema")), readout, rtol=0, atol=0)


def _bema_checkpoint(tmp_path, ema_args):
    build(tmp_path, ema_args, save_strategy="steps", save_steps=8, **RUN)[0].train()
    return tmp_path / "checkpoint-8"


@pytest.mark.parametrize(
    "saved, asked, words",
    [
        (
            EMAArguments(half_life="4ba"),
            EMAArguments(bema=True),
            ["holds the averages ['4ba']", "['bema']", "bema=False"],
        ),
        (
            EMAArguments(bema=True),
            EMAArguments(half_life="4ba"),
            ["holds the averages ['bema']", "['4ba']", "bema=True"],
        ),
        (EMAArguments(half_life="4ba", bema=True), EMAArguments(half_life="4ba"), ["['4ba', 'bema']", "['4ba']"]),
        (EMAArguments(half_life="4ba"), EMAArguments(half_life="4ba", bema=True), ["['4ba']", "['4ba', 'bema']"]),
    ],
    ids=["half_life_to_bema", "bema_to_half_life", "drop_bema", "add_bema"],
)
def test_resume_with_other_averages_is_refused(tmp_path, saved, asked, words):
    folder = _bema_checkpoint(tmp_path, saved)
    resumed, _, _ = build(tmp_path, asked, **RUN)
    with pytest.raises(EMAStateError) as info:
        resumed.train(resume_from_checkpoint=str(folder))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_changed_bema_settings_continue_with_a_warning(tmp_path, caplog):
    # As a changed half-life of a single average: the counters and theta_0 carry over, the new kappa applies from here.
    folder = _bema_checkpoint(tmp_path, EMAArguments(bema=True))
    resumed, recorder, callback = build(tmp_path, EMAArguments(bema=True, bema_ema_power=0.7), **RUN)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        resumed.train(resume_from_checkpoint=str(folder))
    assert "settings differ" in caplog.text
    theta0 = {n: t.double() for n, t in callback.store.origins["bema"].items()}
    initial = state_of(TinyModel(TinyConfig()))  # the weights at step 0 of the checkpointed run
    assert_close(theta0, initial, rtol=0, atol=0)


def test_checkpoint_without_bema_fields_resumes_as_before_without_a_warning(tmp_path, caplog):
    # A checkpoint written before BEMA existed records settings without the bema fields: the same settings, no warning.
    args = EMAArguments(half_life="4ba")
    folder = _bema_checkpoint(tmp_path, args)
    path = folder / "ema_state.safetensors"
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
    tensors = load_file(path)
    for name in ("bema", "bema_ema_power", "bema_bias_power", "bema_lag", "bema_multiplier"):
        del meta["ema_args"][name]
    save_file(tensors, path, metadata={"hf_ema": json.dumps(meta)})
    resumed, _, _ = build(tmp_path, args, **RUN)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        resumed.train(resume_from_checkpoint=str(folder))
    assert "settings differ" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_ema"):  # a changed setting still warns
        build(tmp_path, EMAArguments(half_life="4ba", ema_skip_non_finite=True), **RUN)[0].train(
            resume_from_checkpoint=str(folder)
        )
    assert "settings differ" in caplog.text


# ---- memory and precision ----


def test_theta0_is_one_more_copy_in_the_averages_dtype():
    model = TinyModel(TinyConfig()).to(torch.bfloat16)
    plain = EMAStore(model, labels=["4ba"])
    store = EMAStore(model, labels=["4ba", "bema"], corrected={"bema": lambda: 0.5})
    assert set(store.origins) == {"bema"}
    for name, origin in store.origins["bema"].items():
        assert origin.dtype == torch.float32 and origin.device == store.averages["bema"][name].device
        assert torch.equal(origin, store.averages["bema"][name])
    assert store.nbytes() == 3 * plain.nbytes()  # two averages and one theta_0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    store.place_(model, "bema")  # average (= theta_0) + 0.5 * (w - theta_0), rounded to bf16
    for name, param in model.named_parameters():
        expected = before[name].float() + 0.5 * (training[name].float() - before[name].float())
        assert torch.equal(param.detach(), expected.to(torch.bfloat16)), name
    store.place_(model, None)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), training[name]), name


# ---- arguments ----


def test_bema_from_the_command_line_and_json(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    argv = [
        "--output_dir",
        str(tmp_path),
        "--bema",
        "--bema_lag",
        "5",
        "--half_life",
        "4ba",
        "--update_interval",
        "2ba",
    ]
    _, parsed = parser.parse_args_into_dataclasses(argv)
    assert parsed == EMAArguments(half_life="4ba", bema=True, bema_lag=5.0, update_interval="2ba")
    assert parsed.labels == ["4ba", "bema"]
    (tmp_path / "a.json").write_text(json.dumps({"output_dir": str(tmp_path), "bema": True, "bema_bias_power": 0.3}))
    _, from_json = parser.parse_json_file(str(tmp_path / "a.json"))
    assert from_json.labels == ["bema"] and from_json.rules()["bema"] == BEMA(bias_power=0.3)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(bema=True, bema_ema_power=1.5), ValueError, ["`bema_ema_power`", "[0, 1]", "1.5"]),
        (dict(bema=True, bema_ema_power=-0.1), ValueError, ["`bema_ema_power`", "-0.1"]),
        (dict(bema=True, bema_bias_power=-1.0), ValueError, ["`bema_bias_power`", ">= 0", "-1.0"]),
        (dict(bema=True, bema_lag=-1.0), ValueError, ["`bema_lag`", ">= 0", "-1.0"]),
        (dict(bema=True, bema_lag=0.0), ValueError, ["`bema_lag`", "infinite", "bema_bias_power=0"]),
        (dict(bema=True, bema_multiplier=0.0), ValueError, ["`bema_multiplier`", "positive", "0.0"]),
        (dict(bema=True, bema_lag=0.2, bema_multiplier=0.5), ValueError, ["`bema_lag` + `bema_multiplier`", "0.2"]),
        (dict(bema=True, bema_lag=float("nan")), ValueError, ["`bema_lag`", "finite", "nan"]),
        (dict(bema=True, bema_lag="ten"), ValueError, ["`bema_lag`", "'ten'"]),
        (dict(bema=True, bema_multiplier=True), TypeError, ["`bema_multiplier`", "True"]),
        (dict(bema="yes"), TypeError, ["`bema`", "'yes'"]),
        (dict(bema_lag=5.0), ValueError, ["`bema_lag`", "bema=True"]),
        (dict(bema=True, ema_warmup_power=0.75), ValueError, ["`ema_warmup_power`", "BEMA"]),
        (dict(bema=True, ema_snapshot_every="4ba"), ValueError, ["`ema_snapshot_every`", "`bema`"]),
        (dict(bema=True, sigma_rel=0.1, ema_snapshot_every="4ba"), ValueError, ["`ema_snapshot_every`", "`bema`"]),
        (dict(bema=True, ema_schedule="composer"), ValueError, ["composer", "`bema`"]),
    ],
)
def test_bad_bema_settings_fail_at_construction(kwargs, error, words):
    with pytest.raises(error) as info:
        EMAArguments(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_edge_settings_are_accepted():
    assert EMAArguments(bema=True, bema_lag=0.0, bema_bias_power=0.0).rules()["bema"].alpha(0) == 1.0
    assert EMAArguments(bema=True, bema_ema_power=0.0, bema_lag=0.0, bema_bias_power=0.0).labels == ["bema"]
    assert EMAArguments(bema=True, bema_ema_power=1.0, bema_bias_power=8.0).labels == ["bema"]
    assert EMAArguments(sigma_rel=[0.05, 0.1], bema=True).labels == ["0.05", "0.1", "bema"]
    assert EMAArguments(smoothing=0.9, bema=True).labels == ["0.9", "bema"]
    assert EMAArguments(bema=True).update_interval_time.unit == "ba"
    assert EMACallback(EMAArguments(bema=True)).labels == ["bema"]
