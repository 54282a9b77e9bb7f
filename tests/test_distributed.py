"""DDP and FSDP2 on CPU: two processes under torchrun on gloo (tests/distributed/worker.py)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, reference_ema
from helpers import eval_loss
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")


def torchrun(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def schedule(steps):
    return [(k, 2 ** (-3 / 4)) for k in range(3, steps + 1, 3)]


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
    for name in ranks[0]["ema"]:  # the ranks agree exactly
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name])
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
            assert torch.equal(resumed["ema"][name], ranks[rank]["ema"][name]), name
            assert torch.equal(resumed["training"][name], ranks[rank]["training"][name]), name


def test_fsdp2_shard_local_average(tmp_path):
    from hf_ema import EMACallback

    torchrun("fsdp2", str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp2-rank{r}.pt", weights_only=False) for r in (0, 1)]
    expected = reference_ema(ranks[0]["weights"], 0, [(k, 0.7) for k in range(1, 7)])
    for r in ranks:
        assert_close(r["full_ema"], expected)  # gathered from shard-local averages
        assert_close(r["swapped"], expected)  # the EMA swapped into the sharded parameters
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
    callback = EMACallback()
    callback.model = model
    callback._load_state(str(tmp_path), model, expected_step=6)
    assert_close(
        {n: t.double() for n, t in callback.store.ema_tensors(model).items()}, ranks[0]["full_ema"], rtol=0, atol=0
    )
    assert_close({n: p.double() for n, p in model.named_parameters()}, ranks[0]["weights"][6], rtol=0, atol=0)


def test_fsdp2_through_ema_trainer(tmp_path):
    """FSDP2 via accelerate (distributed type forced on CPU): shard-local averages, checkpoints, exact resume."""
    torchrun("trainer_fsdp2", str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp2-trainer-full-rank{r}.pt", weights_only=False) for r in (0, 1)]
    steps = ranks[0]["steps"]
    assert steps == 8 and all(r["sharded"] for r in ranks)
    for r in ranks:
        expected = reference_ema(r["weights"], 0, [(k, 2 ** (-1 / 4)) for k in range(1, steps + 1)])
        assert_close(r["ema"], {n: expected[n] for n in r["ema"]})
        assert_close(r["training"], {n: r["weights"][steps][n] for n in r["training"]}, rtol=0, atol=0)
    # The averages cover every trainable parameter exactly once, split over the ranks (names and element counts).
    trainable = ranks[0]["trainable"]  # full sizes (DTensor.numel is global)
    assert all(sorted(r["names"]) == sorted(trainable) for r in ranks)
    assert sum(r["shadow_numel"] for r in ranks) == sum(trainable.values())
    # Each rank averages only its shard of every sharded matrix.
    name = "model.layers.0.mlp.gate_proj.weight"
    assert ranks[0]["global_shapes"][name] == (64, 32) and ranks[0]["local_shapes"][name] == (32, 32)
    assert (tmp_path / "checkpoint-4" / "ema_state.safetensors").is_file()

    torchrun("trainer_fsdp2", str(tmp_path), str(tmp_path / "checkpoint-4"))
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"fsdp2-trainer-resumed-rank{rank}.pt", weights_only=False)
        for key in ("ema", "training"):
            for tensor_name, value in ranks[rank][key].items():
                assert torch.equal(resumed[key][tensor_name], value), (key, tensor_name)


def test_unsupported_backends_are_refused_at_train_begin(tmp_path, monkeypatch):
    import torch.distributed.fsdp as fsdp
    from helpers import build

    from hf_ema import EMAArguments
    from hf_ema.distributed import check_backend

    model = nn.Linear(2, 2)
    model.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its parameters with
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        check_backend(model)

    class FakeFSDP1(nn.Module):
        pass

    monkeypatch.setattr(fsdp, "FullyShardedDataParallel", FakeFSDP1)
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version=2"):
        check_backend(nn.Sequential(FakeFSDP1()))
    assert check_backend(nn.Linear(2, 2)) == "replicated"

    trainer, _, _ = build(tmp_path, EMAArguments(half_life="4ba"))
    trainer.model.linear.weight.ds_id = 1
    with pytest.raises(ValueError, match="DeepSpeed"):
        trainer.train()
    assert trainer.state.global_step == 0
