"""`hf_ema.EMA` in hand-written loops (Accelerate on CPU), against float64 references of the recorded weights."""

import logging
import os

import pytest
import torch
from accelerate import Accelerator
from conftest import TinyConfig, TinyModel, assert_close, reference_ema, state_of

from hf_ema import EMA, EMAArguments, EMAStateError, posthoc

HALF_LIFE_4 = 2 ** (-1 / 4)


def batch_of(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, generator=generator)
    return {"x": x, "labels": x @ torch.tensor([2.0, -1.0, 0.5]) + 0.3}


def run_loop(ema_args, steps, state_dir=None, save_at=None, resume=False, **ema_kwargs):
    """A hand-written Accelerate loop on the tiny model (with a BatchNorm, AdamW); returns (model, ema, weights)."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = TinyModel(TinyConfig(with_norm=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, ema_args, **ema_kwargs)
    accelerator.register_for_checkpointing(ema)
    if resume:
        accelerator.load_state(state_dir)
    weights = {ema.steps: state_of(model)}
    for step in range(ema.steps + 1, steps + 1):
        model.train()
        accelerator.backward(model(**batch_of(step))["loss"])
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        weights[step] = state_of(model)
        if step == save_at:
            accelerator.save_state(state_dir)
    return model, ema, weights


def averages(ema):
    return {label: state_of(module) for label, module in ema.ema_models().items()}


def test_step_follows_the_float64_reference():
    model, ema, weights = run_loop(EMAArguments(half_life="4ba"), 20)
    assert ema.steps == 20 and ema.num_updates == 20
    expected = reference_ema(weights, 0, [(k, HALF_LIFE_4) for k in range(1, 21)])
    assert_close(state_of(ema.ema_model()), expected, rtol=1e-6, atol=1e-7)


def test_interval_start_and_several_averages_follow_the_reference():
    args = EMAArguments(half_life=["4ba", "8ba"], update_interval="3ba", ema_start="5ba")
    _, ema, weights = run_loop(args, 20)
    # Started at step 5 (set to the weights then), updated at 8, 11, 14, 17, 20 with the smoothing of 3 steps.
    for label, half_life in (("4ba", 4), ("8ba", 8)):
        expected = reference_ema(weights, 5, [(k, 2 ** (-3 / half_life)) for k in range(8, 21, 3)])
        assert_close(state_of(ema.ema_model(label)), expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 5


def test_save_state_load_state_resumes_bit_exactly(tmp_path):
    args = EMAArguments(half_life=["4ba", "8ba"], update_interval="2ba")
    full_model, full_ema, _ = run_loop(args, 20, tmp_path / "state", save_at=8)
    _, resumed_ema, _ = run_loop(args, 20, tmp_path / "state", resume=True)  # new model, optimizer, EMA
    assert resumed_ema.steps == 20 and resumed_ema.num_updates == full_ema.num_updates
    for label, weights in averages(full_ema).items():
        assert_close(averages(resumed_ema)[label], weights, rtol=0, atol=0)
    assert_close(state_of(resumed_ema.model), state_of(full_model), rtol=0, atol=0)


def test_state_saved_inside_average_weights_keeps_the_training_weights(tmp_path):
    args = EMAArguments(half_life="4ba")
    model, ema, weights = run_loop(args, 6)
    state = ema.state_dict()
    assert "training/linear.weight" not in state["tensors"]  # the model holds them: accelerate saves the model
    with ema.average_weights():
        inside = ema.state_dict()
        ema_state = state_of(model)
    assert torch.equal(inside["tensors"]["training/linear.weight"].double(), weights[6]["linear.weight"])
    # A fresh EMA of a model holding the EMA weights (as the model files saved in the block) gets them back.
    fresh_model = TinyModel(TinyConfig(with_norm=True))
    fresh_model.load_state_dict({n: t.float() for n, t in ema_state.items()}, strict=False)
    fresh = EMA(fresh_model, args)
    fresh.load_state_dict(inside)
    assert_close(state_of(fresh_model), weights[6], rtol=0, atol=0)
    assert_close(state_of(fresh.ema_model()), state_of(ema.ema_model()), rtol=0, atol=0)


def test_average_weights_restores_the_training_weights_bit_for_bit():
    model, ema, weights = run_loop(EMAArguments(half_life="4ba"), 8)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    expected = reference_ema(weights, 0, [(k, HALF_LIFE_4) for k in range(1, 9)])
    with ema.average_weights() as inside:
        assert inside is model
        assert_close(state_of(model), expected)
    assert_close(state_of(model), weights[8], rtol=0, atol=0)
    with pytest.raises(ZeroDivisionError), ema.average_weights():
        raise ZeroDivisionError
    assert_close(state_of(model), weights[8], rtol=0, atol=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers  # in place
    ema.copy_to()  # diffusers' names
    assert_close(state_of(model), expected)
    with pytest.raises(RuntimeError, match="ema.restore"):
        ema.step()
    ema.restore()
    assert_close(state_of(model), weights[8], rtol=0, atol=0)


def test_save_pretrained_loads_back_equal(tmp_path):
    model, ema, _ = run_loop(EMAArguments(half_life=["4ba", "8ba"]), 8)
    ema.save_pretrained(tmp_path / "slow", label="8ba")
    loaded = TinyModel.from_pretrained(tmp_path / "slow")
    assert_close(state_of(loaded), state_of(ema.ema_model("8ba")), rtol=0, atol=0)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))  # no save_pretrained: safetensors
    plain_ema = EMA(plain, EMAArguments(smoothing=0.5))
    with torch.no_grad():
        plain[0].weight.add_(1.0)
    plain_ema.step()
    plain_ema.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "plain" / "model.safetensors")
    assert torch.equal(saved["0.weight"], plain_ema.ema_model()[0].weight.detach())


def test_post_hoc_synthesis_from_the_loops_snapshots(tmp_path):
    args = EMAArguments(sigma_rel=[0.05, 0.1], ema_snapshot_every="4ba")
    _, ema, weights = run_loop(args, 16, max_steps=16, output_dir=tmp_path)
    snapshots = posthoc.list_snapshots(tmp_path)
    assert [s.step for s in snapshots] == [4, 8, 12, 16]
    # Synthesising a tracked width gives back that average.
    synthesized = posthoc.synthesize(tmp_path, sigma_rel=0.1)
    assert_close({n: t.double() for n, t in synthesized.items()}, state_of(ema.ema_model("0.1")), rtol=1e-4, atol=1e-6)


def test_units_other_than_steps_are_counted_from_what_step_is_given():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, EMAArguments(half_life="8sp", update_interval="4sp"))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.step(samples=2)  # 2 samples: no update yet
    assert ema.num_updates == 0
    ema.step(samples=2)
    assert ema.num_updates == 1
    with pytest.raises(ValueError, match="`samples`"):
        ema.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ema_args=EMAArguments(half_life="0.1dur")), "max_steps"),
        (dict(ema_args=EMAArguments(sigma_rel=0.1, ema_snapshot_every="4ba")), "output_dir"),
        (dict(ema_args=EMAArguments(ema_schedule="composer", half_life="1ep")), "composer"),
        (dict(ema_args="4ba"), "EMAArguments"),
        (dict(max_steps=0), "max_steps"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EMA(torch.nn.Linear(2, 1), **kwargs)


def test_trainer_only_settings_are_named_and_a_foreign_state_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_ema.ema"):
        EMA(torch.nn.Linear(2, 1), EMAArguments(ema_checkpoint_weights="training"))
    assert "ema_checkpoint_weights" in caplog.text
    ema = EMA(torch.nn.Linear(2, 1), EMAArguments(half_life="4ba"))
    other = EMA(torch.nn.Linear(3, 1), EMAArguments(half_life="4ba"))
    with torch.no_grad():
        ema.model.weight.add_(1.0)
    ema.step()
    before = state_of(ema.ema_model())
    with pytest.raises(EMAStateError, match="another model"):
        ema.load_state_dict(other.state_dict())
    assert ema.num_updates == 1 and ema.steps == 1  # nothing restarted by the refused load
    assert_close(state_of(ema.ema_model()), before, rtol=0, atol=0)
    with pytest.raises(EMAStateError, match="state_dict"):
        ema.load_state_dict({"weights": 1})


def test_loop_example_resumes_exactly(tmp_path):
    from helpers import run_example

    common = ["--steps", "12", "--out", str(tmp_path / "full")]
    run_example("accelerate_ema.py", *common)
    resumed = ["--steps", "12", "--out", str(tmp_path / "resumed")]
    run_example("accelerate_ema.py", *resumed, "--stop-at", "6")  # an interrupted run: save_state at 6, then exit
    result = run_example("accelerate_ema.py", *resumed, "--resume")
    assert "resumed from step 6" in result.stdout
    from safetensors.torch import load_file

    full = load_file(os.path.join(tmp_path, "full", "ema", "model.safetensors"))
    again = load_file(os.path.join(tmp_path, "resumed", "ema", "model.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)


def test_the_loop_face_needs_no_transformers_and_nothing_imports_the_package_face():
    """`EMA` (and the averager under it) run without transformers; no module of the package imports `hf_ema` itself
    (the package face imports the layers, never the other way)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch; from hf_ema import EMA, EMAArguments; m = torch.nn.Linear(2, 1); e = EMA(m, "
        "EMAArguments(half_life='4ba')); e.step(); e.state_dict(); "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package = Path(__file__).resolve().parent.parent / "hf_ema"
    back = []
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (
                (node.level == 1 and node.module is None) or (node.level == 0 and node.module == "hf_ema")
            ):
                back += [f"{path.name}: from {'.' if node.level else 'hf_ema'} import {a.name}" for a in node.names]
            if isinstance(node, ast.Import) and any(a.name == "hf_ema" for a in node.names):
                back.append(f"{path.name}: import hf_ema")
    allowed = {"callback.py: from . import guards"}  # a sibling module, not the package face's names
    assert set(back) <= allowed, back
