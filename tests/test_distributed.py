"""DDP, FSDP2 and DeepSpeed ZeRO on CPU: two processes under torchrun on gloo (tests/distributed/worker.py)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import TinyConfig, TinyModel, assert_close, reference_ema, state_of
from helpers import eval_loss
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args, timeout=240, **extra_env):
    # The workers import hf_ema from this checkout, as the tests do (not from wherever the package is installed).
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra_env}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def schedule(steps, half_life=4):
    return [(k, 2 ** (-3 / half_life)) for k in range(3, steps + 1, 3)]


@pytest.mark.parametrize("kind", ["ema_trainer", "callback"])
def test_ddp_two_processes(tmp_path, kind):
    torchrun("ddp", str(tmp_path), kind)
    ranks = [torch.load(tmp_path / f"full-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    steps = ranks[0]["steps"]
    assert steps == 8  # 32 samples, 2 ranks x 4 per device: 4 steps per epoch
    for r in ranks:
        assert r["num_updates"] == len(schedule(steps))
        expected = reference_ema(r["weights"], 0, schedule(steps))
        assert_close(r["ema"], expected)  # each rank's EMA against its own recorded weights
        assert_close(r["ema_8ba"], reference_ema(r["weights"], 0, schedule(steps, half_life=8)))  # the second one
    for name in ranks[0]["ema"]:  # the ranks agree exactly
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name])
        assert torch.equal(ranks[0]["ema_8ba"][name], ranks[1]["ema_8ba"][name])
        assert torch.equal(ranks[0]["training"][name], ranks[1]["training"][name])
    # Evaluations during training ran on the EMA (eval set split over the two ranks, loss over all of it).
    evals = [h for h in ranks[0]["log_history"] if "eval_loss" in h]
    for entry in evals:
        step = entry["step"]
        expected = reference_ema(ranks[0]["weights"], 0, schedule(step))
        assert entry["eval_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    # Only the main process wrote; the checkpoint's model file holds the EMA and its sidecar is there.
    folder = tmp_path / "checkpoint-8"
    model_file = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    assert_close(model_file, reference_ema(ranks[0]["weights"], 0, schedule(8)))
    assert sorted(os.listdir(tmp_path)).count("checkpoint-8") == 1
    assert not [f for f in os.listdir(folder) if f.startswith(".ema_state")]

    # Resume from the middle checkpoint with two processes: the same EMA and training weights, bit for bit.
    torchrun("ddp", str(tmp_path), kind, str(tmp_path / "checkpoint-4"))
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=False)
        for name in ranks[rank]["ema"]:
            for key in ("ema", "ema_8ba", "training"):
                assert torch.equal(resumed[key][name], ranks[rank][key][name]), (key, name)


def test_fsdp2_shard_local_average(tmp_path):
    from hf_ema import EMAArguments, EMACallback

    torchrun("fsdp2", str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp2-rank{r}.pt", weights_only=False) for r in (0, 1)]
    expected = reference_ema(ranks[0]["weights"], 0, [(k, 0.7) for k in range(1, 7)])
    expected_8ba = reference_ema(ranks[0]["weights"], 0, [(k, 0.9) for k in range(1, 7)])
    for r in ranks:
        assert_close(r["full_ema"], expected)  # gathered from shard-local averages
        assert_close(r["full_ema_8ba"], expected_8ba)  # the second average, in the same update
        assert_close(r["swapped"], expected)  # the EMA swapped into the sharded parameters
        assert_close(r["swapped_8ba"], expected_8ba)
        assert_close(r["reloaded_ema_8ba"], r["full_ema_8ba"], rtol=0, atol=0)
        assert_close(r["restored"], r["weights"][6], rtol=0, atol=0)  # training weights back, bit for bit
        assert_close(r["reloaded_ema"], r["full_ema"], rtol=0, atol=0)  # sidecar round trip at world size 2
        assert_close(r["reloaded_training"], r["weights"][6], rtol=0, atol=0)
    # Each rank holds only its shard: dim 0 of an 8-row weight is split 4 + 4.
    assert ranks[0]["local_shapes"]["0.weight"] == (4, 6) and ranks[1]["local_shapes"]["0.weight"] == (4, 6)
    assert ranks[0]["fingerprint"]["0.weight"] == [[8, 6], "float32"]  # full shapes: loadable at any world size
    assert ranks[0]["wrote"] is not None and ranks[1]["wrote"] is None  # only the main process wrote

    # Resume the same sidecar at world size 1, unsharded.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    callback = EMACallback(EMAArguments(half_life=["4ba", "8ba"]))
    callback.averager.reset(model, sharded=False)
    callback.averager.load(str(tmp_path), expected_step=6)
    assert_close(
        {n: t.double() for n, t in callback.store.ema_tensors(model).items()}, ranks[0]["full_ema"], rtol=0, atol=0
    )
    assert_close({n: p.double() for n, p in model.named_parameters()}, ranks[0]["weights"][6], rtol=0, atol=0)


def test_fsdp2_posthoc_snapshots(tmp_path):
    """Post-hoc EMA snapshots of an FSDP2 model: every rank writes its own shards (torch.distributed.checkpoint), and
    synthesis in this one process reads them, against float64 power-function averages of the recorded weights."""
    from hf_ema import posthoc
    from hf_ema.rules import gamma_of_sigma_rel

    torchrun("fsdp2_snapshots", str(tmp_path))
    weights = torch.load(tmp_path / "fsdp2-snapshots.pt", weights_only=False)["weights"]
    folder = tmp_path / "float32"
    assert [s.step for s in posthoc.list_snapshots(folder)] == [3, 6, 9, 12]
    assert sorted(os.listdir(folder / "ema_snapshots" / "snapshot-12" / "ema_state")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "hf_ema.json",
    ]  # fmt: skip
    assert posthoc.list_snapshots(folder)[-1].meta["fingerprint"]["0.weight"] == [[8, 6], "float32"]
    for sigma_rel in (0.05, 0.1):
        gamma = gamma_of_sigma_rel(sigma_rel)
        reference = {n: sum(((k / 12) ** (gamma + 1) - ((k - 1) / 12) ** (gamma + 1)) * weights[k][n] for k in range(1, 13)) for n in weights[0]}  # fmt: skip
        for dtype, tolerance in (("float32", 1e-6), ("bfloat16", 2**-8)):
            synth = posthoc.synthesize(tmp_path / dtype, sigma_rel=sigma_rel)
            for name, value in reference.items():
                assert synth[name].shape == value.shape
                torch.testing.assert_close(synth[name].double(), value, rtol=tolerance, atol=tolerance)


def test_fsdp2_through_ema_trainer(tmp_path):
    """FSDP2 via accelerate (distributed type forced on CPU): shard-local averages, checkpoints, exact resume."""
    torchrun("trainer_fsdp2", str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp2-trainer-full-rank{r}.pt", weights_only=False) for r in (0, 1)]
    steps = ranks[0]["steps"]
    assert steps == 8 and all(r["sharded"] for r in ranks)
    for r in ranks:
        expected = reference_ema(r["weights"], 0, [(k, 2 ** (-1 / 4)) for k in range(1, steps + 1)])
        assert_close(r["ema"], {n: expected[n] for n in r["ema"]})
        expected = reference_ema(r["weights"], 0, [(k, 2 ** (-1 / 8)) for k in range(1, steps + 1)])
        assert_close(r["ema_8ba"], {n: expected[n] for n in r["ema_8ba"]})
        assert_close(r["training"], {n: r["weights"][steps][n] for n in r["training"]}, rtol=0, atol=0)
    # The averages cover every trainable parameter exactly once, split over the ranks (names and element counts).
    trainable = ranks[0]["trainable"]  # full sizes (DTensor.numel is global)
    assert all(sorted(r["names"]) == sorted(trainable) for r in ranks)
    assert sum(r["shadow_numel"] for r in ranks) == sum(trainable.values())
    # Each rank averages only its shard of every sharded matrix.
    name = "model.layers.0.mlp.gate_proj.weight"
    assert ranks[0]["global_shapes"][name] == (64, 32) and ranks[0]["local_shapes"][name] == (32, 32)
    # The EMA state of a sharded model is saved sharded (torch.distributed.checkpoint): one file per rank, no gather.
    files = sorted(os.listdir(tmp_path / "checkpoint-4" / "ema_state"))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "hf_ema.json"]
    assert not (tmp_path / "checkpoint-4" / "ema_state.safetensors").exists()

    torchrun("trainer_fsdp2", str(tmp_path), str(tmp_path / "checkpoint-4"))
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"fsdp2-trainer-resumed-rank{rank}.pt", weights_only=False)
        for key in ("ema", "ema_8ba", "training"):
            for tensor_name, value in ranks[rank][key].items():
                assert torch.equal(resumed[key][tensor_name], value), (key, tensor_name)


def test_unsupported_backends_are_refused(monkeypatch):
    import torch.distributed.fsdp as fsdp
    from helpers import fake_zero3

    from hf_ema.distributed import check_backend

    class FakeFSDP1(nn.Module):
        pass

    monkeypatch.setattr(fsdp, "FullyShardedDataParallel", FakeFSDP1)
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version=2"):
        check_backend(nn.Sequential(FakeFSDP1()))
    assert check_backend(nn.Linear(2, 2)) == "replicated"
    assert check_backend(fake_zero3(nn.Linear(2, 2))) == "sharded"
    with pytest.raises(ValueError, match="zero_hpz_partition_size"):
        check_backend(fake_zero3(nn.Linear(2, 2), ds_zero_param_process_group=object()))
    nvme = fake_zero3(nn.Linear(2, 2))
    for param in nvme.parameters():
        param.ds_tensor.final_location = "OffloadDeviceEnum.nvme"
    with pytest.raises(ValueError, match="NVMe"):
        check_backend(nvme)
    with pytest.raises(ValueError, match="autotp_size"):
        check_backend(nn.Linear(2, 2), {"tensor_parallel": {"autotp_size": 2}})


deepspeed_rows = [
    # (stage, trainer kind, also resume): EMATrainer runs without stage3_gather_16bit_weights_on_model_save, the stock
    # Trainer with it; "3-nopersist" partitions every parameter between steps (none kept gathered); "3-init" builds
    # the model partitioned (from_pretrained under zero.Init, as large models are loaded).
    ("1", "ema_trainer", False),
    ("2", "ema_trainer", True),
    ("2", "callback", False),
    ("3", "ema_trainer", True),
    ("3", "callback", True),
    ("3-nopersist", "ema_trainer", False),
    ("3-init", "ema_trainer", True),
]


@pytest.mark.parametrize(
    "stage, kind, also_resume", deepspeed_rows, ids=[f"zero{r[0]}-{r[1]}" for r in deepspeed_rows]
)
def test_deepspeed_zero(tmp_path, stage, kind, also_resume):
    """DeepSpeed ZeRO through the Trainer (DeepSpeed's CPU accelerator, gloo): the averaged tensors are the ones the
    optimizer updates (ZeRO-3: each rank's partitions), evaluations and model files use the EMA, resume is exact."""
    pytest.importorskip("deepspeed")
    from helpers import eval_loss

    from hf_ema import EMAArguments, EMACallback

    torchrun("deepspeed", str(tmp_path), stage, kind, DS_ACCELERATOR="cpu")
    ranks = [torch.load(tmp_path / f"ds{stage}-{kind}-full-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["steps"] == 8 for r in ranks)
    assert all(r["zero3"] == stage.startswith("3") for r in ranks)
    for r in ranks:
        assert r["num_updates"] == 2
        expected = reference_ema(r["weights"], 0, schedule(8))
        assert_close(r["ema"], expected)  # gathered by DeepSpeed from the EMA swapped into the partitions
        assert_close(r["ema_8ba"], reference_ema(r["weights"], 0, schedule(8, half_life=8)))  # the second average
        assert_close(r["training"], r["weights"][8], rtol=0, atol=0)  # swapped back, bit for bit
    for name in ranks[0]["ema"]:
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name])
    # Evaluations during training ran on the EMA (the ZeRO-3 rows also check the gathered copies DeepSpeed keeps).
    evals = [h for h in ranks[0]["log_history"] if "eval_loss" in h]
    assert len(evals) == 4
    for entry in evals:
        expected = reference_ema(ranks[0]["weights"], 0, schedule(entry["step"]))
        assert entry["eval_loss"] == pytest.approx(eval_loss(expected), rel=1e-5)
    # The checkpoint's model file holds the EMA: with the gather flag through the Trainer, without it by EMATrainer.
    folder = tmp_path / "checkpoint-8"
    model_file = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    assert_close(model_file, reference_ema(ranks[0]["weights"], 0, schedule(8)))
    # Coverage: every trainable parameter, on every rank; under ZeRO-3 each element on exactly one rank.
    for name, shape in ranks[0]["global_shapes"].items():
        numel = torch.Size(shape).numel()
        assert all(name in r["local_numel"] for r in ranks)
        if stage.startswith("3"):
            spans = sorted(r["spans"][name] for r in ranks)
            assert spans[0][0] == 0 and sum(valid for _, valid in spans) == numel
            assert all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False) if b[1])
            assert all(r["local_numel"][name] == -(-numel // 2) for r in ranks)  # ceil(numel / 2), padded
        else:
            assert all(r["local_numel"][name] == numel for r in ranks)  # ZeRO-1/2 parameters are whole
    sharded = stage.startswith("3")
    assert (folder / "ema_state" / "hf_ema.json").is_file() == sharded
    assert (folder / "ema_state.safetensors").is_file() == (not sharded)

    if sharded:  # the sharded state of 2 ranks loads into a plain model in one process (DCP reshards)
        model = TinyModel(TinyConfig())
        callback = EMACallback(EMAArguments(half_life=["4ba", "8ba"], update_interval="3ba"))
        callback.averager.reset(model, sharded=False)
        callback.averager.load(str(folder), expected_step=8)
        for label, key in (("4ba", "ema"), ("8ba", "ema_8ba")):
            loaded = callback.store.ema_tensors(model, label)
            assert_close({n: t.double() for n, t in loaded.items()}, ranks[0][key], rtol=0, atol=0)
        assert_close(state_of(model), ranks[0]["training"], rtol=0, atol=0)
    if not also_resume:
        return
    torchrun("deepspeed", str(tmp_path), stage, kind, str(tmp_path / "checkpoint-4"), DS_ACCELERATOR="cpu")
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"ds{stage}-{kind}-resumed-rank{rank}.pt", weights_only=False)
        for key in ("ema", "ema_8ba", "training"):
            for name, value in ranks[rank][key].items():
                assert torch.equal(resumed[key][name], value), (key, name)


def test_ema_object_in_an_accelerate_loop_under_ddp(tmp_path):
    torchrun("ema_loop_ddp", str(tmp_path))
    ranks = [torch.load(tmp_path / f"ema-loop-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["updates"] == 4 for r in ranks)
    for label, half_life in (("4ba", 4), ("8ba", 8)):
        expected = reference_ema(ranks[0]["weights"], 0, [(k, 2 ** (-2 / half_life)) for k in (2, 4, 6, 8)])
        for r in ranks:  # every rank keeps the same averages, equal to the reference
            assert_close(r["averages"][label], expected)
            assert_close(r["resumed"][label], r["averages"][label], rtol=0, atol=0)  # save_state/load_state at 4
        assert_close(ranks[1]["averages"][label], ranks[0]["averages"][label], rtol=0, atol=0)
    assert all(r["resumed_updates"] == 4 for r in ranks)


def test_ema_object_on_an_fsdp2_model(tmp_path):
    torchrun("ema_loop_fsdp2", str(tmp_path))
    ranks = [torch.load(tmp_path / f"ema-fsdp2-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["local"]["0.weight"] == (4, 6)  # shard-local: half of the (8, 6) weight per rank
    for label, half_life in (("4ba", 4), ("8ba", 8)):
        expected = reference_ema(ranks[0]["weights"], 0, [(k, 2 ** (-1 / half_life)) for k in range(1, 7)])
        for r in ranks:
            assert_close(r["full"][label], expected)
            assert_close(r["reloaded"][label], r["full"][label], rtol=0, atol=0)  # state_dict round trip
    assert ranks[0]["steps"] == 6
    saved = load_file(tmp_path / "ema-fsdp2" / "model.safetensors")  # gathered, written by rank 0
    assert_close({n: t.double() for n, t in saved.items() if n in ranks[0]["full"]["4ba"]}, ranks[0]["full"]["4ba"])
    assert set(saved) == set(ranks[0]["full"]["4ba"])


def test_bema_on_an_fsdp2_model(tmp_path):
    from test_bema import bema_reference

    torchrun("ema_loop_fsdp2_bema", str(tmp_path))
    ranks = [torch.load(tmp_path / f"ema-fsdp2-bema-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["local"]["0.weight"] == (4, 6)  # theta_0 is shard-local like the average
    # Updates at steps 2, 4, 6; read at step 7 with the training weights of step 7.
    expected = bema_reference(ranks[0]["weights"], 6, every=2, now=7)
    for r in ranks:
        assert_close(r["readout"], expected)
        assert_close(r["reloaded"], r["readout"], rtol=0, atol=0)  # the sharded EMA state, theta_0 and all
        assert_close(r["training"], r["weights"][7], rtol=0, atol=0)
    assert any(name.endswith(".distcp") for name in ranks[0]["files"])
