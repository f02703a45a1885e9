"""Parallel degrees from the recipe, checked against the world size, and the device mesh."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelConfigError(ValueError):
    """Degrees that do not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    dp_shard: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.tp


def resolve_dims(world_size: int, dp_shard: int, tp: int) -> ParallelDims:
    """Fill ``dp_shard = -1`` with the rest of the world; reject degrees that do not fit."""
    if tp < 1 or world_size % tp:
        raise ParallelConfigError(
            f"parallelism.tensor_parallel_degree={tp} does not divide the world size {world_size}"
        )
    if dp_shard == -1:
        dp_shard = world_size // tp
    if dp_shard * tp != world_size:
        raise ParallelConfigError(
            f"data_parallel_shard_degree={dp_shard} x tensor_parallel_degree={tp} = {dp_shard * tp} "
            f"!= world size {world_size}; set data_parallel_shard_degree=-1 to use the rest"
        )
    return ParallelDims(dp_shard, tp)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """A 2-D mesh ("dp_shard", "tp"); TP ranks are adjacent (same node, fastest links)."""
    return init_device_mesh(device_type, (dims.dp_shard, dims.tp), mesh_dim_names=("dp_shard", "tp"))
