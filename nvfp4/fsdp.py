"""NVFP4 all-gather for FSDP2: QAT weights travel as packed FP4 codes + E4M3 block scales.

    nvfp4.prepare(model, config)
    ... tensor parallel ...
    enable_nvfp4_all_gather(model, param_dtype)   # before fully_shard
    fully_shard(...)
    for step:
        precompute_weight_scales(model)   # all weights' amaxes in one all-reduce
        loss = model(x); loss.backward(); optimizer.step()

Each QAT weight's shard is quantized *before* the all-gather with the tensor scale of the
whole weight (amax reduced over every mesh dim that shards it, DP x TP, then over its fused
group), so the forward sees exactly the codes and scales of the unsharded QAT model, and
4.5 bits per element cross the wire instead of 16. The gradient reaches the high-precision
shard by the straight-through estimator, as without it. Eager mode only (no torch.compile).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from nvfp4.format import amax, tensor_scale
from nvfp4.fsdp_tensors import NVFP4GatheredWeight, NVFP4TrainingWeight
from nvfp4.qat.api import qat_linears
from nvfp4.qat.linear import NVFP4QATLinear
from nvfp4.sharded import reduce_amax, sharded_dims

__all__ = [
    "NVFP4GatheredWeight",
    "NVFP4TrainingWeight",
    "enable_nvfp4_all_gather",
    "gathers_nvfp4",
    "precompute_weight_scales",
    "precompute_weight_scales_when_stale",
]


def enable_nvfp4_all_gather(model: nn.Module, param_dtype: torch.dtype) -> int:
    """Wrap every QAT weight so that FSDP2 all-gathers it as NVFP4; call before ``fully_shard``.

    ``param_dtype`` is the mixed-precision dtype FSDP2 casts parameters to: the shard is cast
    to it before quantizing, as the unsharded path quantizes the cast weight. Returns the count.
    """
    uses = defaultdict(int)
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] += 1
    layers = qat_linears(model)
    for name, m in model.named_modules():
        if isinstance(m, NVFP4QATLinear):
            if uses[id(m.weight)] > 1:
                raise ValueError(f"{name}: NVFP4 all-gather of a tied weight; exclude {name} from QAT")
            if not m.enabled:
                raise ValueError(f"{name}: NVFP4 all-gather needs QAT enabled from the start (qat.start_step = 0)")
    for m in layers:
        w = m.weight
        if isinstance(w, DTensor):
            inner = NVFP4TrainingWeight(w.to_local().detach(), param_dtype, m.config.block_scale_rule)
            wrapped = DTensor.from_local(
                inner, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride()
            )
        else:
            wrapped = NVFP4TrainingWeight(w.detach(), param_dtype, m.config.block_scale_rule)
        m.weight = nn.Parameter(wrapped, requires_grad=w.requires_grad)
        m.register_state_dict_post_hook(_plain_weight_in_state_dict)
    _clear_scales_after_optimizer_steps()
    model.register_load_state_dict_post_hook(lambda module, keys: _clear_scales(module.parameters()))
    return len(layers)


def _plain_weight_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, meta: Any) -> None:
    """Checkpoints hold the plain high-precision shard (sharing its storage), not the wrapper."""
    w = state_dict.get(prefix + "weight")
    if isinstance(w, DTensor) and isinstance(w._local_tensor, NVFP4TrainingWeight):
        state_dict[prefix + "weight"] = DTensor.from_local(
            w._local_tensor._tensor, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride()
        )
    elif isinstance(w, NVFP4TrainingWeight):
        state_dict[prefix + "weight"] = w._tensor


def _clear_scales(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        if isinstance(shard := _shard(p), NVFP4TrainingWeight):
            shard.scale = None


@cache
def _clear_scales_after_optimizer_steps() -> None:
    """Once per process: any optimizer step makes the scales of the weights it updated stale."""
    register_optimizer_step_post_hook(
        lambda opt, args, kwargs: _clear_scales(p for g in opt.param_groups for p in g["params"])
    )


def _shard(p: torch.Tensor) -> torch.Tensor:
    """A parameter's local tensor object itself (``to_local()`` would return an alias)."""
    return p._local_tensor if isinstance(p, DTensor) else p


def gathers_nvfp4(p: torch.Tensor) -> bool:
    """Whether FSDP2 all-gathers parameter ``p`` as NVFP4 (``enable_nvfp4_all_gather`` wrapped it)."""
    return isinstance(_shard(p), NVFP4TrainingWeight)


@torch.no_grad()
def precompute_weight_scales(model: nn.Module) -> None:
    """Set the tensor scale of every NVFP4-all-gathered weight from its global amax.

    One all-reduce(MAX) per step for all layers (per distinct sharding, in practice one);
    then each fused group (q/k/v, gate/up) takes its members' max. Call it after each
    optimizer step and weight load, before the forward: those clear the scales, and a
    forward without them is an error.
    """
    layers = [m for m in qat_linears(model) if gathers_nvfp4(m.weight)]
    if not layers:
        return
    shards = [_shard(m.weight) for m in layers]
    by_sharding: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(layers):
        w = m.weight
        key = (w.device_mesh, tuple(sharded_dims(w))) if isinstance(w, DTensor) else None
        by_sharding[key].append(i)
    amaxes = torch.stack([amax(s._tensor) for s in shards])
    for idx in by_sharding.values():
        amaxes[idx] = reduce_amax(amaxes[idx], layers[idx[0]].weight)
    # The unsharded path takes the amax of the weight cast to param_dtype; rounding is
    # monotonic, so that is the cast of the fp32 amax. Vector ops, not per-layer ones: this
    # runs every step.
    for dtype in {s.param_dtype for s in shards}:
        idx = [i for i, s in enumerate(shards) if s.param_dtype == dtype]
        amaxes[idx] = amaxes[idx].to(dtype).float()
    index = {id(m): i for i, m in enumerate(layers)}
    groups = [[i, *(index[id(p)] for p in m.amax_peers if id(p) in index)] for i, m in enumerate(layers)]
    width = max(map(len, groups))  # pad each group with itself: the max is unchanged
    amaxes = amaxes[torch.tensor([g + g[:1] * (width - len(g)) for g in groups], device=amaxes.device)].amax(dim=1)
    kinds = {(m.config.tensor_scale, m.config.block_scale_rule) for m in layers}
    scales = {kind: tensor_scale(amaxes, *kind) for kind in kinds}
    for i, (m, s) in enumerate(zip(layers, shards)):
        s.scale = scales[m.config.tensor_scale, m.config.block_scale_rule][i]


def precompute_weight_scales_when_stale(model: nn.Module) -> RemovableHandle:
    """For a training loop that is not yours (torchtitan's): a forward pre-hook on ``model`` runs
    ``precompute_weight_scales(model)`` when any NVFP4-all-gathered weight has no tensor scale: the
    first forward, the first after each optimizer step or state-dict load (which clear them), so
    once per step whatever the gradient accumulation. Register it after ``fully_shard(model)``:
    it runs before FSDP2's own pre-forward hook, whose all-gather of root-level weights needs them.
    Every rank runs the same forwards and steps, so every rank reduces the amaxes together.
    """

    def hook(module: nn.Module, args: tuple) -> None:
        if any(gathers_nvfp4(p) and _shard(p).scale is None for p in module.parameters()):
            precompute_weight_scales(module)

    return model.register_forward_pre_hook(hook, prepend=True)
