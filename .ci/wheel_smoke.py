"""Smoke test of an installed hf-ema wheel, run from outside the source tree (`make wheel-smoke`).

Checks that the wheel, not the checkout, is imported; that it ships `py.typed` and its LICENSE; and that a tiny
`EMATrainer` run on a two-parameter model (`y = w * x + b`, full-batch SGD) ends with the EMA that a float64 hand
computation of the same four gradient steps gives.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments  # noqa: E402

import hf_ema  # noqa: E402
from hf_ema import EMAArguments, EMATrainer  # noqa: E402

SMOOTHING = 0.5
STEPS = 4
LEARNING_RATE = 0.05
POINTS = [(float(x), 2.0 * x + 1.0) for x in range(4)]  # on y = 2x + 1; one batch holds all four


class LineConfig(PretrainedConfig):
    model_type = "hf_ema_smoke_line"


class Line(PreTrainedModel):
    """`y = w * x + b`: two parameters, mean squared error."""

    config_class = LineConfig

    def __init__(self, config: LineConfig):
        super().__init__(config)
        self.w = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def _init_weights(self, module):  # keep w = b = 0
        pass

    def forward(self, x, labels=None):
        prediction = self.w * x + self.b
        loss = None if labels is None else torch.mean((prediction - labels) ** 2)
        return {"loss": loss, "logits": prediction}


class Points(torch.utils.data.Dataset):
    def __len__(self):
        return len(POINTS)

    def __getitem__(self, i):
        x, y = POINTS[i]
        return {"x": torch.tensor(x), "labels": torch.tensor(y)}


def by_hand() -> tuple[list[float], list[float]]:
    """Float64 (training weights, EMA) after STEPS full-batch SGD steps from w = b = 0, EMA updated every step."""
    w = b = 0.0
    ema = [w, b]
    for _ in range(STEPS):
        residuals = [w * x + b - y for x, y in POINTS]
        grad_w = 2 * sum(r * x for r, (x, _) in zip(residuals, POINTS, strict=True)) / len(POINTS)
        grad_b = 2 * sum(residuals) / len(POINTS)
        w, b = w - LEARNING_RATE * grad_w, b - LEARNING_RATE * grad_b
        ema = [SMOOTHING * e + (1 - SMOOTHING) * v for e, v in zip(ema, (w, b), strict=True)]
    return [w, b], ema


def check_install() -> None:
    source = Path(hf_ema.__file__).resolve()
    assert "site-packages" in source.parts, f"hf_ema imported from {source}, not from the installed wheel"
    assert (source.parent / "py.typed").is_file(), "the wheel does not ship hf_ema/py.typed"
    files = [str(f) for f in importlib.metadata.files("hf-ema") or []]
    assert any(f.endswith("LICENSE") for f in files), f"the wheel does not ship LICENSE: {files}"
    assert importlib.metadata.metadata("hf-ema")["License-Expression"] == "Apache-2.0"


def main() -> None:
    check_install()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=len(POINTS),
            learning_rate=LEARNING_RATE,
            max_grad_norm=0.0,  # no clipping: the hand computation is plain SGD
            optim="sgd",
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = EMATrainer(
            model=Line(LineConfig()),
            args=args,
            train_dataset=Points(),
            ema_args=EMAArguments(smoothing=SMOOTHING),
        )
        trainer.train()
    training, ema = by_hand()
    got_ema = [trainer.model.w.item(), trainer.model.b.item()]  # the model holds the EMA after train()
    raw = trainer.training_model
    got_training = [raw.w.item(), raw.b.item()]
    for name, got, expected in (("EMA", got_ema, ema), ("training weights", got_training, training)):
        assert all(abs(g - e) < 1e-5 for g, e in zip(got, expected, strict=True)), (name, got, expected)
    assert abs(got_ema[0] - got_training[0]) > 0.1, "the EMA should lag the training weights"
    print(f"wheel smoke test passed: hf-ema {hf_ema.__version__} from {Path(hf_ema.__file__).parent}")
    print(f"EMA (w, b) = ({got_ema[0]:.6f}, {got_ema[1]:.6f}), by hand ({ema[0]:.6f}, {ema[1]:.6f})")


if __name__ == "__main__":
    sys.exit(main())
