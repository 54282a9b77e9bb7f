"""EMAMixin on Trainer subclasses users train with: Seq2SeqTrainer (generation), TRL's SFTTrainer (with and without
LoRA) and DPOTrainer. Tiny models from configs, tokenizers built in code, nothing downloaded."""

import pytest
import torch
from conftest import Recorder, assert_close, make_args, reference_ema, state_of
from helpers import tiny_llama
from test_trl import tokenizer
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

from hf_ema import EMAArguments, EMAMixin


class EMASeq2SeqTrainer(EMAMixin, Seq2SeqTrainer):
    pass


def tiny_t5():
    config = T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config)


def seq2seq_data(n=16):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(2, 32, (n, 6), generator=generator)
    labels = torch.randint(2, 32, (n, 4), generator=generator)
    return [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": t}
        for i, t in zip(inputs, labels, strict=True)
    ]


def generated_checksum(predictions) -> float:
    """A number that changes with any generated token: sum of (position + 1) * token id, pad and -100 as 0."""
    ids = torch.as_tensor(predictions).clamp(min=0).double()
    return float((ids * torch.arange(1, ids.shape[-1] + 1, dtype=torch.float64)).sum())


def manual_checksum(model, data, **gen_kwargs) -> float:
    """Generate with `model` directly, batch by batch as the Trainer does, padded to the longest like its output."""
    model.eval()
    outputs = []
    for start in range(0, len(data), 8):
        batch = torch.stack([d["input_ids"] for d in data[start : start + 8]])
        with torch.no_grad():
            outputs.append(model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **gen_kwargs))
    width = max(o.shape[-1] for o in outputs)
    padded = [torch.nn.functional.pad(o, (0, width - o.shape[-1])) for o in outputs]
    return generated_checksum(torch.cat(padded))


def test_seq2seq_generates_with_the_ema_and_the_same_settings_for_the_training_weights(tmp_path):
    data = seq2seq_data()
    args = make_args(
        tmp_path, args_class=Seq2SeqTrainingArguments, predict_with_generate=True, learning_rate=0.5,
        per_device_eval_batch_size=8, num_train_epochs=2,
    )  # fmt: skip
    trainer = EMASeq2SeqTrainer(
        model=tiny_t5(), args=args, train_dataset=data, eval_dataset=data,
        compute_metrics=lambda p: {"checksum": generated_checksum(p.predictions)},
        ema_args=EMAArguments(half_life=["2ba", "8ba"], ema_eval_training_weights=True),
    )  # fmt: skip
    trainer.train()
    ema, slow, training = trainer.ema_model, trainer.ema_models["8ba"], trainer.training_model
    for kwargs in ({"max_new_tokens": 3}, {"max_new_tokens": 5, "num_beams": 2}):
        metrics = trainer.evaluate(**kwargs)  # generation arguments pass through EMAMixin.evaluate
        assert metrics["eval_checksum"] == manual_checksum(ema, data, **kwargs)
        assert metrics["eval_ema_8ba_checksum"] == manual_checksum(slow, data, **kwargs)
        assert metrics["eval_training_checksum"] == manual_checksum(training, data, **kwargs)  # the same settings
        assert metrics["eval_checksum"] != metrics["eval_training_checksum"]
    predictions = trainer.predict(data, max_new_tokens=4).predictions
    assert generated_checksum(predictions) == manual_checksum(ema, data, max_new_tokens=4)


trl = pytest.importorskip("trl")


def sft(out, recorder, peft_config=None, **ema):
    from datasets import Dataset

    class EMASFTTrainer(EMAMixin, trl.SFTTrainer):
        pass

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 61, (8,), generator=generator)) for _ in range(16)]
    args = make_args(out, args_class=trl.SFTConfig, max_length=16, learning_rate=0.05, optim="sgd")
    return EMASFTTrainer(
        model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer(), callbacks=[recorder], peft_config=peft_config,
        ema_args=EMAArguments(half_life="2ba", **ema),
    )  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_with_the_mixin(tmp_path, lora):
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    recorder = Recorder()
    trainer = sft(tmp_path, recorder, peft_config)
    trainer.train()
    names = trainer.ema_callback.store.names()
    if lora:  # only the adapters are averaged
        assert names and all(".lora_" in n for n in names)
    expected = reference_ema(recorder.weights, 0, [(k, 2**-0.5) for k in range(1, trainer.state.global_step + 1)])
    assert_close(state_of(trainer.ema_model), expected, rtol=1e-5, atol=1e-6)
    trainer.save_model(str(tmp_path / "final"))  # the EMA (an adapter holding the EMA of the adapters, with LoRA)
    saved = "adapter_model.safetensors" if lora else "model.safetensors"
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "final" / saved)
    ema = state_of(trainer.ema_model)
    compared = 0
    for key, value in on_disk.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if name in ema:
            torch.testing.assert_close(value.double(), ema[name], rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == len(names)  # every averaged tensor is in the saved file, holding its average


def test_dpo_trainer_averages_the_policy_only(tmp_path):
    from datasets import Dataset

    class EMADPOTrainer(EMAMixin, trl.DPOTrainer):
        pass

    generator = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (n,), generator=generator))

    data = Dataset.from_dict(
        {"prompt": [words(4) for _ in range(16)], "chosen": [words(3) for _ in range(16)],
         "rejected": [words(3) for _ in range(16)]}
    )  # fmt: skip
    policy, reference = tiny_llama(), tiny_llama()
    reference_before = state_of(reference)
    args = make_args(
        tmp_path, args_class=trl.DPOConfig, max_length=16, learning_rate=0.05, optim="sgd", beta=0.1,
    )  # fmt: skip
    recorder = Recorder()
    trainer = EMADPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer(),
        callbacks=[recorder], ema_args=EMAArguments(half_life="2ba"),
    )  # fmt: skip
    trainer.train()
    steps = trainer.state.global_step
    assert steps >= 2
    expected = reference_ema(recorder.weights, 0, [(k, 2**-0.5) for k in range(1, steps + 1)])
    assert_close(state_of(trainer.ema_model), expected, rtol=1e-5, atol=1e-6)  # the policy's average
    assert set(trainer.ema_callback.store.names()) == set(dict(policy.named_parameters()))
    assert_close(state_of(trainer.ref_model), reference_before, rtol=0, atol=0)  # the reference is untouched
    assert trainer.model is policy or trainer.model.base_model is policy
