"""Model-level QAT: ``prepare`` (swap linears), ``calibrate`` (static scales), ``set_enabled``,
``convert`` (to ``NVFP4Linear``, the deployed layer)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nvfp4.format import (
    BLOCK_SIZE,
    tensor_scale,
)
from nvfp4.fsdp_tensors import NVFP4GatheredWeight, NVFP4TrainingWeight
from nvfp4.inference import NVFP4Linear
from nvfp4.qat.config import QATConfig
from nvfp4.qat.linear import NVFP4QATLinear
from nvfp4.sharded import (
    local,
)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def selected_linears(model: nn.Module, config: QATConfig) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model`` that ``config`` quantizes (what
    ``prepare`` swaps); works on the meta device."""
    return [name for name, mod in model.named_modules() if type(mod) is nn.Linear and config.selects(name)]


def unquantizable_linears(model: nn.Module, config: QATConfig) -> dict[str, int]:
    """The linears ``config`` selects whose ``in_features`` is not a multiple of 16, by name, with
    their ``in_features``: NVFP4's blocks of 16 run along it, so ``prepare`` refuses them and
    ``config`` must exclude them (``QATConfig.excluding``). Works on the meta device."""
    sizes = {name: model.get_submodule(name).in_features for name in selected_linears(model, config)}
    return {name: k for name, k in sizes.items() if k % BLOCK_SIZE}


def prepare(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """Swap the selected ``nn.Linear``s of ``model`` for ``NVFP4QATLinear``s, in place.

    A model may define ``fused_linear_groups() -> list[list[str]]`` naming linears that
    engines fuse; with ``share_fused_amax`` their weights share one amax. Raises ``ValueError``
    naming the first selected linear whose ``in_features`` is not a multiple of 16, before any swap.
    """
    config = config or QATConfig()
    if bad := unquantizable_linears(model, config):
        name, k = next(iter(bad.items()))
        raise ValueError(
            f"{name}: in_features={k} is not a multiple of {BLOCK_SIZE}; NVFP4 blocks run along it. "
            f"Exclude the layer with QATConfig.exclude"
        )
    swapped: dict[str, NVFP4QATLinear] = {}
    for name in selected_linears(model, config):
        swapped[name] = NVFP4QATLinear.from_linear(model.get_submodule(name), config)
        _swap(model, name, swapped[name])
    groups = getattr(model, "fused_linear_groups", lambda: [])()
    if config.share_fused_amax:
        for group in groups:
            members = [swapped[n] for n in group if n in swapped]
            for m in members:
                m.amax_peers = tuple(p for p in members if p is not m)
    return model


def qat_linears(model: nn.Module) -> list[NVFP4QATLinear]:
    return [m for m in model.modules() if isinstance(m, NVFP4QATLinear)]


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every QAT linear (parameters are unchanged)."""
    for m in qat_linears(model):
        if not enabled and isinstance(local(m.weight), (NVFP4TrainingWeight, NVFP4GatheredWeight)):
            raise ValueError("QAT cannot be switched off while weights are all-gathered as NVFP4")
        m.enabled = enabled


def static_linears(model: nn.Module) -> dict[str, NVFP4QATLinear]:
    """The QAT linears of ``model`` with static activation scales, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, NVFP4QATLinear) and m.config.activation_scale == "static"
    }


def needs_calibration(model: nn.Module) -> bool:
    """True if a static-mode QAT linear has no calibrated input amax yet (one host sync)."""
    static = [m.input_amax for m in static_linears(model).values()]
    return bool(static) and bool((torch.stack([local(a) for a in static]) < 0).any())


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], group: dist.ProcessGroup | None = None) -> int:
    """Set the static input amax of every QAT linear to the max over ``batches``.

    Each batch is passed as ``model(batch)``, or ``model(*batch)`` when it is a tuple (e.g.
    tokens and their packed examples' segments). Under torch.distributed the amax is also
    the max over all ranks of ``group`` (default: the world). Returns the batch count.

    Raises ``ValueError`` when ``batches`` is empty, or naming the first linear whose amax is not
    finite (an input held NaN or Inf, on any rank: every rank raises); the input amaxes then keep
    the values they held before the call, as when a batch's forward raises.
    """
    layers = list(static_linears(model).values())
    before = [m.input_amax.clone() for m in layers]
    for m in layers:
        m.input_amax.zero_()
        m.calibrating = True
    n = 0
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(batch)
            n += 1
        if n == 0:
            raise ValueError("calibrate got no batches")
        if layers and dist.is_available() and dist.is_initialized():
            amaxes = torch.stack([m.input_amax for m in layers])
            # NaN as +Inf: a max need not keep a NaN, and every rank must see any rank's fault
            amaxes = torch.where(torch.isnan(amaxes), math.inf, amaxes)
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
            for m, a in zip(layers, amaxes):
                m.input_amax.copy_(a)
        mark_calibrated(model)
    except BaseException:
        for m, a in zip(layers, before):
            m.input_amax.copy_(a)
        raise
    finally:
        for m in layers:
            m.calibrating = False
    return n


def mark_calibrated(model: nn.Module) -> None:
    """Check that every static-mode QAT linear of ``model`` holds a calibrated input amax (one host
    sync) and mark it so: its forward then has no host check, as ``torch.compile(fullgraph=True)``
    needs after loading a calibrated checkpoint. Fused-group peers are compared now, not in the first
    (compiled) forward.

    Raises ``RuntimeError`` naming the first uncalibrated linear (input amax -1), ``ValueError``
    naming the first whose input amax is NaN or Inf (its input scale would make every output NaN).
    """
    layers = static_linears(model)
    if not layers:
        return
    amaxes = torch.stack([local(m.input_amax) for m in layers.values()]).tolist()
    for name, a in zip(layers, amaxes):
        if a < 0:
            raise RuntimeError(f"{name}: static activation scale is not calibrated; run nvfp4.calibrate")
        _check_finite_input_amax(name, a)
    for m in layers.values():
        m._calibrated = True
        m._same_input_amax = None
        m._peers_share_input_amax()


def _check_finite_input_amax(name: str, amax: float) -> None:
    if not math.isfinite(amax):
        raise ValueError(
            f"{name}: input amax {amax} is not finite: a calibration input held NaN or Inf (its static "
            "activation scale would make every output NaN)"
        )


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Swap every ``NVFP4QATLinear`` for an ``NVFP4Linear`` holding its quantized weight.

    Raises ``RuntimeError`` naming a static-mode linear never calibrated, ``ValueError`` naming one
    whose input amax is NaN or Inf; the model is unchanged then."""
    qat = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4QATLinear)}
    # Quantize all before swapping anything: fused peers must still see each other's weights.
    converted = {}
    for name, m in qat.items():
        static = m.config.activation_scale == "static"
        if static and float(m.input_amax) < 0:
            raise RuntimeError(f"{name}: static activation scale is not calibrated; run calibrate")
        if static:
            _check_finite_input_amax(name, float(m.input_amax))
        converted[name] = NVFP4Linear(
            m.quantized_weight(),
            bias=None if m.bias is None else m.bias.detach().clone(),
            input_scale=tensor_scale(m.input_amax, m.config.tensor_scale) if static else None,
            tensor_scale_mode=m.config.tensor_scale,
            weight_only=m.config.activation_scale == "none",
        )
    for name, new in converted.items():
        _swap(model, name, new)
    return model
