"""torchtitan modules that run this project's NVFP4 QAT: ``QATLinear`` (``NVFP4QATLinear`` under
torchtitan's ``Module`` protocol) and ``QATFeedForward`` (SwiGLU whose gate and up linears share one
weight amax, as engines fuse them).

Checked against torchtitan 0.3.0: ``models/common/linear.py`` (``Linear``),
``models/common/feed_forward.py`` (``FeedForward``), ``protocols/module.py`` (``Module.parallelize``,
``init_states``, every buffer needs a ``state_shardings`` entry) and
``components/quantization/nvfp4.py`` (the same leaf swap for torchtitan's own NVFP4 training).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import spmd_types as spmd
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.models.common.decoder_sharding import dense_param_placement
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module

import nvfp4
from nvfp4.fsdp import gathers_nvfp4
from nvfp4.sharded import local
from nvfp4_titan.models.llama3.model import shared_input


class QATLinear(nvfp4.NVFP4QATLinear, Module):
    """``nvfp4.NVFP4QATLinear`` built from a torchtitan ``Linear.Config``: the same forward, weight
    [out_features, in_features] fake-quantized along in_features with the global amax of its
    (possibly TP-sharded) weight, and its input with the input's global amax.

    ``input_amax`` (fp32 scalar, checkpointed) stays a plain tensor on every rank: it is registered
    empty so ``Module.parallelize`` does not make it a DTensor, and materialized by ``init_states``.

    Raises ``ValueError`` from ``parallelize`` under tensor parallelism unless the SPMD backend is
    ``partial_dtensor``: the other backends hand the linear its plain local weight shard, whose own
    amax would give each rank a different tensor scale. Context parallelism is refused for the same
    reason (the input's amax would be one sequence shard's).
    """

    uncalibrated_fix = (
        "train with `-m nvfp4_titan.torchtitan_qat.launch` (torchtitan's trainer plus the calibration of "
        "static scales before the first step) or set activation_scale = 'dynamic'"
    )

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        qat: nvfp4.QATConfig = field(default_factory=nvfp4.QATConfig)
        calibration_batches: int = 4
        """Static activation scales: batches the launcher calibrates on (``NVFP4QATConverter.Config``)."""
        fsdp_nvfp4_all_gather: bool = False
        """FSDP2 gathers the weight as NVFP4, wrapped by the launcher (``NVFP4QATConverter.Config``)."""

        def build(self, **kwargs) -> QATLinear:
            instance = Module.Config.build(self, **kwargs)  # slots=True: no zero-argument super()
            sc = instance._sharding_config
            if sc is not None:  # every buffer needs a layout; the amax is the same on every rank
                layouts = {**sc.state_shardings, "input_amax": dense_param_placement(tp=spmd.R)}
                instance._sharding_config = replace(sc, state_shardings=layouts)
            return instance

    def __init__(self, config: Config) -> None:
        super().__init__(config.in_features, config.out_features, bias=config.bias, config=config.qat)
        self.register_buffer("input_amax", None)  # see the class docstring; _init_self_buffers fills it
        self.calibration_batches = config.calibration_batches
        self.fsdp_nvfp4_all_gather = config.fsdp_nvfp4_all_gather

    def parallelize(self, parallel_dims) -> None:
        if parallel_dims.tp_enabled and parallel_dims.spmd_backend != "partial_dtensor":
            raise ValueError(
                f"NVFP4 QAT under tensor parallelism needs parallelism.spmd_backend = 'partial_dtensor' (got "
                f"{parallel_dims.spmd_backend!r}): that backend keeps the weight shards as DTensors, whose global "
                f"amax gives every rank the unsharded tensor scale; the others would give each rank its shard's"
            )
        if parallel_dims.cp_enabled:
            raise NotImplementedError(
                "NVFP4 QAT with context parallelism: each rank would take its sequence shard's input amax, "
                "not the sequence's; set parallelism.context_parallel_degree = 1"
            )
        super().parallelize(parallel_dims)

    def _init_self_buffers(self, *, buffer_device: torch.device | None = None) -> None:
        # sharded (FSDP always wraps torchtitan's trainer's model) but not wrapped: the launcher did not set it
        # up; an unsharded model (a seed checkpoint's) all-gathers nothing
        if self.fsdp_nvfp4_all_gather and isinstance(self.weight, DTensor) and not gathers_nvfp4(self.weight):
            raise RuntimeError(
                "fsdp_nvfp4_all_gather = True, but FSDP was not set up to gather this weight as NVFP4: the launcher "
                "`-m nvfp4_titan.torchtitan_qat.launch` sets it up for torchtitan's Llama (models.llama3); under "
                "torchtitan's own torchtitan.train or for another model set fsdp_nvfp4_all_gather = False"
            )
        device = buffer_device if buffer_device is not None else local(self.weight).device
        self.input_amax = torch.empty((), dtype=torch.float32, device=device)
        self.reset_calibration()


class QATFeedForward(FeedForward):
    """torchtitan's SwiGLU ``w2(silu(w1 x) * w3 x)`` whose ``w1`` (gate) and ``w3`` (up) QAT linears
    share one weight amax (``QATConfig.share_fused_amax``), as engines fuse them into one GEMM with
    one tensor scale; the input is quantized once for both where ``forward_shared`` allows it."""

    @dataclass(kw_only=True, slots=True)
    class Config(FeedForward.Config):
        pass

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        w1, w3 = self.w1, self.w3
        if isinstance(w1, QATLinear) and isinstance(w3, QATLinear) and w1.config.share_fused_amax:
            w1.amax_peers, w3.amax_peers = (w3,), (w1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input((self.w1, self.w3), x)
        return self.w2(F.silu(gate) * up)
