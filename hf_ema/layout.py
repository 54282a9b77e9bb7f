"""How this rank holds each averaged tensor: whole, as a DTensor shard, or as a DeepSpeed ZeRO-3 partition.

A layout is chosen once per tensor when the store is built (`layout_of`); every place that needs the local tensor,
the full tensor, a checkpoint view or a shard of a loaded tensor asks that layout, instead of testing the backend
again:

- `REPLICATED`: the tensor is whole on every rank (one device, DDP, DeepSpeed ZeRO-1/2, and the buffers of sharded
  models).
- `DTENSOR`: FSDP2 (`fully_shard`) and tensor parallelism make parameters `DTensor`s; a rank holds its local shard.
- `ZERO3`: DeepSpeed ZeRO-3 partitions each parameter; a rank holds `param.ds_tensor`, a flat slice of the flattened
  parameter (`ceil(numel / world)` elements, the last rank's padded), which the optimizer updates and every forward
  all-gathers from.

The averages are kept of exactly the local tensors, updated with no communication, gathered only where a full
tensor is asked for, described as `DTensor`s for sharded checkpoints, and re-sliced from a full tensor on resume
(which also works at another world size).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def is_zero3(tensor: Tensor) -> bool:
    """Whether `tensor` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(tensor, "ds_id") and getattr(tensor, "ds_tensor", None) is not None


def is_dtensor(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


def is_sharded(tensor: Tensor) -> bool:
    return is_dtensor(tensor) or is_zero3(tensor)


def comm_device(group=None) -> torch.device:
    """Where tensors for a collective on `group` must live: the current GPU under NCCL, else the host."""
    backend = str(dist.get_backend(group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _from_loaded(loaded: Tensor) -> Tensor:
    return loaded.to_local() if is_dtensor(loaded) else loaded


class Replicated:
    """The tensor is whole on this rank."""

    sharded = False
    flat = False  # saved flattened in sharded checkpoints

    def local(self, tensor: Tensor) -> Tensor:
        """The tensor this rank holds and the optimizer updates (sharing its storage)."""
        return tensor

    def global_shape(self, tensor: Tensor) -> tuple[int, ...]:
        """The shape of the whole tensor, whichever rank holds which part of it."""
        return tuple(tensor.shape)

    def gather(self, like: Tensor, local: Tensor) -> Tensor:
        """The full tensor of which `local` is this rank's part (a collective for sharded layouts)."""
        return local

    def shard(self, like: Tensor, full: Tensor) -> Tensor:
        """This rank's part of `full`; each rank slices its own copy (no communication)."""
        return full

    def as_dtensor(self, like: Tensor, local: Tensor) -> Tensor:
        """`local` as torch.distributed.checkpoint should save it (a DTensor over the ranks' parts); no copy."""
        return local

    def from_dtensor(self, like: Tensor, loaded: Tensor) -> Tensor:
        """This rank's local tensor from what `as_dtensor` described and DCP filled."""
        return _from_loaded(loaded)


class DTensorShards(Replicated):
    """FSDP2 / tensor parallel: the parameter is a DTensor; this rank holds its local shard."""

    sharded = True

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local()

    def gather(self, like: Tensor, local: Tensor) -> Tensor:
        return self.as_dtensor(like, local).full_tensor()

    def shard(self, like: Tensor, full: Tensor) -> Tensor:
        full = full.to(device=like.device)
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()

    def as_dtensor(self, like: Tensor, local: Tensor) -> Tensor:
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


_MESHES: dict[tuple[int, str], object] = {}  # per process group and device type


class Zero3Partitions(Replicated):
    """DeepSpeed ZeRO-3: this rank holds `param.ds_tensor`, a flat slice of the flattened parameter.

    In sharded checkpoints a partition is a 1-D tensor of the flattened parameter, sharded on dim 0 over the
    partition group: DeepSpeed and `Shard(0)` cut a flat tensor the same way (`ceil(numel / world)` per rank, padding
    dropped), so a checkpoint saved at one world size loads at another.
    """

    sharded = True
    flat = True

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.ds_tensor

    def global_shape(self, tensor: Tensor) -> tuple[int, ...]:
        return tuple(tensor.ds_shape)

    @staticmethod
    def span(param: Tensor) -> tuple[int, int, int]:
        """(start, valid, partition size): where this rank's partition lies in the flattened parameter."""
        group = param.ds_process_group
        size = math.ceil(param.ds_numel / dist.get_world_size(group))
        start = dist.get_rank(group) * size
        return start, max(0, min(size, param.ds_numel - start)), size

    def gather(self, like: Tensor, local: Tensor) -> Tensor:
        group = like.ds_process_group
        device = comm_device(group)
        parts = [torch.empty(local.shape, dtype=local.dtype, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.to(device).contiguous(), group=group)
        return torch.cat(parts)[: like.ds_numel].view(like.ds_shape).to(local.device)

    def _padded(self, like: Tensor, flat: Tensor) -> Tensor:
        _, valid, size = self.span(like)
        part = torch.zeros(size, dtype=flat.dtype, device=flat.device)
        part[:valid] = flat
        return part

    def shard(self, like: Tensor, full: Tensor) -> Tensor:
        start, valid, _ = self.span(like)
        return self._padded(like, full.reshape(-1)[start : start + valid])

    def as_dtensor(self, like: Tensor, local: Tensor) -> Tensor:
        from torch.distributed.device_mesh import DeviceMesh

        group = like.ds_process_group
        key = (id(group), local.device.type)
        if key not in _MESHES:
            _MESHES[key] = DeviceMesh.from_group(group or dist.group.WORLD, local.device.type)
        _, valid, _ = self.span(like)
        return DTensor.from_local(local[:valid], _MESHES[key], [Shard(0)], shape=(like.ds_numel,), stride=(1,))

    def from_dtensor(self, like: Tensor, loaded: Tensor) -> Tensor:
        return self._padded(like, _from_loaded(loaded).reshape(-1))


REPLICATED, DTENSOR, ZERO3 = Replicated(), DTensorShards(), Zero3Partitions()


def layout_of(tensor: Tensor) -> Replicated:
    """The layout of one tracked tensor; chosen once, when the store is built."""
    if is_zero3(tensor):
        return ZERO3
    return DTENSOR if is_dtensor(tensor) else REPLICATED
