"""The command-line example `examples/run_clm_ema.py` runs for a few steps with the flags from its docstring, evaluates
both sets of weights and saves the EMA weights in a folder `from_pretrained` loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "run_clm_ema.py"


def test_run_clm_ema_few_steps(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(EXAMPLE),
        "--output_dir", str(out),
        "--half_life", "200ba", "--bema", "--update_interval", "5ba",
        "--max_steps", "6", "--max_files", "12", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--block_size", "64", "--hidden_size", "32", "--intermediate_size", "64",
        "--eval_steps", "3", "--logging_steps", "3", "--save_strategy", "steps", "--save_steps", "6",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-8000:]}"
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # no DeepSpeed noise

    # Both evaluations ran on the EMA and on the training weights, in one log line each, and gave finite losses.
    metrics = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_training_loss", "perplexity", "training_perplexity"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["perplexity"] == math.exp(metrics["eval_loss"])
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6] and all("eval_training_loss" in h for h in evals)
    assert all(math.isfinite(h["eval_ema_bema_loss"]) for h in evals)  # --bema: a second average, in the same line

    # The saved model is the EMA (one update at step 5 of a 200-step half-life, so close to the start) and differs
    # from the training weights at step 6, which the checkpoint's EMA state holds.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("def f():\n")["input_ids"] == list(b"def f():\n")  # byte-level: id = byte value
    saved = {n: t.detach() for n, t in model.state_dict().items()}
    sidecar = load_file(out / "checkpoint-6" / "ema_state.safetensors")
    training = {n.removeprefix("training/"): t for n, t in sidecar.items() if n.startswith("training/")}
    prefix = "average/200ba/"  # the one average, labelled by its half-life (EMA-state format 2)
    ema = {n.removeprefix(prefix): t for n, t in sidecar.items() if n.startswith(prefix)}
    assert training and set(training) <= set(saved)
    for name in training:
        torch.testing.assert_close(saved[name], ema[name].to(saved[name].dtype), rtol=0, atol=0)
    assert any(not torch.equal(saved[name], weight) for name, weight in training.items())
