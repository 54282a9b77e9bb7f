"""Builds trainers on the tiny regression model for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import Recorder, RegressionDataset, TinyConfig, TinyModel, make_args, reference_ema
from transformers import Trainer

from hf_ema import EMACallback, EMATrainer


def build(tmp_path, ema_args, kind="ema_trainer", model=None, callbacks=(), **arg_overrides):
    """Returns (trainer, recorder, ema_callback) for `kind` in {"ema_trainer", "callback"}."""
    recorder = Recorder()
    model = model if model is not None else TinyModel(TinyConfig())
    common = dict(
        model=model,
        args=make_args(tmp_path, **arg_overrides),
        train_dataset=RegressionDataset(32, seed=0),
        eval_dataset=RegressionDataset(16, seed=1),
    )
    if kind == "ema_trainer":
        trainer = EMATrainer(callbacks=[recorder, *callbacks], ema_args=ema_args, **common)
        callback = trainer.ema_callback
    else:
        callback = EMACallback(ema_args)
        trainer = Trainer(callbacks=[recorder, callback, *callbacks], **common)
    return trainer, recorder, callback


def eval_loss(weights: dict[str, torch.Tensor], dataset=None) -> float:
    """Float64 mean squared error of the tiny linear model with `weights` on the eval set."""
    dataset = dataset if dataset is not None else RegressionDataset(16, seed=1)
    x, y = dataset.x.double(), dataset.y.double()
    prediction = x @ weights["linear.weight"].reshape(-1) + weights["linear.bias"].reshape(())
    return torch.mean((prediction - y) ** 2).item()


def module_state(module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def ema_at(recorder, step: int, start: int = 0, smoothing: float = 2 ** (-1 / 4)):
    """Float64 reference EMA at `step` for a half-life of 4ba updated every step from `start`."""
    return reference_ema(recorder.weights, start, [(k, smoothing) for k in range(start + 1, step + 1)])


def tiny_llama(vocab=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2):
    """A tiny Llama built from a config (no download), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def fake_zero3(model, **attributes):
    """Marks `model`'s parameters the way DeepSpeed ZeRO-3 does (enough for hf-ema's backend checks)."""
    for param in model.parameters():
        param.ds_id, param.ds_numel, param.ds_shape = 1, param.numel(), param.shape
        param.ds_tensor, param.ds_process_group = param.detach().reshape(-1).clone(), None
        for key, value in attributes.items():
            setattr(param, key, value)
    return model


REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `examples/<name>` offline from the repository root and checks that it succeeded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result
