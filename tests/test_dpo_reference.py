"""The EMA as the reference model of TRL's DPOTrainer (`EMAArguments(ema_reference=...)`): TR-DPO's soft update
`ref = (1 - alpha) ref + alpha policy` every `k` steps is the average `smoothing=1 - alpha, update_interval="<k>ba"`,
kept by hf-ema (float32, in the EMA state, resumed exactly) and copied into `trainer.ref_model` after every update.

The run: a tiny Llama from a config, 16 preference pairs, batch 4: 4 optimizer steps per epoch, 3 epochs (12 steps).
"""

import pytest
import torch
from conftest import Recorder, assert_close, reference_ema, state_of
from helpers import dpo_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_ema import EMA, EMAArguments

trl = pytest.importorskip("trl")

STEPS = 12
TR_DPO = EMAArguments(smoothing=0.4, update_interval="2ba", ema_reference="0.4")
"""TRL's sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=2."""


def parameters(module) -> dict[str, torch.Tensor]:
    """Float64 copies of every parameter (a reference model's are frozen or not: all of them)."""
    return {n: p.detach().to(torch.float64).clone() for n, p in module.named_parameters()}


class ReferenceRecorder(TrainerCallback):
    """The reference model's parameters at the start of every optimizer step (what that step's loss used), keyed by
    the steps completed before it, and at the end of training."""

    def __init__(self):
        self.trainer = None
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights[state.global_step] = parameters(self.trainer.ref_model)

    def on_train_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = parameters(self.trainer.ref_model)


def run(folder, ema_args=TR_DPO, kind="ema_trainer", **overrides):
    recorder, references = Recorder(), ReferenceRecorder()
    trainer = dpo_trainer(folder, ema_args, callbacks=[recorder, references], kind=kind, **overrides)
    references.trainer = trainer
    return trainer, recorder, references


def tr_dpo_reference(weights, steps, every=2, alpha=0.6):
    """Float64 TR-DPO by hand: the reference starts as the policy at step 0 and, after steps every, 2 every, ...,
    becomes (1 - alpha) ref + alpha w_k. Returns {steps completed: reference}."""
    ref = {n: t.clone() for n, t in weights[0].items()}
    out = {0: {n: t.clone() for n, t in ref.items()}}
    for k in range(1, steps + 1):
        if k % every == 0:
            ref = {n: (1.0 - alpha) * ref[n] + alpha * weights[k][n] for n in ref}
        out[k] = {n: t.clone() for n, t in ref.items()}
    return out


def trained(weights):
    return {n: t for n, t in weights.items() if "rotary" not in n}


def test_the_reference_model_holds_the_average_at_every_step(tmp_path):
    trainer, recorder, references = run(tmp_path)
    trainer.train()
    assert trainer.state.global_step == STEPS
    expected = tr_dpo_reference({k: trained(w) for k, w in recorder.weights.items()}, STEPS)
    assert sorted(references.weights) == list(range(STEPS + 1))
    for k, weights in references.weights.items():
        assert_close(weights, expected[k], rtol=1e-6, atol=1e-6)  # the reference each step's loss used
    assert trainer.ema_callback.num_updates == STEPS // 2
    # The reference is never the policy: after train() the model holds the training weights, save_model writes them.
    last = trained(recorder.weights[STEPS])
    assert_close(trained(state_of(trainer.model)), last, rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "final"))
    on_disk = {n: t.double() for n, t in load_file(tmp_path / "final" / "model.safetensors").items()}
    assert set(last) <= set(on_disk), set(last) - set(on_disk)  # every trained tensor is in the file
    assert_close({n: on_disk[n] for n in last}, last, rtol=0, atol=0)
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert not any("ema" in key for key in metrics), metrics  # the reference average is not evaluated as a policy
    card = trainer._ema_model_card_section()  # what push_to_hub appends to the model card
    assert "These are the **training weights**" in card and "`0.4` was the DPO reference model" in card


def test_equals_trl_sync_ref_model_on_the_same_run(tmp_path):
    ours, ours_policy, ours_ref = run(tmp_path / "hf-ema")
    ours.train()
    theirs, their_policy, their_ref = run(
        tmp_path / "trl", None, kind="trl", sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=2
    )
    theirs.train()
    for k in range(STEPS + 1):
        assert_close(ours_ref.weights[k], their_ref.weights[k], rtol=1e-5, atol=1e-6)
        assert_close(trained(ours_policy.weights[k]), trained(their_policy.weights[k]), rtol=1e-5, atol=1e-6)
    # and TRL's run agrees with the hand-computed reference too
    expected = tr_dpo_reference({k: trained(w) for k, w in their_policy.weights.items()}, STEPS)
    assert_close(their_ref.weights[STEPS], expected[STEPS], rtol=1e-6, atol=1e-6)


def test_resume_continues_the_reference_exactly_where_trl_restarts_it(tmp_path):
    save = dict(save_strategy="steps", save_steps=6)
    whole, whole_policy, whole_ref = run(tmp_path / "whole", **save)
    whole.train()
    expected = tr_dpo_reference({k: trained(w) for k, w in whole_policy.weights.items()}, STEPS)
    assert_close(whole_ref.weights[STEPS], expected[STEPS], rtol=1e-6, atol=1e-6)
    resumed, _, resumed_ref = run(tmp_path / "whole", **save)  # the same folder: resume from its checkpoint-6
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-6"))
    for name, value in whole_ref.weights[STEPS].items():
        assert torch.equal(resumed_ref.weights[STEPS][name], value), name
    for name, value in parameters(whole.model).items():
        assert torch.equal(parameters(resumed.model)[name], value), name
    # The first step after the resume used the average of step 6 as its reference.
    for name, value in whole_ref.weights[6].items():
        assert torch.equal(resumed_ref.weights[6][name], value), name

    # TRL's own soft update keeps no reference state: a resumed run starts its reference from ref_model again.
    trl_settings = dict(sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=2) | save
    trl_whole, _, trl_ref = run(tmp_path / "trl", None, kind="trl", **trl_settings)
    trl_whole.train()
    trl_resumed, _, trl_resumed_ref = run(tmp_path / "trl", None, kind="trl", **trl_settings)
    trl_resumed.train(resume_from_checkpoint=str(tmp_path / "trl" / "checkpoint-6"))
    gap = max((trl_resumed_ref.weights[6][n] - trl_ref.weights[6][n]).abs().max().item() for n in trl_ref.weights[6])
    assert gap > 1e-4  # TRL's reference after resuming at 6 is the initial model, not the average of step 6


def test_with_another_average_evaluation_and_saving_use_that_one(tmp_path):
    ema_args = EMAArguments(
        smoothing=[0.4, 0.5], update_interval="2ba", ema_reference="0.4", ema_save_all_averages=True
    )
    trainer, recorder, references = run(tmp_path, ema_args)
    assert trainer.ema_callback.labels == ["0.5", "0.4"]  # the reference average last, never the primary
    trainer.train()
    weights = {k: trained(w) for k, w in recorder.weights.items()}
    updates = [(k, 0.5) for k in range(2, STEPS + 1, 2)]
    assert_close(trained(state_of(trainer.model)), reference_ema(weights, 0, updates), rtol=1e-6, atol=1e-6)
    assert_close(references.weights[STEPS], tr_dpo_reference(weights, STEPS)[STEPS], rtol=1e-6, atol=1e-6)
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "ema-0.4").exists()  # ema_save_all_averages writes no folder of the reference
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert "eval_loss" in metrics and not any("0.4" in key for key in metrics), metrics


def test_a_reference_model_that_differs_from_the_policy_is_refused_at_train(tmp_path):
    from helpers import tiny_llama

    other = tiny_llama()
    with torch.no_grad():
        other.model.norm.weight.add_(0.5)
    trainer = dpo_trainer(tmp_path, TR_DPO, ref_model=other)
    with pytest.raises(ValueError, match="differs from the policy .'model.norm.weight' by up to 0.5"):
        trainer.train()


def test_the_hand_loop_ema_refuses_a_reference():
    with pytest.raises(ValueError, match="no reference model to write"):
        EMA(torch.nn.Linear(2, 2), TR_DPO)


def test_a_switch_copies_the_policys_average_not_the_references(tmp_path):
    ema_args = EMAArguments(smoothing=[0.4, 0.5], update_interval="2ba", ema_reference="0.4", ema_switch_every="4ba")
    trainer, recorder, references = run(tmp_path, ema_args)
    trainer.train()
    assert trainer.ema_callback.num_switches == STEPS // 4
    weights = {k: trained(w) for k, w in recorder.weights.items()}  # before each step's switch
    policy_average = reference_ema(weights, 0, [(k, 0.5) for k in range(2, STEPS + 1, 2)])
    assert_close(trained(state_of(trainer.training_model)), policy_average, rtol=1e-6, atol=1e-6)  # switched at 12
    assert_close(references.weights[STEPS], tr_dpo_reference(weights, STEPS)[STEPS], rtol=1e-6, atol=1e-6)


def test_before_ema_start_the_reference_is_the_one_given(tmp_path):
    ema_args = EMAArguments(smoothing=0.4, update_interval="2ba", ema_start="4ba", ema_reference="0.4")
    trainer, recorder, references = run(tmp_path, ema_args)
    trainer.train()
    weights = {k: trained(w) for k, w in recorder.weights.items()}
    for k in range(0, 4):  # steps 1-4 use the ref_model given (a copy of the policy at step 0)
        assert_close(references.weights[k], weights[0], rtol=0, atol=0)
    ref = dict(weights[4])  # averaging starts at 4 from the policy then, and updates every 2 steps after
    for k in range(4, STEPS + 1):
        if k > 4 and (k - 4) % 2 == 0:
            ref = {n: 0.4 * ref[n] + 0.6 * weights[k][n] for n in ref}
        assert_close(references.weights[k], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["is_deepspeed_enabled", "is_fsdp_enabled"])
def test_deepspeed_and_fsdp_references_are_refused(tmp_path, backend):
    from helpers import dpo_trainer

    trainer = dpo_trainer(tmp_path, TR_DPO)
    setattr(trainer, backend, True)  # what the Trainer sets under those backends; the check reads these flags
    with pytest.raises(ValueError, match="not supported with DeepSpeed or FSDP"):
        trainer._ema_reference_tensors()
