"""Switch-EMA (`ema_switch_every`): right after an update that is due, the primary average is copied into the training
weights; the optimizer and its state continue. Checked against float64 references computed by hand from the recorded
weights: those after each optimizer step (before the switch) and those the next optimizer step starts from.

The tiny run: 32 samples, batch 4 -> 8 optimizer steps per epoch; 2 epochs are 16 steps.
"""

import logging
import shutil

import pytest
import torch
from conftest import TinyConfig, TinyModel, assert_close, state_of
from helpers import build, fake_zero3
from test_bema import bema_reference
from transformers import Trainer, TrainerCallback

from hf_ema import EMA, EMAArguments
from hf_ema.schedule import EMASchedule
from hf_ema.time import Clock, Time

STEPS = 16
RUN = dict(num_train_epochs=2)
CLOSE = dict(rtol=1e-5, atol=1e-6)


class PreOptimizer(TrainerCallback):
    """Records the float64 weights (and the Adam state of `linear.weight`) each optimizer step starts from, keyed by
    the step about to be taken."""

    def __init__(self):
        self.weights, self.optimizer = {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step + 1] = state_of(model)
        self.optimizer[state.global_step + 1] = adam_state(optimizer, model)


def adam_state(optimizer, model) -> dict[str, torch.Tensor]:
    """A copy of the optimizer state of `linear.weight` (empty before the first step, or for SGD)."""
    state = optimizer.state.get(model.linear.weight, {}) if optimizer is not None else {}
    return {key: value.detach().clone() if torch.is_tensor(value) else value for key, value in state.items()}


def switched_run(post, smoothing, switches, start=0, skipped=()):
    """Float64 reference of a fixed-smoothing EMA updated every step after `start` (but `skipped`), set to the
    weights of `start`: `{step: ema_step}`. The recorded weights are those after each step, before a switch."""
    ema, out = {n: t.clone() for n, t in post[start].items()}, {}
    for step in range(start + 1, max(post) + 1):
        if step not in skipped:
            ema = {n: smoothing * ema[n] + (1.0 - smoothing) * post[step][n] for n in ema}
        out[step] = ema
    return out


def assert_switches(pre, post, expected_after, switches):
    """Each optimizer step `k + 1` starts from `expected_after[k]` after a switch at `k`, else from the weights after
    step `k`, exactly."""
    for step in range(1, max(post)):
        if step in switches:
            assert_close(pre[step + 1], expected_after[step], **CLOSE)
            assert not torch.equal(pre[step + 1]["linear.weight"], post[step]["linear.weight"]), step
        else:
            assert_close(pre[step + 1], post[step], rtol=0, atol=0)


def run(tmp_path, ema_args, kind="ema_trainer", callbacks=(), **overrides):
    pre = PreOptimizer()
    trainer, recorder, callback = build(
        tmp_path, ema_args, kind=kind, callbacks=[*callbacks, pre], **{**RUN, **overrides}
    )
    trainer.train()
    return trainer, recorder, callback, pre


# ---- the Trainer against the reference ----


@pytest.mark.parametrize("every, switches", [("4ba", [4, 8, 12, 16]), ("1ep", [8, 16])], ids=["4ba", "1ep"])
def test_training_weights_become_the_average_at_each_switch(tmp_path, caplog, every, switches):
    with caplog.at_level(logging.INFO, logger="hf_ema"):
        trainer, recorder, callback, pre = run(tmp_path, EMAArguments(smoothing=0.5, ema_switch_every=every))
    logged = [r.getMessage() for r in caplog.records if "copied into the training weights" in r.getMessage()]
    assert logged == [
        f"Step {k}: switch {n}, the EMA average '0.5' copied into the training weights (ema_switch_every={every})."
        for n, k in enumerate(switches, 1)
    ]
    assert callback.num_switches == trainer.ema_callback.num_switches == len(switches)
    assert callback.num_updates == STEPS
    expected = switched_run(recorder.weights, 0.5, switches)
    assert_switches(pre.weights, recorder.weights, expected, switches)
    assert_close(pre.weights[1], recorder.weights[0], rtol=0, atol=0)
    # The last step switched too: the training weights are the average of step 16.
    assert_close(state_of(trainer.training_model), expected[STEPS], **CLOSE)
    assert_close(state_of(trainer.ema_model), expected[STEPS], **CLOSE)
    card = trainer._ema_model_card_section()  # what push_to_hub appends to the model card
    assert f"copied into the training weights {len(switches)} times (every `{every}`)" in card


def test_half_life_switch_with_an_interval(tmp_path):
    # Updates every 2 steps with the half-life's smoothing of 2 steps; a switch every 4 steps lands on every other one.
    args = EMAArguments(half_life="4ba", update_interval="2ba", ema_switch_every="4ba")
    trainer, recorder, callback, pre = run(tmp_path, args)
    assert callback.num_updates == 8 and callback.num_switches == 4
    s = 2 ** (-2 / 4)
    ema, expected = dict(recorder.weights[0]), {}
    for step in range(2, STEPS + 1, 2):
        ema = {n: s * ema[n] + (1.0 - s) * recorder.weights[step][n] for n in ema}
        expected[step] = ema
    assert_switches(pre.weights, recorder.weights, expected, [4, 8, 12, 16])


def test_late_start_counts_switches_from_the_start(tmp_path):
    trainer, recorder, callback, pre = run(
        tmp_path, EMAArguments(smoothing=0.5, ema_start="3ba", ema_switch_every="4ba")
    )
    switches = [7, 11, 15]
    assert callback.num_switches == 3 and callback.num_updates == STEPS - 3
    assert_switches(pre.weights, recorder.weights, switched_run(recorder.weights, 0.5, switches, start=3), switches)


def test_optimizer_state_continues_across_a_switch(tmp_path):
    class AtStepEnd(TrainerCallback):  # listed before the EMA callback: the state right before the switch
        def __init__(self):
            self.optimizer = {}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.optimizer[state.global_step] = adam_state(optimizer, model)

    before = AtStepEnd()
    args = EMAArguments(smoothing=0.5, ema_switch_every="4ba")
    trainer, recorder, callback = build(tmp_path, args, callbacks=[before], optim="adamw_torch", **RUN)
    pre = PreOptimizer()
    trainer.add_callback(pre)
    trainer.train()
    assert callback.num_switches == 4
    for step in (4, 8, 12):
        after = pre.optimizer[step + 1]  # after the switch at `step`, before the next optimizer step
        assert set(after) == {"step", "exp_avg", "exp_avg_sq"}
        assert int(after["step"]) == step  # keeps counting: no restart at a switch
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key], before.optimizer[step][key]), (step, key)
        assert after["exp_avg"].abs().sum() > 0
        assert not torch.equal(pre.weights[step + 1]["linear.weight"], recorder.weights[step]["linear.weight"])
    assert int(before.optimizer[STEPS]["step"]) == STEPS


def test_bema_primary_switches_to_the_readout(tmp_path):
    trainer, recorder, callback, pre = run(tmp_path, EMAArguments(bema=True, ema_switch_every="4ba"))
    assert callback.primary_label == "bema" and callback.num_switches == 4
    for step in (4, 8, 12):
        # The readout ema_k + alpha_k (w_k - theta_0) from the weights after step k, before the switch.
        assert_close(pre.weights[step + 1], bema_reference(recorder.weights, step), **CLOSE)
    for step in (1, 2, 3, 5, 6, 7):
        assert_close(pre.weights[step + 1], recorder.weights[step], rtol=0, atol=0)


def test_a_skipped_update_does_not_switch_and_the_next_update_does(tmp_path):
    class Poison(TrainerCallback):  # non-finite weights at step 4, when a switch is due; clean ones from step 5
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                self.saved = model.linear.weight.detach().clone()
                with torch.no_grad():
                    model.linear.weight.fill_(float("inf"))

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                with torch.no_grad():
                    model.linear.weight.copy_(self.saved)

    args = EMAArguments(smoothing=0.5, ema_switch_every="4ba", ema_skip_non_finite=True)
    trainer, recorder, callback, pre = run(tmp_path, args, callbacks=[Poison()])
    # Step 4's update is skipped, and with it the switch; step 5's update makes it, and the next ones count from 5.
    switches = [5, 9, 13]
    assert callback.num_updates == STEPS - 1 and callback.num_switches == 3
    expected = switched_run(recorder.weights, 0.5, switches, skipped={4})
    assert_switches(pre.weights, recorder.weights, expected, switches)


# ---- the three faces agree ----


def test_stock_trainer_with_callback_is_bit_identical_to_ema_trainer(tmp_path):
    args = EMAArguments(half_life="3ba", ema_switch_every="4ba")
    ema_trainer, ema_recorder, ema_callback, _ = run(tmp_path / "a", args)
    stock, stock_recorder, stock_callback, _ = run(tmp_path / "b", args, kind="callback")
    assert isinstance(stock, Trainer) and stock_callback.num_switches == ema_callback.num_switches == 4
    for step, weights in ema_recorder.weights.items():
        for name, tensor in weights.items():
            assert torch.equal(stock_recorder.weights[step][name], tensor), (step, name)
    # Step 16 switched: the training weights are the float32 average itself, bit for bit.
    assert_close(state_of(stock_callback.training_model()), state_of(stock_callback.ema_model()), rtol=0, atol=0)
    pairs = [
        (stock_callback.ema_model(), ema_trainer.ema_model),
        (stock_callback.training_model(), ema_trainer.training_model),
    ]
    for stock_model, ema_model in pairs:
        expected = ema_model.state_dict()
        for name, tensor in stock_model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name


def test_hand_loop_ema_switches(tmp_path):
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = EMA(model, EMAArguments(smoothing=0.5, ema_switch_every="4ba"))
    generator = torch.Generator().manual_seed(0)
    pre, post = {}, {0: state_of(model)}
    for step in range(1, STEPS + 1):
        x = torch.randn(4, 3, generator=generator)
        model(x, labels=x @ torch.tensor([2.0, -1.0, 0.5]) + 0.3)["loss"].backward()
        pre[step] = state_of(model)
        optimizer.step()
        optimizer.zero_grad()
        post[step] = state_of(model)
        ema.step()
    assert ema.num_switches == 4 and ema.num_updates == STEPS
    expected = switched_run(post, 0.5, [4, 8, 12, 16])
    assert_switches(pre, post, expected, [4, 8, 12, 16])
    assert_close(state_of(model), expected[STEPS], **CLOSE)

    # The state dict carries the switch counters: a new EMA continues them.
    again = EMA(TinyModel(TinyConfig()), EMAArguments(smoothing=0.5, ema_switch_every="4ba"))
    again.load_state_dict(ema.state_dict())
    assert again.num_switches == 4 and again._averager.schedule.last_switch_clock == Clock(ba=16.0)


def test_switch_after_an_overlapped_update_equals_the_direct_one():
    # The host-offload path averages on a background thread; the switch reads the average after waiting for it.
    from hf_ema.store import EMAStore

    models = [TinyModel(TinyConfig(with_norm=True)) for _ in range(2)]
    stores = [EMAStore(models[0]), EMAStore(models[1], asynchronous=True)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        noise = {n: torch.randn(p.shape, generator=generator) for n, p in models[0].named_parameters()}
        for model, store in zip(models, stores, strict=True):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.add_(noise[name])
            store.update_(model, 0.5)
            store.copy_ema_to(model, model)
    stores[1].close()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(models[0].linear.weight, TinyModel(TinyConfig()).linear.weight)


# ---- resume ----


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_resume_between_switches_is_bit_exact(tmp_path, kind):
    args = EMAArguments(half_life="3ba", ema_switch_every="4ba")
    common = dict(save_strategy="steps", save_steps=6, **RUN)
    full, _, full_cb = build(tmp_path / "full", args, kind=kind, **common)
    full.train()
    assert full_cb.num_switches == 4
    expected = {
        "ema": state_of(full_cb.ema_model(full.model)),
        "training": state_of(full_cb.training_model(full.model)),
    }
    # Interrupted at step 6: after the switch at 4, before the one at 8.
    shutil.rmtree(tmp_path / "full" / "checkpoint-12")
    resumed, _, resumed_cb = build(tmp_path / "full", args, kind=kind, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.state.global_step == STEPS and resumed_cb.num_switches == 4
    got = {
        "ema": state_of(resumed_cb.ema_model(resumed.model)),
        "training": state_of(resumed_cb.training_model(resumed.model)),
    }
    for which in expected:
        for name, tensor in expected[which].items():
            assert torch.equal(got[which][name], tensor), (which, name)
    assert_close(got["training"], got["ema"], rtol=0, atol=0)  # step 16 switched


def test_schedule_counts_switches_and_restores_older_states():
    schedule = EMASchedule(Time(1, "ba"), Time(2, "ba"), {"0.5": lambda counters: 0.5}, switch_every=Time(3, "ba"))
    actions = [schedule.step(Clock(ba=float(k)), k) for k in range(0, 12)]
    assert [k for k, a in enumerate(actions) if getattr(a, "switch", False)] == [5, 8, 11]
    assert schedule.num_switches == 3 and schedule.last_switch_clock == Clock(ba=11.0)
    state = schedule.state_dict()
    assert state["num_switches"] == 3 and state["last_switch_clock"]["ba"] == 11.0
    older = {k: v for k, v in state.items() if k not in ("num_switches", "last_switch_clock")}
    restored = EMASchedule(Time(1, "ba"), Time(2, "ba"), {"0.5": lambda c: 0.5}, switch_every=Time(3, "ba"))
    restored.load_state_dict(older)  # written before Switch-EMA: counted from the start, none made
    assert restored.num_switches == 0 and restored.last_switch_clock == restored.start_clock == Clock(ba=2.0)
    assert restored.step(Clock(ba=12.0), 12).switch  # 10 steps since the start


# ---- refusals ----


def test_refusals_before_any_step(tmp_path):
    with pytest.raises(ValueError, match="ema_schedule='hf-ema'"):
        EMAArguments(half_life="4ba", ema_schedule="composer", ema_switch_every="4ba")
    with pytest.raises(ValueError, match=r"multiple of `update_interval`.*ema_switch_every='6ba'"):
        EMAArguments(half_life="4ba", update_interval="3ba", ema_switch_every="5ba")
    EMAArguments(half_life="4ba", update_interval="3ba", ema_start="2ba", ema_switch_every="6ba")  # start: any time
    with pytest.raises(ValueError, match="sharded averages"):
        EMA(fake_zero3(TinyModel(TinyConfig())), EMAArguments(ema_switch_every="4ba"))

    from types import SimpleNamespace

    model = TinyModel(TinyConfig())
    initial = state_of(model)
    trainer, _, _ = build(tmp_path, EMAArguments(ema_switch_every="4ba"), model=model, **RUN)
    trainer.args.hf_deepspeed_config = SimpleNamespace(config={"zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="DeepSpeed.*master copy"):
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert_close(state_of(model), initial, rtol=0, atol=0)


def test_command_line_and_units():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    _, parsed = parser.parse_args_into_dataclasses(["--output_dir", "x", "--ema_switch_every", "2ep"])
    assert parsed.ema_switch_every == "2ep" and parsed.switch_every_time == Time(2, "ep")
    assert parsed.units() == {"ba", "ep"}  # the 'ep' unit is checked at train begin like the others
    assert EMAArguments().ema_switch_every is None and EMAArguments().switch_every_time is None
    with pytest.raises(ValueError, match="`ema_switch_every`"):
        EMAArguments(ema_switch_every="4")
    with pytest.raises(ValueError, match="'dur'"):
        EMA(TinyModel(TinyConfig()), EMAArguments(ema_switch_every="0.5dur"))  # needs max_steps


def test_no_switch_by_default(tmp_path):
    trainer, recorder, callback, pre = run(tmp_path, EMAArguments(smoothing=0.5), max_steps=8)
    assert callback.num_switches == 0
    for step in range(1, 8):
        assert_close(pre.weights[step + 1], recorder.weights[step], rtol=0, atol=0)


@pytest.mark.parametrize("every, warned", [("20ba", True), ("16ba", False), ("3ep", True)])
def test_a_switch_the_run_never_reaches_is_told_at_train_begin(tmp_path, caplog, every, warned):
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        _, _, callback, _ = run(tmp_path, EMAArguments(smoothing=0.5, ema_switch_every=every))
    told = [r.getMessage() for r in caplog.records if "no switch happens" in r.getMessage()]
    assert len(told) == int(warned), told
    assert callback.num_switches == int(not warned)  # 16 steps: "16ba" switches once, at the last step
    if warned:
        end = "2ep" if every.endswith("ep") else "16ba"
        assert f"ema_switch_every='{every}'" in told[0] and f"the run ends at {end}" in told[0], told[0]
