"""Shared test fixtures: a tiny closed-form model, data, and a recorder of the training weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback, TrainingArguments  # noqa: E402

IN_FEATURES = 3


class TinyConfig(PretrainedConfig):
    model_type = "hf_ema_tiny"

    def __init__(self, in_features: int = IN_FEATURES, with_norm: bool = False, **kwargs):
        self.in_features = in_features
        self.with_norm = with_norm
        super().__init__(**kwargs)


class TinyModel(PreTrainedModel):
    """Linear regression `y = w . x + b` (optionally after a BatchNorm), loss = mean squared error."""

    config_class = TinyConfig
    main_input_name = "x"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.norm = nn.BatchNorm1d(config.in_features) if config.with_norm else None
        self.linear = nn.Linear(config.in_features, 1)
        if hasattr(self.linear.weight, "ds_id"):  # built partitioned (ZeRO-3 zero.Init): from_pretrained fills it
            self.post_init()
            return
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.5, -0.25, 1.0]])[:, : config.in_features])
            self.linear.bias.fill_(0.1)
        self.post_init()

    def _init_weights(self, module):  # keep the hand-set weights above
        pass

    def forward(self, x, labels=None):
        x = x.to(self.linear.weight.dtype)
        hidden = self.norm(x) if self.norm is not None else x
        logits = self.linear(hidden).squeeze(-1)
        loss = None if labels is None else torch.mean((logits.float() - labels.float()) ** 2)
        return {"loss": loss, "logits": logits}


class RegressionDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_FEATURES, generator=generator)
        true_w = torch.tensor([2.0, -1.0, 0.5])
        self.y = self.x @ true_w + 0.3 + 0.1 * torch.randn(n, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_args(output_dir, args_class=TrainingArguments, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        num_train_epochs=1,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        # TRL's configs default to bf16=True; on transformers 4.x the mixed precision then stays in accelerate's
        # shared state and later tests' Trainers evaluate under bf16 autocast. Float32 unless a test asks.
        bf16=False,
    )
    defaults.update(overrides)
    return args_class(**defaults)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions) are gathered by their own
    library, a collective every rank runs."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Float64 copies of a module's trainable parameters and float buffers, keyed by name (sharded ones gathered)."""
    out = {n: _full(p).to("cpu", torch.float64).clone() for n, p in module.named_parameters() if p.requires_grad}
    out.update(
        {n: b.detach().to("cpu", torch.float64).clone() for n, b in module.named_buffers() if b.is_floating_point()}
    )
    return out


class Recorder(TrainerCallback):
    """Records float64 training weights at train begin (step 0) and at the end of every optimizer step.

    Placed before EMACallback, it sees the training weights before any swap.
    """

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.epochs: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.setdefault(state.global_step, state_of(model))
        self.tokens.setdefault(state.global_step, int(state.num_input_tokens_seen or 0))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = state_of(model)
        self.epochs[state.global_step] = state.epoch
        self.tokens[state.global_step] = int(state.num_input_tokens_seen or 0)


def reference_ema(weights: dict[int, dict[str, torch.Tensor]], start: int, updates: list[tuple[int, float]]):
    """Float64 EMA by hand: set to the weights of step `start`, then `ema = s*ema + (1-s)*w_k` per (k, s)."""
    ema = {n: t.clone() for n, t in weights[start].items()}
    for step, s in updates:
        for name in ema:
            ema[name] = s * ema[name] + (1.0 - s) * weights[step][name]
    return ema


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol=1e-6, atol=1e-7):
    assert set(actual) == set(expected), (set(actual), set(expected))
    for name in expected:
        torch.testing.assert_close(
            actual[name].to(torch.float64), expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def pytest_terminal_summary(terminalreporter):
    """The crash harness's outcome per kill point (tests/test_crash.py), when it ran."""
    import sys

    rows = getattr(sys.modules.get("test_crash"), "REPORT", None)
    if rows:
        terminalreporter.section("crash harness: outcome per kill point")
        for row in rows:
            terminalreporter.line(row)
