"""Distributed helpers: local shards of sharded parameters, gathering for export, backend checks.

DDP keeps full, identical tensors on every rank: nothing special. FSDP2 (`fully_shard`) and tensor parallelism make
parameters `DTensor`s: the EMA keeps averages of the local shards only (`local_view`), updates them with no
communication, gathers them only to write a checkpoint (`gather_full`) and re-slices a full tensor into the local
shard on resume (`shard_like`), which also works at another world size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor, distribute_tensor = None, None


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (`fully_shard`) modules inside `module`, empty without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_(modules: list[nn.Module]) -> None:
    """Makes FSDP2 modules register their sharded parameters again.

    After a forward without backward (evaluation), FSDP2 can leave a module's parameters unsharded: plain tensors
    gathered before the optimizer step, no longer the ones it updates. Resharding frees them and registers the
    sharded DTensors again (the next forward gathers them, as it would have after a training step).
    """
    for submodule in modules:
        submodule.reshard()


def is_sharded(tensor: Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_view(tensor: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (sharing its storage), else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@torch.no_grad()
def gather_full(like: Tensor, local: Tensor) -> Tensor:
    """The full tensor of which `local` is this rank's shard, laid out like the DTensor `like` (a collective)."""
    if not is_sharded(like):
        return local
    sharded = DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return sharded.full_tensor()


@torch.no_grad()
def shard_like(like: Tensor, full: Tensor) -> Tensor:
    """This rank's shard of `full`, laid out like the DTensor `like`; each rank slices its own copy (no communication)."""
    if not is_sharded(like):
        return full
    full = full.to(device=like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def check_backend(model: nn.Module, deepspeed: object = None) -> str:
    """Names the parallelism of `model`, raising a `ValueError` for the ones hf-ema does not support yet."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if deepspeed or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "hf-ema does not support DeepSpeed yet: its ZeRO partitions are not averaged or saved correctly by this "
            "version, and a silently wrong average is worse than none. Train with DDP or FSDP2 "
            "(fsdp_version=2), or without EMA, for now."
        )
    if isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        raise ValueError(
            "hf-ema does not support FSDP1 (FullyShardedDataParallel, flat parameters). Use FSDP2: set "
            "fsdp_version=2 in the accelerate FSDP config (TrainingArguments.fsdp_config={'version': 2})."
        )
    if any(is_sharded(p) for p in model.parameters()):
        return "sharded"
    return "replicated"
