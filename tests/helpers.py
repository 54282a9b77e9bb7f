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


#
# ---- hyper-parameter search ----
#
# No search backend is a test dependency (optuna, Ray Tune and W&B are not installed), so a stand-in takes optuna's
# place in transformers' backend table: it drives the trials the way `run_hp_search_optuna` does in one process
# (`trainer.train(resume_from_checkpoint=..., trial=trial)` per trial, then `evaluate()` for the objective), and its
# trials carry what transformers reads of an `optuna.Trial`: `number` (the trial's folder, `run-<number>`, in
# `Trainer._get_output_dir`) and `params`. Everything between is the Trainer's own code: `_hp_search_setup` sets the
# trial's arguments and `_save_checkpoint` writes into `_get_output_dir(trial)`.

TRIAL_RATES = [0.05, 0.02]  # the learning rate of trial 0 and trial 1


class StandInTrial:
    def __init__(self, number: int, params: dict):
        self.number, self.params = number, params


def stand_in_search(monkeypatch, resume: dict | None = None):
    """Makes `hyperparameter_search(backend="optuna")` run one trial per entry of TRIAL_RATES (or the trials of
    `resume`, {number: checkpoint}), resuming each from its checkpoint as optuna does when given one."""
    from transformers import integrations
    from transformers.hyperparameter_search import ALL_HYPERPARAMETER_SEARCH_BACKENDS, HyperParamSearchBackendBase
    from transformers.trainer_utils import BestRun, HPSearchBackend

    class StandInOptuna(HyperParamSearchBackendBase):
        name = "optuna"

        @staticmethod
        def is_available():
            return True

        def run(self, trainer, n_trials, direction, **kwargs):
            objectives = {}
            for number in resume or range(n_trials):
                trial = StandInTrial(number, {"learning_rate": TRIAL_RATES[number]})
                trainer.objective = None
                trainer.train(resume_from_checkpoint=(resume or {}).get(number), trial=trial)
                if trainer.objective is None:
                    trainer.objective = trainer.compute_objective(trainer.evaluate())
                objectives[number] = trainer.objective
            best = min(objectives, key=objectives.get)
            return BestRun(str(best), objectives[best], {"learning_rate": TRIAL_RATES[best]})

        def default_hp_space(self, trial):
            return trial.params

    monkeypatch.setitem(ALL_HYPERPARAMETER_SEARCH_BACKENDS, HPSearchBackend.OPTUNA, StandInOptuna)
    # TrainerState reads the trial's params with this helper, which knows only the installed backends' trials.
    monkeypatch.setattr(integrations, "hp_params", lambda trial: trial.params)


def search_trainer(folder, ema_args, kind="ema_trainer", model=None, **overrides):
    """A trainer of the tiny model built by model_init for each trial (or on `model`, for a run alone)."""
    args = make_args(folder, **{"save_strategy": "steps", "save_steps": 4, **overrides})
    common = dict(
        model=model,
        model_init=None if model is not None else (lambda: TinyModel(TinyConfig())),
        args=args,
        train_dataset=RegressionDataset(32),
        eval_dataset=RegressionDataset(16, seed=1),
    )
    if kind == "ema_trainer":
        return EMATrainer(ema_args=ema_args, **common)
    return Trainer(callbacks=[EMACallback(ema_args)], **common)


def dpo_data(n: int = 16):
    """Preference pairs of words the test tokenizer knows (test_trl.tokenizer), the same for every call."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)

    def words(count):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (count,), generator=generator))

    rows = [(words(4), words(3), words(3)) for _ in range(n)]
    return Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))})


def dpo_trainer(
    folder, ema_args=None, callbacks=(), ref_model="copy", kind="ema_trainer", peft_config=None, **overrides
):
    """TRL's DPOTrainer on a tiny Llama from a config (nothing downloaded): an `EMAMixin` subclass given `ema_args`,
    or TRL's own (`kind="trl"`, e.g. with sync_ref_model=True), or a stock DPOTrainer with an EMACallback
    (`kind="callback"`). 16 pairs, batch 4: 4 optimizer steps per epoch. `ref_model="copy"`: a deep copy of the
    policy."""
    import copy

    import trl
    from test_trl import tokenizer

    from hf_ema import EMAMixin

    class EMADPOTrainer(EMAMixin, trl.DPOTrainer):
        pass

    policy = tiny_llama()
    reference = copy.deepcopy(policy) if isinstance(ref_model, str) and ref_model == "copy" else ref_model
    settings = dict(max_length=16, learning_rate=0.05, beta=0.1, num_train_epochs=3) | overrides
    args = make_args(folder, args_class=trl.DPOConfig, **settings)
    common = dict(model=policy, ref_model=reference, args=args, train_dataset=dpo_data(), processing_class=tokenizer())
    if peft_config is not None:
        common["peft_config"] = peft_config
    if kind == "trl":
        return trl.DPOTrainer(callbacks=list(callbacks), **common)
    if kind == "callback":
        return trl.DPOTrainer(callbacks=[*callbacks, EMACallback(ema_args)], **common)
    return EMADPOTrainer(callbacks=list(callbacks), ema_args=ema_args, **common)
