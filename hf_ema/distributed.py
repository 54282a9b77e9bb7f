"""Distributed helpers: FSDP2 modules, ZeRO-3 re-gathers, and the backend checks.

How each tensor is held per rank (whole, DTensor shard, ZeRO-3 partition) is `hf_ema.layout`'s job.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from .layout import comm_device, is_sharded, is_zero3

__all__ = ["check_backend", "comm_device", "fsdp_modules", "refresh_", "reshard_"]


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 (`fully_shard`) modules inside `module`, empty without FSDP2."""
    from torch.distributed.fsdp import FSDPModule  # public since torch 2.6

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_(modules: list[nn.Module]) -> None:
    """Makes FSDP2 modules register their sharded parameters again.

    After a forward without backward (evaluation), FSDP2 can leave a module's parameters unsharded: plain tensors
    gathered before the optimizer step, no longer the ones it updates. Resharding frees them and registers the
    sharded DTensors again (the next forward gathers them, as it would have after a training step).
    """
    for submodule in modules:
        submodule.reshard()


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
