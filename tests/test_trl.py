"""A Trainer subclass from another library: TRL's SFTTrainer with EMACallback, on a tiny Llama and a tokenizer built
in code (nothing downloaded)."""

import shutil

import pytest
import torch
from conftest import Recorder, make_args, reference_ema, state_of
from helpers import tiny_llama

from hf_ema import EMAArguments, EMACallback

trl = pytest.importorskip("trl")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_trainer(out, ema_args, recorder):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (6 + k % 5,), generator=generator)) for k in range(32)
    ]
    args = make_args(
        out,
        args_class=trl.SFTConfig,
        save_strategy="steps",
        save_steps=4,
        max_length=16,
        include_num_input_tokens_seen=True,
    )
    callback = EMACallback(ema_args)
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer(),
        callbacks=[recorder, callback],
    )
    return trainer, callback


def test_sft_trainer_with_token_half_life_and_exact_resume(tmp_path):
    recorder = Recorder()
    ema_args = EMAArguments(half_life="100tok")
    trainer, callback = sft_trainer(tmp_path, ema_args, recorder)
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 8
    tokens = recorder.tokens
    assert len({tokens[k] - tokens[k - 1] for k in range(1, steps + 1)}) > 1  # uneven token counts per step
    updates = [(k, 2 ** (-(tokens[k] - tokens[k - 1]) / 100)) for k in range(1, steps + 1)]
    expected = reference_ema(recorder.weights, 0, updates)
    got = state_of(trainer.model)  # the model holds the EMA after train()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "checkpoint-4" / "ema_state.safetensors").is_file()

    final_ema, final_training = state_of(callback.ema_model()), state_of(callback.training_model())
    shutil.rmtree(tmp_path / "checkpoint-8")
    resumed, resumed_callback = sft_trainer(tmp_path, ema_args, Recorder())
    resumed.train(resume_from_checkpoint=True)
    for name, value in final_ema.items():
        assert torch.equal(state_of(resumed_callback.ema_model())[name], value), name
        assert torch.equal(state_of(resumed_callback.training_model())[name], final_training[name]), name
