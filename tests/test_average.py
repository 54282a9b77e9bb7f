"""`python -m hf_ema.average`: saved checkpoints averaged tensor by tensor, against float64 references computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TinyConfig, TinyModel, make_args
from helpers import OFFLINE, gpt2_checkpoints, peak_memory
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer

from hf_ema import EMAArguments, EMATrainer
from hf_ema.average import AverageError, average_checkpoints, checkpoint_weights, main, plan

MiB = 2**20


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, vocab: int = 64, length: int = 8, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def train(folder, model, **overrides):
    args = make_args(folder, save_strategy="steps", save_steps=4, max_steps=16, learning_rate=0.5, **overrides)
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    return folder


def mean64(dicts, weights=None):
    """Float64 weighted mean of state dicts, by hand."""
    weights = weights or [1 / len(dicts)] * len(dicts)
    return {key: sum(w * d[key].double() for w, d in zip(weights, dicts, strict=True)) for key in dicts[0]}


def assert_close(found: dict, expected: dict, rtol: float = 1e-6):
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        error = (found[key].double() - value).norm() / value.norm().clamp_min(1e-30)
        assert error <= rtol, f"{key}: relative error {error:.2e}"


def folder_weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weight files."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and not name.startswith("ema_state"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """A stock Trainer run (no hf-ema) of a tiny BERT: checkpoints 4, 8, 12, 16 with optimizer state."""
    return train(tmp_path_factory.mktemp("stock"), tiny_bert())


def test_last_three_of_a_stock_run_is_the_float64_mean_and_loads(stock_run, tmp_path, capsys):
    from transformers import BertForSequenceClassification

    out = tmp_path / "averaged"
    assert main([str(stock_run), "--last", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for step in (8, 12, 16):  # by step: lexicographic order would take 16, 4, 8
        assert f"checkpoint-{step}" in printed
    assert "checkpoint-4 " not in printed and "weight 0.333333  model files" in printed
    references = [
        {k: v.double() for k, v in BertForSequenceClassification.from_pretrained(stock_run / f"checkpoint-{s}")
         .state_dict().items()}
        for s in (8, 12, 16)
    ]  # fmt: skip
    loaded = BertForSequenceClassification.from_pretrained(out)
    assert_close(loaded.state_dict(), mean64(references))
    assert folder_weights(out).keys() == folder_weights(stock_run / "checkpoint-16").keys()
    names = set(os.listdir(out))
    assert {"config.json", "README.md", "hf_ema_average.json", "model.safetensors"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}
    assert not [n for n in names if n.startswith("rng_state")]
    card = (out / "README.md").read_text()
    assert "uniform average" in card and "float64" in card
    assert all(f"`{stock_run / f'checkpoint-{s}'}` | {s} | model files | 0.333333 |" in card for s in (8, 12, 16))
    info = json.loads((out / "hf_ema_average.json").read_text())
    assert [c["step"] for c in info["checkpoints"]] == [8, 12, 16]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the temporary folder is gone


def synthetic(folder, steps, tensors=None, **per_step):
    """`checkpoint-<step>` folders holding `model.safetensors` of a float weight that changes with the step and an
    integer counter; returns the folders."""
    folders = []
    for step in steps:
        path = os.path.join(folder, f"checkpoint-{step}")
        os.makedirs(path)
        values = tensors(step) if tensors else {
            "w": torch.full((3, 2), float(step)) + torch.arange(6.0).reshape(3, 2) / 7,
            "n": torch.tensor([step, 2 * step], dtype=torch.int64),
        }  # fmt: skip
        save_file(values, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump({"step": step}, handle)
        folders.append(path)
    return folders


def test_half_life_weights_against_the_recursion(tmp_path, capsys):
    steps = [2, 5, 11, 30]
    synthetic(tmp_path, steps)
    weights = checkpoint_weights(steps, "8ba")
    w = {s: load_file(tmp_path / f"checkpoint-{s}" / "model.safetensors")["w"].double() for s in steps}
    average = w[2]
    for previous, step in zip(steps, steps[1:], strict=False):
        s = 2.0 ** (-(step - previous) / 8)
        average = s * average + (1 - s) * w[step]
    assert sum(weights) == pytest.approx(1.0, abs=1e-15)
    assert [round(c, 4) for c in weights] == [0.0884, 0.0262, 0.0782, 0.8072]  # as docs/average.md says
    assert weights[0] == pytest.approx(2.0 ** (-(30 - 2) / 8))
    assert main([str(tmp_path), "--half-life", "8ba", "--out", str(tmp_path / "ema"), "--no-progress"]) == 0
    assert "half-life 8ba" in capsys.readouterr().out
    found = load_file(tmp_path / "ema" / "model.safetensors")
    assert torch.allclose(found["w"].double(), average, rtol=1e-7, atol=0)
    assert torch.equal(found["n"], torch.tensor([30, 60]))  # integers: the newest, not averaged
    assert "EMA over the checkpoints, half-life 8ba" in (tmp_path / "ema" / "README.md").read_text()
    assert json.loads((tmp_path / "ema" / "config.json").read_text()) == {"step": 30}  # from the newest
    with pytest.raises(ValueError, match="optimizer steps"):
        checkpoint_weights(steps, "2ep")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    return folder, gpt2_checkpoints(folder)


def test_sharded_gpt2_streams_and_equals_the_mean(gpt2_run, tmp_path):
    from transformers import GPT2LMHeadModel

    folder, checkpoints = gpt2_run
    shards = sorted(n for n in os.listdir(checkpoints[-1]) if n.endswith(".safetensors"))
    size = sum(os.path.getsize(os.path.join(checkpoints[-1], n)) for n in shards)
    assert len(shards) >= 5 and 100 * MiB < size < 110 * MiB
    out = tmp_path / "averaged"
    baseline = peak_memory("pass")
    streaming = peak_memory(
        "from hf_ema.average import main; assert main(sys.argv[1:]) == 0",
        str(folder), "--last", "3", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert streaming - baseline <= size / 2, f"{(streaming - baseline) / MiB:.1f} MiB above importing"
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == shards
    with open(os.path.join(checkpoints[-1], "model.safetensors.index.json")) as handle:
        assert json.loads((out / "model.safetensors.index.json").read_text()) == json.load(handle)
    expected = mean64([folder_weights(c) for c in checkpoints])
    found = folder_weights(out)
    assert "lm_head.weight" not in found  # tied to the embedding: stored once, as in the inputs
    assert all(t.dtype == torch.float32 for t in found.values())
    assert_close(found, expected)
    model = GPT2LMHeadModel.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert torch.equal(model.transformer.wte.weight, found["transformer.wte.weight"])


def test_lora_checkpoints_average_into_an_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    train(tmp_path / "run", model)
    assert os.path.isfile(tmp_path / "run" / "checkpoint-16" / "adapter_model.safetensors")
    out = tmp_path / "averaged"
    average_checkpoints(tmp_path / "run", out, last=3, progress=False)
    expected = mean64([load_file(tmp_path / "run" / f"checkpoint-{s}" / "adapter_model.safetensors")
                       for s in (8, 12, 16)])  # fmt: skip
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in expected.items())  # trained, not the zero init
    assert os.path.isfile(out / "adapter_config.json")
    loaded = PeftModel.from_pretrained(tiny_bert(), out)
    assert_close(get_peft_model_state_dict(loaded), expected)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    args = make_args(folder, save_strategy="steps", save_steps=4, max_steps=12)
    from conftest import RegressionDataset

    EMATrainer(
        model=TinyModel(TinyConfig()),
        args=args,
        train_dataset=RegressionDataset(32, seed=0),
        ema_args=EMAArguments(half_life="4ba"),
    ).train()
    return folder


def test_hf_ema_checkpoints_average_the_training_weights(ema_run, tmp_path, capsys):
    steps = (4, 8, 12)
    training, files = [], []
    for s in steps:
        folder = ema_run / f"checkpoint-{s}"
        with safe_open(folder / "ema_state.safetensors", framework="pt") as handle:
            training.append({k.removeprefix("training/"): handle.get_tensor(k) for k in handle.keys()
                             if k.startswith("training/")})  # fmt: skip
        files.append(load_file(folder / "model.safetensors"))
    assert training[0].keys() == files[0].keys() == {"linear.weight", "linear.bias"}
    assert not torch.equal(training[-1]["linear.weight"], files[-1]["linear.weight"])  # the files hold the EMA
    assert main([str(ema_run), "--out", str(tmp_path / "training"), "--no-progress"]) == 0
    assert "training weights from ema_state.safetensors" in capsys.readouterr().out
    assert_close(load_file(tmp_path / "training" / "model.safetensors"), mean64(training))
    assert "training weights from ema_state.safetensors" in (tmp_path / "training" / "README.md").read_text()
    args = [str(ema_run), "--weights", "model-files", "--out", str(tmp_path / "files"), "--no-progress"]
    assert main(args) == 0
    assert_close(load_file(tmp_path / "files" / "model.safetensors"), mean64(files))
    assert not os.path.exists(tmp_path / "files" / "ema_state.safetensors")


def refused(capsys, argv, *words, out=None):
    """Runs the CLI, checks it refused naming `words`, and that it wrote nothing."""
    assert main([*argv, "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    for word in words:
        assert word in error, error
    if out is not None:
        assert not os.path.exists(out)
        assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]
    return error


def test_checkpoints_of_different_models_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    synthetic(run, [1, 2])
    synthetic(run, [3], tensors=lambda s: {"w": torch.zeros(3, 3), "n": torch.tensor([1, 2])})
    out = str(tmp_path / "out")
    refused(
        capsys, [str(run), "--out", out], "checkpoint-1", "not a checkpoint of the model", "[3, 2], 'F32'", out=out
    )
    other = tmp_path / "other"
    synthetic(other, [1], tensors=lambda s: {"v": torch.zeros(2)})
    synthetic(other, [2], tensors=lambda s: {"v": torch.zeros(2, dtype=torch.float16)})
    refused(capsys, [str(other), "--out", out], "shape or dtype differs", "F16", out=out)
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic(a, [1], tensors=lambda s: {"v": torch.zeros(2)})
    synthetic(b, [2], tensors=lambda s: {"u": torch.zeros(2)})
    names = [str(a / "checkpoint-1"), str(b / "checkpoint-2")]
    refused(capsys, ["--checkpoints", *names, "--out", out], "missing there: u", "not in the newest: v", out=out)


def test_refusals_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    out = str(tmp_path / "out")
    os.makedirs(run)
    refused(capsys, [str(run), "--out", out], "holds no checkpoint-<step> folders", out=out)
    synthetic(run, [4])
    refused(capsys, [str(run), "--out", out], "at least 2 checkpoints, got 1", out=out)
    synthetic(run, [8, 12])
    refused(capsys, [str(run), "--last", "4", "--out", out], "--last 4", "holds (3", "--last 3 or fewer", out=out)
    refused(capsys, [str(run), "--last", "1", "--out", out], "at least 2", out=out)
    refused(capsys, [str(run), "--half-life", "8", "--out", out], "half_life", out=out)
    os.makedirs(out)
    refused(capsys, [str(run), "--out", out], "exists", "--overwrite")
    assert main([str(run), "--out", out, "--overwrite", "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    refused(capsys, [str(run), "--out", str(run / "checkpoint-8"), "--overwrite"], "is one of the checkpoints")
    with open(run / "checkpoint-8" / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff" * 16)  # a garbled header
    out2 = str(tmp_path / "out2")
    refused(capsys, [str(run), "--out", out2], "checkpoint-8/model.safetensors is corrupt", "header", out=out2)
    os.remove(run / "checkpoint-8" / "model.safetensors")
    with open(run / "checkpoint-8" / "pytorch_model.bin", "wb") as handle:
        handle.write(b"")
    refused(capsys, [str(run), "--out", out2], "checkpoint-8 has no model.safetensors", "pytorch_model.bin", out=out2)
    refused(capsys, ["--checkpoints", str(run / "checkpoint-4"), str(run / "checkpoint-4"), "--out", out2], "twice")


def test_a_missing_shard_is_refused(gpt2_run, tmp_path, capsys):
    import shutil

    folder, checkpoints = gpt2_run
    broken = tmp_path / "checkpoint-99"
    shutil.copytree(checkpoints[-1], broken)
    os.remove(broken / "model-00003-of-00006.safetensors")
    out = str(tmp_path / "out")
    refused(capsys, ["--checkpoints", checkpoints[0], str(broken), "--out", out],
            "checkpoint-99 is incomplete", "model-00003-of-00006.safetensors, which is missing", out=out)  # fmt: skip


def test_a_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    from hf_ema import average

    synthetic(tmp_path / "run", [1, 2, 3])
    calls = []

    def failing(path, key):
        calls.append(key)
        if len(calls) > 2:
            raise OSError("disk full")
        return load_file(path)[key]

    monkeypatch.setattr(average, "_read_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        average_checkpoints(tmp_path / "run", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_push_to_hub_uploads_the_written_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    synthetic(tmp_path / "run", [1, 2])
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(api, *, repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), kwargs["commit_message"]))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    average_checkpoints(tmp_path / "run", tmp_path / "out", push_to_hub="me/averaged", progress=False)
    assert calls[0] == ("create", "me/averaged", {"exist_ok": True})
    assert calls[1][:3] == ("upload", "me/averaged", sorted(os.listdir(tmp_path / "out")))
    assert "model.safetensors" in calls[1][2] and "checkpoints 1, 2" in calls[1][3]


def test_plan_reads_headers_only_and_orders_by_step(tmp_path):
    synthetic(tmp_path, [12, 8, 100])
    solved = plan(checkpoints=[tmp_path / "checkpoint-100", tmp_path / "checkpoint-8", tmp_path / "checkpoint-12"])
    assert [c.step for c in solved.checkpoints] == [8, 12, 100]
    assert solved.weights == [1 / 3] * 3
    with pytest.raises(AverageError, match="checkpoint-5 is not a checkpoint folder"):
        plan(tmp_path, checkpoints=["checkpoint-5", "checkpoint-8"])


def test_the_cli_needs_no_transformers_and_no_trainer_layer(tmp_path):
    synthetic(tmp_path / "run", [1, 2])
    code = (
        "import sys; from hf_ema.average import main; assert main(sys.argv[1:]) == 0; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert 'hf_ema.callback' not in sys.modules and 'hf_ema.trainer' not in sys.modules"
    )
    args = [str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-progress"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=OFFLINE)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "hf_ema.average", str(tmp_path / "run"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=OFFLINE,
    )
    assert result.returncode == 1 and "exists" in result.stderr and "Traceback" not in result.stderr
    assert "RuntimeWarning" not in result.stderr  # the package face does not import hf_ema.average early
