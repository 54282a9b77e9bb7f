"""Resume continues the average exactly; a checkpoint without (or with foreign) EMA state is refused."""

import shutil

import pytest
import torch
from conftest import RegressionDataset, TinyConfig, TinyModel, state_of
from helpers import build
from safetensors.torch import load_file, save_file

from hf_ema import EMAArguments, EMACallback, EMAStateError


def assert_identical(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def finals(trainer, callback):
    return state_of(callback.ema_model(trainer.model)), state_of(callback.training_model(trainer.model))


RESUME_CASES = {
    "interval_1": dict(half_life="4ba"),
    "interval_3": dict(half_life="4ba", update_interval="3ba"),
    "smoothing": dict(smoothing=0.8),
    "late_start_after": dict(half_life="4ba", ema_start="5ba"),
    "late_start_before": dict(half_life="4ba", ema_start="10ba"),
    "epoch_half_life": dict(half_life="1ep", update_interval="3ba"),
    "training_in_model_files": dict(half_life="4ba", ema_checkpoint_weights="training"),
    "dur_half_life": dict(half_life="0.2dur"),
    "dur_start": dict(half_life="4ba", ema_start="0.4dur", update_interval="2ba"),
}
EXTRA_ARGS = {"gradient_accumulation": {"gradient_accumulation_steps": 2, "save_steps": 4}}
RESUME_CASES["gradient_accumulation"] = dict(half_life="4ba", update_interval="3ba")
RESUME_CASES["save_only_model"] = dict(half_life="4ba")
EXTRA_ARGS["save_only_model"] = {"save_only_model": True}
RESUME_CASES["bf16_float32_average"] = dict(smoothing=0.9)
RESUME_CASES["bf16_several_averages"] = dict(half_life=["4ba", "16ba"])  # packed averages, one shared upcast


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path, kind, case):
    ema_args = EMAArguments(**RESUME_CASES[case])
    common = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 8, **EXTRA_ARGS.get(case, {})}

    def model():
        tiny = TinyModel(TinyConfig())
        return tiny.to(torch.bfloat16) if case.startswith("bf16") else tiny

    full, _, full_cb = build(tmp_path / "full", ema_args, kind=kind, model=model(), **common)
    full.train()
    expected = finals(full, full_cb)
    if case.startswith("bf16"):
        assert {t.dtype for t in full_cb.store.shadow.values()} == {torch.float32}

    # The interrupted run: resume from the full run's middle checkpoint in a fresh trainer.
    resumed, _, resumed_cb = build(tmp_path / "full", ema_args, kind=kind, model=model(), **common)
    last = full.state.global_step
    for later in range(common["save_steps"] * 2, last + 1, common["save_steps"]):
        shutil.rmtree(tmp_path / "full" / f"checkpoint-{later}")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == last
    assert resumed_cb.num_updates == full_cb.num_updates
    got = finals(resumed, resumed_cb)
    assert_identical(got[0], expected[0])
    assert_identical(got[1], expected[1])


@pytest.mark.parametrize("weights", ["float32", "bf16_several_averages"])
def test_resume_from_explicit_path_in_another_output_dir(tmp_path, weights):
    # bf16: packed float32 averages (views of one buffer) written to and read back from a folder of another run.
    several = weights.startswith("bf16")
    ema_args = EMAArguments(half_life=["4ba", "16ba"] if several else "4ba", update_interval="3ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)

    def model():
        tiny = TinyModel(TinyConfig())
        return tiny.to(torch.bfloat16) if several else tiny

    full, _, full_cb = build(tmp_path / "a", ema_args, model=model(), **common)
    full.train()
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "elsewhere" / "ckpt")
    resumed, _, resumed_cb = build(tmp_path / "b", ema_args, model=model(), **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "elsewhere" / "ckpt"))
    assert_identical(finals(resumed, resumed_cb)[0], finals(full, full_cb)[0])
    assert_identical(finals(resumed, resumed_cb)[1], finals(full, full_cb)[1])
    for label in full_cb.labels:  # every average, in its own float32, not only the primary rounded into the model
        got, want = resumed_cb.store.ema_tensors(resumed.model, label), full_cb.store.ema_tensors(full.model, label)
        assert_identical(got, want)
        assert all(t.dtype == torch.float32 for t in got.values())


def test_stock_trainer_explicit_path_via_callback(tmp_path):
    from transformers import Trainer

    ema_args = EMAArguments(half_life="4ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)
    full, _, full_cb = build(tmp_path / "a", ema_args, kind="callback", **common)
    full.train()
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "elsewhere")

    # The trainer state of the copy names the run and folder that wrote it: the callback reads the EMA state there.
    stock, _, stock_cb = build(tmp_path / "b", ema_args, kind="callback", **common)
    stock.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))
    assert_identical(finals(stock, stock_cb)[0], finals(full, full_cb)[0])
    assert_identical(finals(stock, stock_cb)[1], finals(full, full_cb)[1])
    # With that folder gone, the stock Trainer cannot tell the callback where it resumed from: a refusal.
    shutil.rmtree(tmp_path / "a" / "checkpoint-8")
    stock, _, _ = build(tmp_path / "b2", ema_args, kind="callback", **common)
    with pytest.raises(EMAStateError, match="resume_from_checkpoint=path"):
        stock.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))

    callback = EMACallback(ema_args, resume_from_checkpoint=str(tmp_path / "elsewhere"))
    base, _, _ = build(tmp_path / "c", ema_args, kind="callback", **common)
    trainer = Trainer(
        model=TinyModel(TinyConfig()),
        args=base.args,
        train_dataset=base.train_dataset,
        eval_dataset=base.eval_dataset,
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))
    assert_identical(finals(trainer, callback)[0], finals(full, full_cb)[0])


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_checkpoint_without_sidecar_is_refused(tmp_path, kind):
    ema_args = EMAArguments(half_life="4ba")
    full, _, _ = build(tmp_path, ema_args, kind=kind, num_train_epochs=2, save_strategy="steps", save_steps=8)
    full.train()
    (tmp_path / "checkpoint-8" / "ema_state.safetensors").unlink()
    resumed, _, _ = build(tmp_path, ema_args, kind=kind, num_train_epochs=2)
    with pytest.raises(EMAStateError, match=r"checkpoint-8 has no ema_state.safetensors.*ema_resume_without_state"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert resumed.state.global_step == 8  # refused at train begin, before any step


def test_restart_without_sidecar_on_purpose(tmp_path):
    full, _, _ = build(
        tmp_path, EMAArguments(half_life="4ba"), num_train_epochs=2, save_strategy="steps", save_steps=8
    )
    full.train()
    (tmp_path / "checkpoint-8" / "ema_state.safetensors").unlink()
    resumed, recorder, callback = build(
        tmp_path, EMAArguments(half_life="4ba", ema_resume_without_state="restart"), num_train_epochs=2
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert callback.num_updates == 8  # a fresh average from step 8's loaded weights
    from conftest import reference_ema

    expected = reference_ema(recorder.weights, 8, [(k, 2 ** (-1 / 4)) for k in range(9, 17)])
    got = state_of(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


def test_foreign_and_corrupt_sidecars_are_refused(tmp_path):
    ema_args = EMAArguments(half_life="4ba")
    full, _, _ = build(tmp_path, ema_args, num_train_epochs=2, save_strategy="steps", save_steps=8)
    full.train()
    sidecar = tmp_path / "checkpoint-8" / "ema_state.safetensors"
    original = sidecar.read_bytes()

    tensors = load_file(sidecar)
    from safetensors import safe_open

    with safe_open(sidecar, "pt") as handle:
        metadata = handle.metadata()
    tensors["average/4ba/linear.bias"] = torch.zeros(2)
    import json

    meta = json.loads(metadata["hf_ema"])
    meta["fingerprint"]["linear.bias"] = [[2], "float32"]
    meta["fingerprint"]["extra.weight"] = [[1], "float32"]
    save_file(tensors, sidecar, metadata={"hf_ema": json.dumps(meta)})
    resumed, _, _ = build(tmp_path, ema_args, num_train_epochs=2)
    with pytest.raises(EMAStateError, match=r"another model.*not in the model: extra.weight.*linear.bias"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))

    sidecar.write_bytes(original[: len(original) // 2])
    resumed, _, _ = build(tmp_path, ema_args, num_train_epochs=2)
    with pytest.raises(EMAStateError, match="corrupt or truncated"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))

    meta["format_version"] = 99
    save_file(
        load_file(tmp_path / "checkpoint-16" / "ema_state.safetensors"), sidecar, metadata={"hf_ema": json.dumps(meta)}
    )
    resumed, _, _ = build(tmp_path, ema_args, num_train_epochs=2)
    with pytest.raises(EMAStateError, match="format version 99.*Upgrade hf-ema"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_train_twice_continues_from_training_weights(tmp_path):
    trainer, recorder, callback = build(tmp_path, EMAArguments(half_life="4ba"))
    trainer.train()
    training_after_first = recorder.weights[8]
    recorder.weights.clear()
    trainer.train()
    # The second run started from the training weights of the first, not from the EMA left in the model.
    assert_identical(recorder.weights[0], training_after_first)


def test_stock_trainer_resuming_another_folders_checkpoint_reads_that_folder(tmp_path):
    """Outside testing found it: a stock Trainer resuming from A/checkpoint-8 while its output_dir B also holds a
    checkpoint-8 (of another run) loaded B's EMA state and training weights over what the Trainer loaded from A."""
    ema_args = EMAArguments(half_life="4ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)
    run_a, _, cb_a = build(tmp_path / "a", ema_args, kind="callback", **common)
    run_a.train()
    run_b, _, _ = build(tmp_path / "b", ema_args, kind="callback", learning_rate=0.2, **common)
    run_b.train()  # another run: B/checkpoint-8 differs from A/checkpoint-8
    resumed, _, resumed_cb = build(tmp_path / "b", ema_args, kind="callback", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert_identical(finals(resumed, resumed_cb)[0], finals(run_a, cb_a)[0])
    assert_identical(finals(resumed, resumed_cb)[1], finals(run_a, cb_a)[1])
    # Where A's EMA state cannot be found, the mismatch is refused, naming both sides.
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "moved")
    shutil.rmtree(tmp_path / "a")
    resumed, _, _ = build(tmp_path / "b", ema_args, kind="callback", **common)
    with pytest.raises(
        EMAStateError,
        match=r"restored its state from a checkpoint of run \w+ \(written in .*/a\), but the EMA state in .*/b/checkpoint-8",
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "moved"))


def test_resume_before_a_late_start_needs_no_ema_state(tmp_path):
    """A checkpoint from before `ema_start` needs no EMA state: resuming it with a stock Trainer from another folder
    (which the callback cannot find) is not refused, and the run ends as the uninterrupted one."""
    ema_args = EMAArguments(half_life="4ba", ema_start="10ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)
    full, _, full_cb = build(tmp_path / "a", ema_args, kind="callback", **common)
    full.train()
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "moved")
    (tmp_path / "moved" / "ema_state.safetensors").unlink()
    shutil.rmtree(tmp_path / "a")
    resumed, _, resumed_cb = build(tmp_path / "b", ema_args, kind="callback", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "moved"))
    assert_identical(finals(resumed, resumed_cb)[0], finals(full, full_cb)[0])


def test_rerunning_a_finished_job_leaves_the_average(tmp_path):
    """Resuming from the last checkpoint of a finished run: the Trainer takes one more step past max_steps; the
    averages do not move."""
    ema_args = EMAArguments(half_life="4ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)
    full, _, full_cb = build(tmp_path, ema_args, kind="callback", **common)
    full.train()
    expected, updates = finals(full, full_cb)[0], full_cb.num_updates
    again, _, again_cb = build(tmp_path, ema_args, kind="callback", **common)
    again.train(resume_from_checkpoint=True)
    assert again_cb.num_updates == updates == 16
    assert_identical(finals(again, again_cb)[0], expected)


def comparable_state(state) -> dict:
    """A TrainerState as transformers' own resume tests compare it: every field, the log history without the timings
    and the train loss of the last segment (a resumed run averages the loss of its own steps only)."""
    import dataclasses

    fields = dataclasses.asdict(state)
    timings = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
    fields["log_history"] = [{k: v for k, v in log.items() if k not in timings} for log in fields["log_history"]]
    return fields


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_resumed_run_ends_with_the_trainer_state_of_the_uninterrupted_run(tmp_path, kind):
    """A resumed run is the same run continuing: it keeps the run id it resumes from, so its final TrainerState
    (stateful callbacks included) equals the uninterrupted run's."""
    ema_args = EMAArguments(half_life="4ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8, logging_strategy="steps", logging_steps=4)
    full, _, _ = build(tmp_path, ema_args, kind=kind, **common)
    full.train()
    expected = comparable_state(full.state)
    assert expected["stateful_callbacks"]["hf_ema"]["attributes"]["run_id"]
    shutil.rmtree(tmp_path / "checkpoint-16")
    resumed, _, _ = build(tmp_path, ema_args, kind=kind, **common)
    resumed.train(resume_from_checkpoint=True)
    assert comparable_state(resumed.state) == expected
    fresh, _, _ = build(tmp_path / "fresh", ema_args, kind=kind, **common)
    fresh.train()  # a fresh run gets a fresh id
    assert (
        fresh.state.stateful_callbacks["hf_ema"]["attributes"]["run_id"]
        != (expected["stateful_callbacks"]["hf_ema"]["attributes"]["run_id"])
    )


def test_a_branch_resumed_into_another_folder_is_not_mistaken_for_the_original(tmp_path):
    """Two runs continuing one checkpoint share its run id; the folder each wrote in still tells their EMA states
    apart: a stock Trainer resuming branch B's state while its output_dir A holds the original's checkpoint of the same
    step reads B's EMA state, not A's."""
    ema_args = EMAArguments(half_life="4ba")
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=8)
    original, _, original_cb = build(tmp_path / "a", ema_args, kind="callback", **common)
    original.train()  # a/checkpoint-8, a/checkpoint-16
    branch, _, branch_cb = build(tmp_path / "b", ema_args, kind="callback", **common)
    branch.train_dataset = RegressionDataset(32, seed=5)  # other data from step 8 on
    branch.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))  # b/checkpoint-16, the same run id
    expected = finals(branch, branch_cb)
    assert not torch.equal(expected[0]["linear.weight"], finals(original, original_cb)[0]["linear.weight"])
    again, _, again_cb = build(tmp_path / "a", ema_args, kind="callback", **common)
    again.train_dataset = RegressionDataset(32, seed=5)
    again.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-16"))  # one more step past max_steps
    assert_identical(finals(again, again_cb)[0], expected[0])
    assert_identical(finals(again, again_cb)[1], expected[1])
