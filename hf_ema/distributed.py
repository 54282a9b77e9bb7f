"""Distributed helpers: local shards of sharded parameters, gathering for export, backend checks.

DDP and DeepSpeed ZeRO-1/2 keep full, identical parameters on every rank: nothing special. Two layouts are sharded:

- FSDP2 (`fully_shard`) and tensor parallelism make parameters `DTensor`s; a rank holds its local shard.
- DeepSpeed ZeRO-3 partitions each parameter: a rank holds `param.ds_tensor`, a flat slice of the flattened
  parameter (`ceil(numel / world)` elements, the last rank's padded), which the optimizer updates and every forward
  all-gathers from.

The EMA keeps averages of exactly these local tensors (`local_view`), updates them with no communication, gathers
them only where a full tensor is asked for (`gather_full`), describes them as `DTensor`s for sharded checkpoints
(`as_dtensor`), and re-slices a full tensor into the local shard on resume (`shard_like`), which also works at
another world size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor, Shard, distribute_tensor = None, None, None


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


def is_zero3(tensor: Tensor) -> bool:
    """Whether `tensor` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(tensor, "ds_id") and getattr(tensor, "ds_tensor", None) is not None


def is_sharded(tensor: Tensor) -> bool:
    return (DTensor is not None and isinstance(tensor, DTensor)) or is_zero3(tensor)


def local_view(tensor: Tensor) -> Tensor:
    """The tensor this rank holds and the optimizer updates (sharing its storage): a DTensor's local shard, a ZeRO-3
    parameter's partition, else the tensor itself."""
    if is_zero3(tensor):
        return tensor.ds_tensor
    return tensor.to_local() if is_sharded(tensor) else tensor


def global_shape(tensor: Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, whichever rank holds which part of it."""
    return tuple(tensor.ds_shape) if is_zero3(tensor) else tuple(tensor.shape)


def _zero3_span(param: Tensor) -> tuple[int, int, int]:
    """(start, valid, partition size): where this rank's ZeRO-3 partition lies in the flattened parameter."""
    group = param.ds_process_group
    size = math.ceil(param.ds_numel / dist.get_world_size(group))
    start = dist.get_rank(group) * size
    return start, max(0, min(size, param.ds_numel - start)), size


def comm_device(group=None) -> torch.device:
    """Where tensors for a collective on `group` must live: the current GPU under NCCL, else the host."""
    backend = str(dist.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


@torch.no_grad()
def gather_full(like: Tensor, local: Tensor) -> Tensor:
    """The full tensor of which `local` is this rank's shard, laid out like `like` (a collective for sharded ones)."""
    if is_zero3(like):
        group = like.ds_process_group
        device = comm_device(group)
        parts = [torch.empty(local.shape, dtype=local.dtype, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.to(device).contiguous(), group=group)
        return torch.cat(parts)[: like.ds_numel].view(like.ds_shape).to(local.device)
    if not is_sharded(like):
        return local
    sharded = DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return sharded.full_tensor()


@torch.no_grad()
def shard_like(like: Tensor, full: Tensor) -> Tensor:
    """This rank's shard of `full`, laid out like `like`; each rank slices its own copy (no communication)."""
    if is_zero3(like):
        start, valid, size = _zero3_span(like)
        part = torch.zeros(size, dtype=full.dtype, device=full.device)
        part[:valid] = full.reshape(-1)[start : start + valid]
        return part
    if not is_sharded(like):
        return full
    full = full.to(device=like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


_MESHES: dict[tuple[int, str], object] = {}  # per process group and device type


def as_dtensor(like: Tensor, local: Tensor) -> Tensor:
    """`local` (this rank's shard, laid out like `like`) as a DTensor, for torch.distributed.checkpoint; no copy.

    A ZeRO-3 partition becomes a 1-D tensor of the flattened parameter, sharded on dim 0 over the partition group:
    DeepSpeed and `Shard(0)` cut a flat tensor the same way (`ceil(numel / world)` per rank, padding dropped), so a
    checkpoint saved at one world size loads at another.
    """
    if is_zero3(like):
        from torch.distributed.device_mesh import DeviceMesh

        group = like.ds_process_group
        key = (id(group), local.device.type)
        if key not in _MESHES:
            _MESHES[key] = DeviceMesh.from_group(group or dist.group.WORLD, local.device.type)
        _, valid, _ = _zero3_span(like)
        return DTensor.from_local(local[:valid], _MESHES[key], [Shard(0)], shape=(like.ds_numel,), stride=(1,))
    if not is_sharded(like):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


@torch.no_grad()
def from_dtensor(like: Tensor, loaded: Tensor) -> Tensor:
    """This rank's local tensor, laid out like `like`, from a tensor `as_dtensor` described (and DCP filled)."""
    if is_zero3(like):
        _, valid, size = _zero3_span(like)
        part = torch.zeros(size, dtype=loaded.dtype, device=loaded.device)
        part[:valid] = loaded.to_local() if is_sharded(loaded) else loaded.reshape(-1)
        return part
    return loaded.to_local() if is_sharded(loaded) else loaded


def refresh_(tensors: list[Tensor]) -> None:
    """Makes ZeRO-3 parameters that hold a full copy (persistent small ones) gather it again from their partitions.

    DeepSpeed keeps parameters below `stage3_param_persistence_threshold` gathered between steps, and forwards read
    that copy, not the partition. After the partitions were written (a swap, a load), the copy is stale: free it and
    all-gather it again (a collective; every rank calls it with the same parameters).
    """
    held = [t for t in tensors if is_zero3(t) and getattr(t.ds_status, "name", "") == "AVAILABLE"]
    if held:
        held[0].partition(param_list=held, has_been_updated=False)
        held[0].all_gather(param_list=held)


def check_backend(model: nn.Module, deepspeed_config: dict | None = None) -> str:
    """Names the layout of `model`'s parameters ("replicated" or "sharded"), raising a `ValueError` for the parallel
    setups hf-ema does not support.

    Args:
        deepspeed_config (`dict`, *optional*): the DeepSpeed config, when DeepSpeed trains the model.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        raise ValueError(
            "hf-ema does not support FSDP1 (FullyShardedDataParallel): its flat parameters mix many weights and "
            "padding in one tensor, and their views are rebuilt on every forward, so an average could not be swapped "
            "in by name. Use FSDP2: set fsdp_version=2 in the accelerate FSDP config "
            "(TrainingArguments.fsdp_config={'version': 2}), or DeepSpeed ZeRO."
        )
    params = [p for p in model.parameters() if p.requires_grad]
    zero3 = [p for p in params if is_zero3(p)]
    if zero3:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if any(getattr(p, "ds_zero_param_process_group", None) is not None for p in zero3):
            raise ValueError(
                "hf-ema does not support DeepSpeed ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1): "
                "forwards read a secondary copy of each partition that an EMA swap would leave stale. Remove "
                "zero_hpz_partition_size from the DeepSpeed config."
            )
        if any("nvme" in str(getattr(p.ds_tensor, "final_location", "")).lower() for p in zero3):
            raise ValueError(
                "hf-ema does not support DeepSpeed ZeRO-3 with parameters offloaded to NVMe (offload_param.device "
                "'nvme'): their partitions are not in memory between steps. Offload to 'cpu' or not at all."
            )
        if dist.is_initialized() and any(dist.get_world_size(p.ds_process_group) != world for p in zero3):
            raise ValueError(
                "hf-ema does not support DeepSpeed ZeRO-3 partitioning over a subgroup of the ranks (MiCS, "
                "sequence parallelism): it is not tested. Partition over all ranks (plain ZeRO-3)."
            )
    if deepspeed_config and (deepspeed_config.get("tensor_parallel") or {}).get("autotp_size", 0) > 1:
        raise ValueError(
            "hf-ema does not support DeepSpeed AutoTP (tensor_parallel.autotp_size > 1): it is not tested."
        )
    if any(is_sharded(p) for p in params):
        return "sharded"
    return "replicated"
