"""The bad-input catalogue: arguments, train-time settings, checkpoint states and model changes.

Each row triggers one bad input and names the exception type and the words its message must hold (the field or the
file, and the way out). docs/troubleshooting.md lists the same cases.
"""

import json
import shutil

import pytest
import torch
from conftest import RegressionDataset, TinyConfig, TinyModel, make_args
from helpers import build, dpo_trainer, fake_zero3, search_trainer, stand_in_search, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from hf_ema import EMA, EMAArguments, EMACallback, EMAStateError, EMATrainer, compute_ema

SIDECAR = "ema_state.safetensors"


def two_callbacks(tmp_path):
    from transformers import Trainer

    callbacks = [EMACallback(), EMACallback(EMAArguments(half_life="50ba"))]
    Trainer(model=TinyModel(TinyConfig()), args=make_args(tmp_path), callbacks=callbacks)


def stock_trainer_search(tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch:
        stand_in_search(monkeypatch)
        ema_args = EMAArguments(sigma_rel=[0.05, 0.1], ema_snapshot_every="2ba")
        search_trainer(tmp_path, ema_args, kind="callback").hyperparameter_search(n_trials=2, backend="optuna")


def trainer_plus_callback(tmp_path):
    build(tmp_path, EMAArguments(half_life="4ba"))[0].add_callback(EMACallback())


def resume_with_other_averages(tmp_path):
    trained_checkpoint(tmp_path)
    trainer, _, _ = build(tmp_path, EMAArguments(half_life=["4ba", "8ba"]), num_train_epochs=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def resume_with_bema_added(tmp_path):
    trained_checkpoint(tmp_path)
    trainer, _, _ = build(tmp_path, EMAArguments(bema=True), num_train_epochs=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def args_case(**kwargs):
    return lambda tmp_path: EMAArguments(**kwargs)


def trained_checkpoint(tmp_path, **ema_kwargs):
    """A finished run with checkpoint-8 and checkpoint-16; returns the path of checkpoint-8's sidecar."""
    trainer, _, _ = build(
        tmp_path, EMAArguments(half_life="4ba", **ema_kwargs), num_train_epochs=2, save_strategy="steps", save_steps=8
    )
    trainer.train()
    return tmp_path / "checkpoint-8" / SIDECAR


def resume(tmp_path, kind="ema_trainer", path=None, **ema_kwargs):
    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba", **ema_kwargs), kind=kind, num_train_epochs=2)
    trainer.train(resume_from_checkpoint=str(path or tmp_path / "checkpoint-8"))


def rewrite_sidecar(path, edit_meta=None, edit_tensors=None):
    with safe_open(path, "pt") as handle:
        meta = json.loads(handle.metadata()["hf_ema"])
    tensors = load_file(path)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path, metadata={"hf_ema": json.dumps(meta)})


def missing_sidecar(tmp_path):
    trained_checkpoint(tmp_path).unlink()
    resume(tmp_path)


def empty_sidecar(tmp_path):
    trained_checkpoint(tmp_path).write_bytes(b"")
    resume(tmp_path)


def truncated_sidecar(tmp_path):
    path = trained_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    resume(tmp_path)


def garbage_sidecar(tmp_path):
    trained_checkpoint(tmp_path).write_bytes(b"\x00not a safetensors file" * 10)
    resume(tmp_path)


def foreign_safetensors(tmp_path):
    path = trained_checkpoint(tmp_path)
    save_file({"x": torch.zeros(1)}, path)
    resume(tmp_path)


def newer_version(tmp_path):
    rewrite_sidecar(trained_checkpoint(tmp_path), edit_meta=lambda m: m.update(format_version=3))
    resume(tmp_path)


def foreign_names(tmp_path):
    def edit(meta):
        meta["fingerprint"]["encoder.weight"] = meta["fingerprint"].pop("linear.weight")

    rewrite_sidecar(trained_checkpoint(tmp_path), edit_meta=edit)
    resume(tmp_path)


def shape_mismatch(tmp_path):
    rewrite_sidecar(
        trained_checkpoint(tmp_path), edit_meta=lambda m: m["fingerprint"].update({"linear.bias": [[2], "float32"]})
    )
    resume(tmp_path)


def dtype_change(tmp_path):
    trainer, _, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba"),
        model=TinyModel(TinyConfig()).to(torch.bfloat16),
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=8,
    )
    trainer.train()
    resumed, _, _ = build(
        tmp_path,
        EMAArguments(half_life="4ba", ema_dtype="same"),
        model=TinyModel(TinyConfig()).to(torch.bfloat16),
        num_train_epochs=2,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def sidecar_of_another_step(tmp_path):
    path = trained_checkpoint(tmp_path)
    shutil.copy(tmp_path / "checkpoint-16" / SIDECAR, path)
    resume(tmp_path)


def training_weights_missing(tmp_path):
    def drop(tensors):
        for key in [k for k in tensors if k.startswith("training/")]:
            del tensors[key]

    rewrite_sidecar(trained_checkpoint(tmp_path), edit_tensors=drop)
    resume(tmp_path)


def stock_trainer_outside_output_dir(tmp_path):
    trained_checkpoint(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "moved")
    shutil.rmtree(tmp_path / "a")  # the folder its trainer state names is gone too
    resume(tmp_path / "b", kind="callback", path=tmp_path / "moved")


class AtStep(TrainerCallback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.action(model)


def change_model_mid_training(action, make_model=None):
    def run(tmp_path):  # a new model per run: the action changes it
        model = make_model() if make_model is not None else None
        trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba"), model=model, callbacks=[AtStep(3, action)])
        trainer.train()

    return run


def frozen_bias_model():
    model = TinyModel(TinyConfig())
    model.linear.bias.requires_grad_(False)
    return model


def resize_embeddings(tmp_path):
    model = tiny_llama(vocab=32, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1)
    tokens = torch.randint(0, 32, (16, 8))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    trainer = EMATrainer(
        model=model,
        args=build(tmp_path, None)[0].args,
        train_dataset=data,
        callbacks=[AtStep(2, lambda m: m.resize_token_embeddings(40))],
        ema_args=EMAArguments(half_life="4ba"),
    )
    trainer.train()


def non_finite_at_save(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    model.linear.weight.fill_(float("inf"))

    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba"), save_strategy="steps", save_steps=4)
    trainer.callback_handler.callbacks.insert(0, Poison())
    trainer.train()


def tokens_without_counting(tmp_path):
    build(tmp_path, EMAArguments(half_life="100tok"))[0].train()


def epochs_without_length(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = RegressionDataset(32)
            return iter(data[i] for i in range(len(data)))

    trainer, _, _ = build(tmp_path, EMAArguments(ema_start="1ep"), max_steps=4)
    trainer.train_dataset = Stream()
    trainer.train()


def callback_with_string(tmp_path):
    EMACallback("1000ba")


def trainer_with_both(tmp_path):
    EMATrainer(
        model=TinyModel(TinyConfig()),
        args=build(tmp_path, None)[0].args,
        callbacks=[EMACallback()],
        ema_args=EMAArguments(),
    )


def compute_ema_mismatch(tmp_path):
    compute_ema(TinyModel(TinyConfig()), torch.nn.Linear(3, 1), 0.9)


def train_begin(tmp_path, model, deepspeed_config=None, trainer_managed=False, ema_args=None):
    """Runs EMACallback.on_train_begin as the Trainer would, with `args.hf_deepspeed_config` when given."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    args = make_args(tmp_path)
    if deepspeed_config is not None:
        args.hf_deepspeed_config = SimpleNamespace(config=deepspeed_config)
    callback = EMACallback(ema_args or EMAArguments(half_life="4ba"))
    if trainer_managed:
        callback.bind(object())
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def fsdp1_model(tmp_path):
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # an FSDP1 module, without a process group
    nn.Module.__init__(wrapper)
    model = TinyModel(TinyConfig())
    model.add_module("sharded", wrapper)
    train_begin(tmp_path, model)


def zero3_stock_trainer_without_gather(tmp_path):
    train_begin(tmp_path, fake_zero3(TinyModel(TinyConfig())), {"zero_optimization": {"stage": 3}})


def zero3_hierarchical(tmp_path):
    train_begin(tmp_path, fake_zero3(TinyModel(TinyConfig()), ds_zero_param_process_group=object()), {}, True)


def zero3_nvme(tmp_path):
    model = fake_zero3(TinyModel(TinyConfig()))
    for param in model.parameters():
        param.ds_tensor.final_location = "OffloadDeviceEnum.nvme"
    train_begin(tmp_path, model, {"zero_optimization": {"stage": 3}}, True)


def switch_under_deepspeed(tmp_path):
    config = {"zero_optimization": {"stage": 2}}
    train_begin(tmp_path, TinyModel(TinyConfig()), config, ema_args=EMAArguments(ema_switch_every="4ba"))


def switch_of_sharded_averages(tmp_path):
    train_begin(tmp_path, fake_zero3(TinyModel(TinyConfig())), None, True, EMAArguments(ema_switch_every="4ba"))


def sharded_state_missing_shard(tmp_path):
    from hf_ema.averager import Averager
    from hf_ema.resume import resume
    from hf_ema.time import Clock

    model = TinyModel(TinyConfig())
    averager = Averager(EMAArguments(half_life="4ba"))
    averager.reset(model, sharded=True)  # one process: DCP writes plain tensors
    averager.start(Clock(), 0)
    folder = tmp_path / "checkpoint-8"
    averager.save(str(folder), 8, main=True, holds="4ba")
    (folder / "ema_state" / "__0_0.distcp").unlink()
    resumed = Averager(EMAArguments(half_life="4ba"))
    resumed.reset(model, sharded=False)
    resume(resumed, str(folder), True, None, 8, Clock(ba=8))


def zero3_copy(tmp_path):
    from hf_ema.store import EMAStore

    model = fake_zero3(TinyModel(TinyConfig()))
    callback = EMACallback(EMAArguments(half_life="4ba"))
    callback.averager.model, callback.averager.store = model, EMAStore(model)
    callback.ema_model()


TR_DPO = dict(smoothing=0.4, update_interval="2ba", ema_reference="0.4")


def dpo_case(**overrides):
    return lambda tmp_path: dpo_trainer(tmp_path, EMAArguments(**TR_DPO), **overrides)


def reference_with_peft(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    dpo_trainer(tmp_path, EMAArguments(**TR_DPO), ref_model=None, peft_config=lora)


def reference_on_a_trainer_without_one(tmp_path):
    build(tmp_path, EMAArguments(**TR_DPO))


def reference_unlike_the_policy(tmp_path):
    dpo_trainer(tmp_path, EMAArguments(**TR_DPO), ref_model=tiny_llama(layers=1))


def reference_starting_elsewhere(tmp_path):
    other = tiny_llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    dpo_trainer(tmp_path, EMAArguments(**TR_DPO), ref_model=other).train()


def reference_in_a_hand_loop(tmp_path):
    EMA(TinyModel(TinyConfig()), EMAArguments(**TR_DPO))


CATALOGUE = [
    # arguments: fail at EMAArguments(...)
    ("half_life without unit", args_case(half_life="1000"), ValueError, ["`half_life`", "'1000'", "1000ba"]),
    ("half_life not a time", args_case(half_life="abc"), ValueError, ["`half_life`", "'abc'"]),
    ("half_life unknown unit", args_case(half_life="10xx"), ValueError, ["`half_life`", "units"]),
    ("half_life empty", args_case(half_life=""), ValueError, ["`half_life`"]),
    ("half_life nan", args_case(half_life="nanba"), ValueError, ["`half_life`", "'nanba'"]),
    ("half_life inf", args_case(half_life="infba"), ValueError, ["`half_life`", "'infba'"]),
    ("half_life zero", args_case(half_life="0ba"), ValueError, ["`half_life`", "positive"]),
    ("half_life fraction of steps", args_case(half_life="2.5ba"), ValueError, ["`half_life`", "whole number"]),
    ("half_life int", args_case(half_life=1000), TypeError, ["`half_life`", "string"]),
    ("smoothing 1", args_case(smoothing=1.0), ValueError, ["`smoothing`", "(0, 1)"]),
    ("smoothing nan", args_case(smoothing=float("nan")), ValueError, ["`smoothing`"]),
    ("smoothing bool", args_case(smoothing=True), TypeError, ["`smoothing`"]),
    (
        "half_life and smoothing",
        args_case(half_life="10ba", smoothing=0.9),
        ValueError,
        ["`half_life`", "`smoothing`"],
    ),
    ("half_life and sigma_rel", args_case(half_life="10ba", sigma_rel=0.1), ValueError, ["`sigma_rel`", "one kind"]),
    ("repeated average", args_case(half_life=["10ba", "10ba"]), ValueError, ["must differ", "'10ba', '10ba'"]),
    ("sigma_rel too wide", args_case(sigma_rel=[0.05, 0.4]), ValueError, ["`sigma_rel`", "0.2887", "0.4"]),
    ("warmup of power functions", args_case(sigma_rel=0.1, ema_warmup_power=0.75), ValueError, ["ema_warmup_power"]),
    ("warmup power negative", args_case(smoothing=0.99, ema_warmup_power=-1), ValueError, ["`ema_warmup_power`"]),
    ("update_interval zero", args_case(update_interval="0ba"), ValueError, ["`update_interval`", "positive"]),
    ("ema_start negative", args_case(ema_start="-1ba"), ValueError, ["`ema_start`", "negative"]),
    ("ema_start past the run", args_case(ema_start="1.5dur"), ValueError, ["`ema_start`", "[0, 1]"]),
    ("ema_dtype unknown", args_case(ema_dtype="float16"), ValueError, ["`ema_dtype`", "'float16'", "'auto'"]),
    ("checkpoint weights unknown", args_case(ema_checkpoint_weights="both"), ValueError, ["`ema_checkpoint_weights`"]),
    ("BEMA kappa out of range", args_case(bema=True, bema_ema_power=1.5), ValueError, ["`bema_ema_power`", "[0, 1]"]),
    ("BEMA eta negative", args_case(bema=True, bema_bias_power=-0.2), ValueError, ["`bema_bias_power`", ">= 0"]),
    ("BEMA lag 0 with a correction", args_case(bema=True, bema_lag=0.0), ValueError, ["`bema_lag`", "infinite"]),
    ("BEMA multiplier 0", args_case(bema=True, bema_multiplier=0.0), ValueError, ["`bema_multiplier`", "positive"]),
    (
        "BEMA first weight above 1",
        args_case(bema=True, bema_lag=0.2, bema_multiplier=0.5),
        ValueError,
        ["`bema_lag` + `bema_multiplier`", "at least 1"],
    ),
    ("BEMA setting without bema", args_case(bema_lag=5.0), ValueError, ["`bema_lag`", "bema=True"]),
    ("BEMA with warmup", args_case(bema=True, ema_warmup_power=0.75), ValueError, ["`ema_warmup_power`", "BEMA"]),
    (
        "BEMA with post-hoc snapshots",
        args_case(bema=True, sigma_rel=0.1, ema_snapshot_every="100ba"),
        ValueError,
        ["`ema_snapshot_every`", "`bema`"],
    ),
    (
        "ema_reference not an average",
        args_case(smoothing=0.4, ema_reference="0.6"),
        ValueError,
        ["`ema_reference`", "['0.4']", "'0.6'", "ema_reference='0.4'"],
    ),
    (
        "Switch-EMA on the Composer schedule",
        args_case(half_life="4ba", ema_schedule="composer", ema_switch_every="4ba"),
        ValueError,
        ["`ema_switch_every`", "ema_schedule='hf-ema'"],
    ),
    (
        "Switch-EMA between updates",
        args_case(half_life="4ba", update_interval="3ba", ema_switch_every="5ba"),
        ValueError,
        ["`ema_switch_every`", "multiple of `update_interval`", "ema_switch_every='6ba'"],
    ),
    (
        "Switch-EMA to the DPO reference's average",
        args_case(smoothing=0.4, ema_reference="0.4", ema_switch_every="4ba"),
        ValueError,
        ["`ema_switch_every`", "only average", "smoothing=[0.4, 0.99]"],
    ),
    ("callback given a string", callback_with_string, TypeError, ["EMAArguments"]),
    ("trainer given settings twice", trainer_with_both, ValueError, ["`ema_args`", "EMACallback"]),
    (
        "stock Trainer in hyperparameter_search, writing checkpoints or snapshots",
        stock_trainer_search,
        ValueError,
        ["hyperparameter_search", "run-<trial id>", "EMAMixin", "save_strategy='no'"],
    ),
    ("compute_ema mismatched models", compute_ema_mismatch, KeyError, ["no tensor named", "deepcopy"]),
    ("two EMACallbacks on one Trainer", two_callbacks, ValueError, ["already has an EMACallback", "half_life=["]),
    ("EMATrainer given an EMACallback", trainer_plus_callback, ValueError, ["already keeps an EMA", "half_life=["]),
    # the EMA as DPO's reference model: fail when the trainer is built (the last one at train())
    (
        "ema_reference on a stock DPOTrainer's callback",
        dpo_case(kind="callback"),
        ValueError,
        ["ema_reference='0.4'", "EMAMixin", "ref_model", "EMADPOTrainer"],
    ),
    ("ema_reference with TRL's sync_ref_model", dpo_case(sync_ref_model=True), ValueError, ["sync_ref_model=False"]),
    (
        "ema_reference with precompute_ref_log_probs",
        dpo_case(ref_model=None, precompute_ref_log_probs=True),
        ValueError,
        ["needs a reference model", "precompute_ref_log_probs=False"],
    ),
    (
        "ema_reference with a PEFT policy (its reference is the disabled adapter)",
        reference_with_peft,
        ValueError,
        ["keeps no reference model", "PEFT", "copy.deepcopy(model)"],
    ),
    ("ema_reference without a DPO trainer", reference_on_a_trainer_without_one, ValueError, ["no reference model"]),
    (
        "ema_reference with a reference of another architecture",
        reference_unlike_the_policy,
        ValueError,
        ["lacks tensors the policy averages", "model.layers.1.", "copy.deepcopy(model)"],
    ),
    (
        "ema_reference with a reference unlike the policy",
        reference_starting_elsewhere,
        ValueError,
        ["differs from the policy ('lm_head.weight'", "copy.deepcopy(model)", "fixed reference"],
    ),
    ("ema_reference in a hand-written loop", reference_in_a_hand_loop, ValueError, ["ema.ema_weights('0.4')"]),
    # train-time settings: fail in on_train_begin, before the first optimizer step
    ("tok unit without counting", tokens_without_counting, ValueError, ["'tok'", "include_num_input_tokens_seen"]),
    ("ep unit on an IterableDataset", epochs_without_length, ValueError, ["'ep' unit", "'ba'"]),
    # checkpoint states: fail at resume, naming the file
    ("sidecar missing", missing_sidecar, EMAStateError, ["checkpoint-8 has no ema_state.safetensors", "restart"]),
    ("sidecar empty", empty_sidecar, EMAStateError, [SIDECAR, "corrupt or truncated"]),
    ("sidecar truncated", truncated_sidecar, EMAStateError, [SIDECAR, "corrupt or truncated"]),
    ("sidecar garbage", garbage_sidecar, EMAStateError, [SIDECAR, "corrupt or truncated"]),
    ("sidecar not from hf-ema", foreign_safetensors, EMAStateError, [SIDECAR, "not written by hf-ema"]),
    ("sidecar newer format", newer_version, EMAStateError, [SIDECAR, "format version 3", "Upgrade"]),
    (
        "resumed with other averages",
        resume_with_other_averages,
        EMAStateError,
        [SIDECAR, "holds the averages ['4ba']", "ask for ['4ba', '8ba']"],
    ),
    (
        "resumed with BEMA added",
        resume_with_bema_added,
        EMAStateError,
        [SIDECAR, "holds the averages ['4ba']", "ask for ['bema']", "theta_0"],
    ),
    ("sidecar of another model", foreign_names, EMAStateError, [SIDECAR, "another model", "encoder.weight"]),
    ("sidecar shape differs", shape_mismatch, EMAStateError, [SIDECAR, "shape or dtype differs", "linear.bias"]),
    ("ema_dtype changed since", dtype_change, EMAStateError, [SIDECAR, "float32", "bfloat16"]),
    ("sidecar of another step", sidecar_of_another_step, EMAStateError, [SIDECAR, "written at step 16"]),
    ("sidecar lacks training weights", training_weights_missing, EMAStateError, [SIDECAR, "no training weights"]),
    (
        "sharded EMA state lacks a shard",
        sharded_state_missing_shard,
        EMAStateError,
        ["ema_state", "incomplete", "restart"],
    ),
    (
        "stock Trainer, checkpoint elsewhere",
        stock_trainer_outside_output_dir,
        EMAStateError,
        ["does not exist", "resume_from_checkpoint=path"],
    ),
    # parallel backends: fail at train begin
    ("FSDP1", fsdp1_model, ValueError, ["FSDP1", "fsdp_config={'version': 2}"]),
    (
        "ZeRO-3 without the 16-bit gather, stock Trainer",
        zero3_stock_trainer_without_gather,
        ValueError,
        ["stage3_gather_16bit_weights_on_model_save", "EMATrainer"],
    ),
    ("ZeRO++ hierarchical partitioning", zero3_hierarchical, ValueError, ["zero_hpz_partition_size"]),
    ("ZeRO-3 parameters offloaded to NVMe", zero3_nvme, ValueError, ["NVMe", "'cpu'"]),
    (
        "Switch-EMA under DeepSpeed",
        switch_under_deepspeed,
        ValueError,
        ["`ema_switch_every`", "DeepSpeed", "master copy", "Drop ema_switch_every"],
    ),
    (
        "Switch-EMA of sharded averages",
        switch_of_sharded_averages,
        ValueError,
        ["`ema_switch_every`", "sharded averages", "untested", "one device, DDP"],
    ),
    ("ema_model() of a ZeRO-3 model", zero3_copy, RuntimeError, ["ZeRO-3", "ema_weights()", "save_model()"]),
    # model changes after the average exists
    (
        "parameter unfrozen mid-run",
        change_model_mid_training(lambda m: m.linear.bias.requires_grad_(True), frozen_bias_model),
        RuntimeError,
        ["newly trainable: linear.bias"],
    ),
    (
        "parameter frozen mid-run",
        change_model_mid_training(lambda m: m.linear.bias.requires_grad_(False)),
        RuntimeError,
        ["no longer trainable or gone: linear.bias"],
    ),
    (
        "model cast between two updates (`.to(torch.bfloat16)` in a step)",
        change_model_mid_training(lambda m: m.to(torch.bfloat16)),
        RuntimeError,
        ["changed dtype or device", "before training starts"],
    ),
    (
        "resize_token_embeddings mid-run",
        resize_embeddings,
        RuntimeError,
        ["reshaped: model.embed_tokens.weight", "before training starts"],
    ),
    (
        "non-finite weights at a checkpoint",
        non_finite_at_save,
        FloatingPointError,
        ["'linear.weight'", "ema_skip_non_finite"],
    ),
]


@pytest.mark.parametrize("trigger, error, words", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, trigger, error, words):
    with pytest.raises(error) as info:
        trigger(tmp_path)
    message = str(info.value.args[0]) if error is KeyError else str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_catalogue_size():
    assert len(CATALOGUE) >= 30


def test_troubleshooting_page_is_in_step_with_the_catalogue():
    """docs/troubleshooting.md is generated from this catalogue; a changed message or case must be regenerated."""
    import importlib.util
    import logging
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gen_troubleshooting.py"
    spec = importlib.util.spec_from_file_location("gen_troubleshooting", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    try:
        expected = generator.render()
    finally:
        logging.disable(logging.NOTSET)  # the generator silences warnings for its run
    written = (path.parent / "troubleshooting.md").read_text(encoding="utf-8")
    assert written == expected, "docs/troubleshooting.md is stale: run python docs/gen_troubleshooting.py"
