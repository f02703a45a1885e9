"""``NVFP4QATConverter``: a torchtitan model converter that makes a Llama model train with this
project's NVFP4 QAT (the numerics of ``nvfp4``, global-amax tensor scales under FSDP2 and TP).

It rewrites the model *config* before the model is built (torchtitan 0.3.0
``protocols/model.py``, ``ModelConfigConverter``), as torchtitan's float8/MX/NVFP4 converters do
(``components/quantization/``): every selected ``Linear.Config`` becomes a ``QATLinear.Config`` and
every ``FeedForward.Config`` a ``QATFeedForward.Config``. Built from the config, the QAT modules are
initialized by ``init_weights`` and sharded by ``parallelize`` like the stock ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torchtitan.components.quantization import QuantizationConverter
from torchtitan.models.common.attention import FusedQKVLinear, QKVLinear
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.linear import Linear

import nvfp4
from nvfp4_titan.torchtitan_qat.modules import QATFeedForward, QATLinear


class NVFP4QATConverter(QuantizationConverter):
    """Swap torchtitan Llama linears for NVFP4 QAT linears (``QATLinear``).

    Module names are torchtitan's (``layers.0.attention.qkv_linear.wqkv``, ``layers.0.feed_forward.w1``,
    ``lm_head``); ``include`` / ``exclude`` are fnmatch patterns over them, as ``QATConfig``'s.
    torchtitan's fused ``wqkv`` quantizes q, k and v with one amax by construction; ``w1`` and ``w3``
    share theirs through ``QATFeedForward`` (``share_fused_amax``).

    Raises ``ValueError`` for what would train with numerics the deployed model does not have: a
    selected linear whose in_features is not a multiple of 16, ``share_fused_amax = False`` with a
    fused ``wqkv``, a ``calibration_batches`` below 1, a ``fsdp_nvfp4_all_gather`` that is not a bool
    and a converter that selects no linear. Static
    activation scales and the NVFP4 all-gather are set up by ``nvfp4_titan.torchtitan_qat.launch``
    (torchtitan's own ``torchtitan.train`` has neither; a model that needs them raises ``RuntimeError``
    at its first forward or weight initialization).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        include: list[str] = field(default_factory=lambda: ["*"])
        """fnmatch patterns of torchtitan module names to quantize."""
        exclude: list[str] = field(default_factory=lambda: ["lm_head", "*.lm_head"])
        """Patterns kept in high precision (default: the output head, as this project's recipes)."""
        activation_scale: str = "dynamic"
        """dynamic (per-input amax), static (calibrated on the run's first ``calibration_batches`` batches by
        the launcher, then frozen) or none (weight-only, W4A16); see ``nvfp4.QATConfig``."""
        tensor_scale: str = "pow2"
        """pow2 (power-of-two tensor scales, decoded identically by every engine) or amax (its
        checkpoints export in float only: no engine decodes them as trained)."""
        share_fused_amax: bool = True
        """One weight amax for the linears engines fuse (q/k/v, gate/up)."""
        calibration_batches: int = 4
        """Static activation scales: the training batches (per rank, before the first step) whose input
        amax, the max over all ranks, becomes every QAT linear's frozen input amax."""
        fsdp_nvfp4_all_gather: bool = False
        """FSDP2 all-gathers the QAT weights as NVFP4 (packed codes and block scales, 4.5 bits per element,
        quantized per shard with the whole weight's tensor scale: the same numerics), set up by the launcher;
        eager mode only, without torchtitan's CUDA graph of each step or CPU offload, ``partial_dtensor``
        backend, no pipeline parallelism (``nvfp4.fsdp``; the launcher refuses the rest)."""

        def qat_config(self) -> nvfp4.QATConfig:
            """The ``nvfp4.QATConfig`` these fields describe (raises ``ValueError`` for bad values)."""
            return nvfp4.QATConfig(
                include=tuple(self.include),
                exclude=tuple(self.exclude),
                activation_scale=self.activation_scale,
                tensor_scale=self.tensor_scale,
                share_fused_amax=self.share_fused_amax,
            )

    def __init__(self, config: Config) -> None:
        self.config = config
        self.qat = config.qat_config()
        n = config.calibration_batches
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"calibration_batches = {n!r}: give a whole number of batches, at least 1")
        if not isinstance(config.fsdp_nvfp4_all_gather, bool):
            raise ValueError(f"fsdp_nvfp4_all_gather = {config.fsdp_nvfp4_all_gather!r}: give true or false")

    def convert(self, model_config):
        """Rewrite ``model_config`` (a torchtitan ``Decoder.Config``) in place and return it."""
        qat = self.qat
        for fqn, *_ in model_config.traverse(QKVLinear.Config):
            if qat.share_fused_amax and any(qat.selects(f"{fqn}.{n}") for n in ("wq", "wk", "wv")):
                raise ValueError(
                    f"{fqn}: separate wq / wk / wv linears cannot share one weight amax here; build the model with "
                    f"fuse_qkv=True (torchtitan's default) or set share_fused_amax = false"
                )
        if not qat.share_fused_amax:
            for fqn, *_ in model_config.traverse(FusedQKVLinear.Config):
                if qat.selects(f"{fqn}.wqkv"):
                    raise ValueError(
                        f"{fqn}.wqkv fuses q, k and v into one linear with one weight amax; share_fused_amax = "
                        f"false cannot be honoured"
                    )
        swapped = 0
        for fqn, cfg, parent, attr in list(model_config.traverse(Linear.Config)):
            if not qat.selects(fqn):
                continue
            if cfg.in_features % nvfp4.BLOCK_SIZE:
                raise ValueError(
                    f"{fqn}: in_features={cfg.in_features} is not a multiple of {nvfp4.BLOCK_SIZE}, along which "
                    f"NVFP4 blocks run; exclude it"
                )
            new = QATLinear.Config(
                **{f.name: getattr(cfg, f.name) for f in fields(Linear.Config)},
                qat=qat,
                calibration_batches=self.config.calibration_batches,
                fsdp_nvfp4_all_gather=self.config.fsdp_nvfp4_all_gather,
            )
            _replace(parent, attr, new)
            swapped += 1
        if swapped == 0:
            raise ValueError(f"include={list(qat.include)} / exclude={list(qat.exclude)} select no linear")
        for _, cfg, parent, attr in list(model_config.traverse(FeedForward.Config)):
            if type(cfg) is FeedForward.Config:
                new = QATFeedForward.Config(**{f.name: getattr(cfg, f.name) for f in fields(FeedForward.Config)})
                _replace(parent, attr, new)
        return model_config


def _replace(parent, attr, new) -> None:
    if isinstance(parent, list):
        parent[attr] = new
    else:
        setattr(parent, attr, new)
