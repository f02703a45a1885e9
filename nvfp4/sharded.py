"""Quantizing sharded operands: a DTensor's per-tensor scale comes from its *global* amax.

Generic over placements: the local amax is all-reduced (MAX) over exactly the mesh dims on
which the tensor is sharded; replicated dims hold the same data and need no reduction.
Knows DTensor placements, not how meshes are built.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from nvfp4.format import (
    BLOCK_SIZE,
    BlockScaleRule,
    TensorScaleMode,
    amax,
    amax_and_scale,
    amaxes,
    amaxes_and_scales,
    tensor_scale,
)


def sharded_dims(t: DTensor) -> list[int]:
    """Mesh dims on which ``t`` is sharded (its pieces differ there)."""
    dims = []
    for i, p in enumerate(t.placements):
        if isinstance(p, Partial):
            raise ValueError(f"cannot take the amax of a Partial DTensor {tuple(t.shape)}; reduce it first")
        if not isinstance(p, Replicate):  # Shard and _StridedShard
            dims.append(i)
    return dims


def reduce_amax(local_amax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """MAX-reduce a local amax over the mesh dims that shard ``like`` (a no-op for plain tensors)."""
    if not isinstance(like, DTensor):
        return local_amax
    mesh, dims = like.device_mesh, sharded_dims(like)
    if len(dims) > 1 and len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        dist.all_reduce(local_amax, op=dist.ReduceOp.MAX)  # sharded over the whole world: one collective
        return local_amax
    for d in dims:
        dist.all_reduce(local_amax, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
    return local_amax


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def global_amax(*tensors: torch.Tensor) -> torch.Tensor:
    """max |x| over all pieces of all ``tensors`` (one logical tensor or a fused group).

    Members of a group share their sharding, so one collective serves the whole group.
    """
    return reduce_amax(amax(*(local(t) for t in tensors)), tensors[0])


def global_amax_and_scale(
    *tensors: torch.Tensor, tensor_scale_mode: TensorScaleMode, block_scale_rule: BlockScaleRule = "amax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``global_amax`` and its tensor scale (one CUDA kernel for both when nothing is sharded)."""
    if not isinstance(tensors[0], DTensor):
        return amax_and_scale(*tensors, tensor_scale_mode=tensor_scale_mode, block_scale_rule=block_scale_rule)
    amax = global_amax(*tensors)
    return amax, tensor_scale(amax, tensor_scale_mode, block_scale_rule)


def global_amaxes_and_scales(
    groups: list[tuple[torch.Tensor, ...]],
    tensor_scale_mode: TensorScaleMode,
    block_scale_rules: list[BlockScaleRule] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``global_amax_and_scale`` of each group (e.g. a linear's input, and its weights; each with its
    block scale rule, default amax): the local amaxes from one kernel launch, and one all-reduce for
    all groups sharded alike (a rowwise TP linear's input and weight: one collective instead of two;
    the max is exact, so the values are those of a reduction per group)."""
    rules = block_scale_rules or ["amax"] * len(groups)
    if not any(isinstance(g[0], DTensor) for g in groups):
        return amaxes_and_scales(groups, tensor_scale_mode=tensor_scale_mode, block_scale_rules=rules)
    result = amaxes([[local(t) for t in g] for g in groups])
    pending = [i for i, g in enumerate(groups) if isinstance(g[0], DTensor) and sharded_dims(g[0])]
    while pending:
        like = groups[pending[0]][0]
        alike = [i for i in pending if _sharded_alike(groups[i][0], like)]
        reduced = reduce_amax(torch.stack([result[i] for i in alike]), like)
        for j, i in enumerate(alike):
            result[i] = reduced[j]
        pending = [i for i in pending if i not in alike]
    return [(a, tensor_scale(a, tensor_scale_mode, rule)) for a, rule in zip(result, rules)]


def _sharded_alike(t: torch.Tensor, like: DTensor) -> bool:
    """Whether one all-reduce serves both: DTensors on the same mesh, sharded on the same dims."""
    return isinstance(t, DTensor) and t.device_mesh == like.device_mesh and sharded_dims(t) == sharded_dims(like)


def check_local_blocks(name: str, t: torch.Tensor) -> None:
    """The local shard's last dim must hold whole 16-element blocks."""
    k = local(t).shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(
            f"{name}: local reduction dim {k} (global {t.shape[-1]}) is not a multiple of "
            f"{BLOCK_SIZE}, so NVFP4 blocks would straddle ranks; use a tensor-parallel degree "
            f"that divides {t.shape[-1] // BLOCK_SIZE} or exclude the layer from QAT"
        )


def output_placement(x: DTensor, w: DTensor) -> list:
    """Placements of y = x @ w.T computed shard by shard (Megatron colwise / rowwise)."""
    (xp,), (wp,) = x.placements, w.placements
    if isinstance(wp, Shard) and wp.dim == 0 and isinstance(xp, Replicate):
        return [Shard(-1)]  # colwise: each rank owns a slice of the output features
    if isinstance(wp, Shard) and wp.dim == 1 and isinstance(xp, Shard) and xp.dim in (-1, x.ndim - 1):
        return [Partial()]  # rowwise: each rank holds a partial sum over its K slice
    if isinstance(wp, Replicate) and isinstance(xp, Replicate):
        return [Replicate()]
    raise NotImplementedError(f"NVFP4 QAT linear: input {x.placements} with weight {w.placements}")


def input_grad_placement(x: DTensor, w: DTensor) -> list:
    """Placements of the input gradient grad_x = grad_y @ w computed shard by shard.

    Colwise (weight ``Shard(0)``, input ``Replicate``): each rank multiplies its slice of
    grad_y by its rows of w, a partial sum over the output features, which the TP plan's input
    hook reduces only if ``to_local`` declares it ``Partial`` (a ``Replicate`` default would drop
    the other ranks' terms). Rowwise: each rank's K slice of grad_x is complete, as x's.
    """
    (wp,) = w.placements
    if isinstance(wp, Shard) and wp.dim == 0:
        return [Partial()]
    return list(x.placements)
