"""Precision (float32 averages of bf16 weights), PEFT/LoRA, buffers, and averages kept in host memory."""

import pytest
import torch
from conftest import TinyConfig, TinyModel, assert_close, reference_ema, state_of
from helpers import build, tiny_llama
from safetensors.torch import load_file

from hf_ema import EMAArguments, EMATrainer
from hf_ema.core import tracked_tensors
from hf_ema.store import EMAStore

BF16_ULP_AT_1 = 2.0**-7


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at each element of `x` (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return 2.0 ** (exponent - 7)


def test_bf16_weights_need_a_float32_average(tmp_path):
    common = dict(num_train_epochs=8, save_strategy="steps", save_steps=64, learning_rate=0.2)
    results = {}
    for policy in ("auto", "same"):
        trainer, recorder, callback = build(
            tmp_path / policy,
            EMAArguments(smoothing=0.999, ema_dtype=policy),
            model=TinyModel(TinyConfig()).to(torch.bfloat16),
            **common,
        )
        trainer.train()
        steps = trainer.state.global_step
        reference = reference_ema(recorder.weights, 0, [(k, 0.999) for k in range(1, steps + 1)])
        exported = {
            k: v.double()
            for k, v in load_file(tmp_path / policy / f"checkpoint-{steps}" / "model.safetensors").items()
        }
        assert all(
            t.dtype == torch.bfloat16
            for t in load_file(tmp_path / policy / f"checkpoint-{steps}" / "model.safetensors").values()
        )
        errors = {n: ((exported[n] - reference[n]).abs() / bf16_ulp(reference[n])).max().item() for n in reference}
        moved = {n: (reference[n] - recorder.weights[0][n]).abs().max().item() for n in reference}
        results[policy] = (errors, exported, recorder.weights[0], moved, callback)
    errors, _, _, moved, callback = results["auto"]
    assert {t.dtype for t in callback.store.shadow.values()} == {torch.float32}
    assert max(errors.values()) <= 2.0, errors  # float32 average, rounded once: within 2 bf16 ulps
    assert max(moved.values()) > 4 * BF16_ULP_AT_1  # the true average moved by several ulps...
    errors_same, exported_same, start, _, _ = results["same"]
    for name in exported_same:  # ...while a bf16 average rounds every update away and never leaves the start
        assert torch.equal(exported_same[name], start[name]), name
    assert max(errors_same.values()) > 4


def token_data(n=32, length=12):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (n, length), generator=generator)
    return [{"input_ids": t, "labels": t} for t in tokens]


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_peft_lora_averages_only_the_adapters(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(half_life="4ba"), kind=kind, model=model, learning_rate=0.5
    )
    trainer.train_dataset, trainer.eval_dataset = token_data(), None
    trainer.train()
    assert callback.store.numel() == trainable < total / 2
    assert all(".lora_" in n or "modules_to_save" in n for n in callback.store.names())
    steps = trainer.state.global_step
    reference = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 4)) for k in range(1, steps + 1)])
    trainer.save_model(str(tmp_path / "adapter"))
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter, "an adapter was written"
    training = state_of(callback.training_model())
    checked = 0
    for name, value in reference.items():
        if ".lora_" not in name:
            continue
        key = name.replace(".default", "")
        torch.testing.assert_close(adapter[key].double(), value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(training[name], recorder.weights[steps][name], rtol=0, atol=0)
        assert not torch.allclose(value, recorder.weights[steps][name])  # EMA, not the training adapter
        checked += 1
    assert checked == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers


def test_batchnorm_buffers_averaged_and_counters_copied(tmp_path):
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(half_life="4ba"), model=TinyModel(TinyConfig(with_norm=True))
    )
    trainer.train()
    steps = trainer.state.global_step
    reference = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 4)) for k in range(1, steps + 1)])
    ema = callback.ema_model()
    assert_close(state_of(ema), reference)
    assert "norm.running_mean" in callback.store.names() and "norm.num_batches_tracked" not in callback.store.names()
    assert ema.norm.num_batches_tracked.item() == steps == trainer.model.norm.num_batches_tracked.item()
    assert not torch.allclose(ema.norm.running_mean, callback.training_model().norm.running_mean)


def test_buffers_copied_on_request(tmp_path):
    trainer, recorder, callback = build(
        tmp_path, EMAArguments(half_life="4ba", ema_buffers="copy"), model=TinyModel(TinyConfig(with_norm=True))
    )
    trainer.train()
    steps = trainer.state.global_step
    ema, training = callback.ema_model(), callback.training_model()
    assert "norm.running_mean" not in callback.store.names()
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(ema.norm, name), getattr(training.norm, name))
    reference = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 4)) for k in range(1, steps + 1)])
    torch.testing.assert_close(ema.linear.weight.double(), reference["linear.weight"], rtol=1e-6, atol=1e-7)


def test_host_average_matches_on_device_average(tmp_path):
    results = {}
    for device in (None, "cpu"):
        trainer, _, callback = build(
            tmp_path / str(device), EMAArguments(half_life="4ba", ema_device=device), num_train_epochs=2
        )
        trainer.train()
        results[device] = state_of(callback.ema_model())
        assert all(t.device.type == "cpu" for t in callback.store.shadow.values())
    assert_close(results["cpu"], results[None], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("labels", [("ema",), ("fast", "slow")], ids=["one", "two_averages"])
def test_asynchronous_store_is_bit_identical(dtype, labels):
    """The overlapped path (staging buffers, background thread) computes exactly what the direct path does, for one
    average and for several (each with its own smoothing, placed in turn)."""
    model = TinyModel(TinyConfig(with_norm=True)).to(dtype)
    direct, overlapped = EMAStore(model, labels=labels), EMAStore(model, asynchronous=True, labels=labels)
    smoothings = dict(zip(labels, (0.9, 0.6), strict=False))
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        with torch.no_grad():
            for _, tensor, kind in tracked_tensors(model):
                if kind == "average":
                    tensor.add_(torch.randn(tensor.shape, generator=generator).to(dtype))
        direct.update_(model, smoothings)
        overlapped.update_(model, smoothings)  # returns at once; the next read waits for it
        if step == 2:
            training = model.linear.weight.detach().clone()
            for label in labels:
                overlapped.place_(model, label)
                assert torch.equal(model.linear.weight, direct.averages[label]["linear.weight"].to(dtype))
            overlapped.place_(model, None)
            assert torch.equal(model.linear.weight, training)
    for label in labels:
        for name, value in direct.ema_tensors(model, label).items():
            assert torch.equal(overlapped.ema_tensors(model, label)[name], value), (label, name)
    if len(labels) == 2:  # the two averages did move differently
        assert not torch.equal(direct.averages["fast"]["linear.weight"], direct.averages["slow"]["linear.weight"])
    overlapped.close()


def test_store_memory_is_the_trainable_parameters_in_the_average_dtype():
    model = tiny_llama().to(torch.bfloat16)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    store = EMAStore(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert store.numel() == trainable
    assert store.nbytes() == 4 * trainable  # float32 averages of bf16 weights


def test_ema_trainer_exports_parameter_dtype(tmp_path):
    trainer = EMATrainer(
        model=TinyModel(TinyConfig()).to(torch.bfloat16),
        args=build(tmp_path, None)[0].args,
        train_dataset=build(tmp_path, None)[0].train_dataset,
        ema_args=EMAArguments(smoothing=0.9),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}


def test_resnet_batchnorm2d_running_stats(tmp_path):
    """A convnet from a config: BatchNorm2d running stats averaged against float64, counters copied."""
    from conftest import Recorder, make_args
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(
        ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
        )
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 1, 8, 8, generator=generator)
    data = [{"pixel_values": images[i], "labels": torch.tensor(i % 3)} for i in range(16)]
    recorder = Recorder()
    trainer = EMATrainer(
        model=model,
        args=make_args(tmp_path, learning_rate=0.1),
        train_dataset=data,
        callbacks=[recorder],
        ema_args=EMAArguments(half_life="2ba"),
    )
    trainer.train()
    steps = trainer.state.global_step
    reference = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 2)) for k in range(1, steps + 1)])
    ema = trainer.ema_model
    assert_close(state_of(ema), reference, rtol=1e-5, atol=1e-6)
    stats = [n for n in trainer.ema_callback.store.names() if n.endswith("running_var")]
    assert len(stats) >= 4  # every BatchNorm2d's statistics are averaged
    counters = {n: b for n, b in ema.named_buffers() if n.endswith("num_batches_tracked")}
    assert counters and all(b.item() == steps for b in counters.values())
