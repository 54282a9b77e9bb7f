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


class ShiftedEval(RegressionDataset):
    """Eval targets from weights between the start and the optimum, so the best checkpoint is not the last."""

    def __init__(self):
        super().__init__(16, seed=1)
        self.y = self.x @ torch.tensor([0.7, -0.35, 0.95]) + 0.12


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


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
HEAVY_IMPORTS = "import torch, transformers, safetensors, hf_ema"


def peak_memory(code: str, *args: str) -> int:
    """Peak resident memory in bytes (`VmHWM`) of a fresh Python process that imports torch, transformers,
    safetensors and hf_ema, then runs `code` (its `sys.argv[1:]` are `args`)."""
    script = (
        f"import sys\n{HEAVY_IMPORTS}\n{code}\n"
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')).split()[1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env=OFFLINE
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return int(result.stdout.split()[-1]) * 1024


def gpt2_checkpoints(folder, steps=(4, 8, 12), max_shard_size="20MB"):
    """Writes `checkpoint-<step>` folders of one GPT-2 of 103 MiB (float32, 8 layers of 512, vocabulary 2048; its
    largest tensors 4 MiB), its weights perturbed before each, in shards of `max_shard_size`; returns the folders."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=2048, n_positions=2048, n_embd=512, n_layer=8, n_head=8, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    folders = []
    for step in steps:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param), alpha=0.02)
        folders.append(os.path.join(folder, f"checkpoint-{step}"))
        model.save_pretrained(folders[-1], max_shard_size=max_shard_size)
    return folders
