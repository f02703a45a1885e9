"""Parallel degrees from the recipe, checked against the world size, and the device mesh.

HSDP as torchtitan builds it (pytorch/torchtitan, torchtitan/distributed/parallel_dims.py and
torchtitan/models/llama3/infra/parallelize.py): a replicate dim outermost, the FSDP shard dim,
TP innermost; FSDP2 gets the 2-D mesh ("dp_replicate", "dp_shard") and then all-gathers and
reduce-scatters within a replica and all-reduces gradients across replicas. The data loader's
data-parallel rank runs over replicate x shard, in that order (torchtitan's flattened "dp").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelConfigError(ValueError):
    """Degrees that do not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    dp_shard: int
    tp: int
    dp_replicate: int = 1

    @property
    def dp(self) -> int:
        """The data-parallel degree: how many ranks see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


def resolve_dims(world_size: int, dp_shard: int, tp: int, dp_replicate: int = 1) -> ParallelDims:
    """Fill ``dp_shard = -1`` with the rest of the world; reject degrees that do not fit
    (``ParallelConfigError`` naming the recipe keys)."""
    fixed = [("tensor_parallel_degree", tp)]
    if dp_replicate != 1:  # named only where set: the messages of FSDP x TP runs stay as they were
        fixed.insert(0, ("data_parallel_replicate_degree", dp_replicate))
    if dp_replicate < 1 or tp < 1 or world_size % (tp * dp_replicate):
        raise ParallelConfigError(f"parallelism.{_product(fixed)} does not divide the world size {world_size}")
    if dp_shard == -1:
        dp_shard = world_size // (tp * dp_replicate)
    dims = ParallelDims(dp_shard, tp, dp_replicate)
    if dims.world_size != world_size:
        every = [*fixed[:-1], ("data_parallel_shard_degree", dp_shard), fixed[-1]]
        raise ParallelConfigError(
            f"{_product(every)} = {dims.world_size} != world size {world_size}; set "
            "data_parallel_shard_degree=-1 to use the rest"
        )
    return dims


def _product(degrees: list[tuple[str, int]]) -> str:
    return " x ".join(f"{k}={v}" for k, v in degrees)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The mesh ("dp_shard", "tp"), or ("dp_replicate", "dp_shard", "tp") when the replicate
    degree is > 1; TP ranks are adjacent (same node, fastest links), then the shard group, so a
    replica fills whole nodes when dp_shard x tp is a multiple of the GPUs per node."""
    if dims.dp_replicate == 1:  # the 2-D mesh of every run before HSDP: the same groups and DTensors
        return init_device_mesh(device_type, (dims.dp_shard, dims.tp), mesh_dim_names=("dp_shard", "tp"))
    return init_device_mesh(
        device_type, (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
    )


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """FSDP2's mesh: ("dp_replicate", "dp_shard") (HSDP) or "dp_shard" (FSDP)."""
    if "dp_replicate" in mesh.mesh_dim_names:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def dp_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """(this rank's data-parallel rank, the data-parallel degree): replicate-major, so each
    replica's shards take different slices of the global batch."""
    shard = mesh["dp_shard"]
    if "dp_replicate" not in mesh.mesh_dim_names:
        return shard.get_local_rank(), shard.size()
    replicate = mesh["dp_replicate"]
    return replicate.get_local_rank() * shard.size() + shard.get_local_rank(), replicate.size() * shard.size()
