"""NVFP4 QAT for any torchtitan Llama config, through torchtitan's override mechanism
(``torchtitan/config/override.py``): no config module of one's own needed.

    torchrun ... -m nvfp4_titan.torchtitan_qat.launch --module torchtitan.models.llama3.config_registry \\
        --config llama3_debugmodel --parallelism.spmd_backend partial_dtensor \\
        --override.imports nvfp4_titan.torchtitan_qat.overrides.nvfp4_qat

``nvfp4_qat`` replaces every transformer block's feed-forward and linears: the block's ``Linear``
configs become ``QATLinear`` configs and its ``FeedForward`` a ``QATFeedForward`` (gate and up share
one amax), exactly as ``NVFP4QATConverter`` does with its defaults (the output head stays in high
precision). Keyword arguments (``'...nvfp4_qat={"tensor_scale": "amax"}'``) set
``activation_scale``, ``tensor_scale``, ``calibration_batches`` and ``fsdp_nvfp4_all_gather``. One
override on the block: torchtitan applies a claim to the node's parent as collected, so separate
claims on a feed-forward and on its linears would leave the replaced feed-forward holding the old
linears.
"""

from __future__ import annotations

from torchtitan.config.override import derive, override
from torchtitan.models.common.decoder import TransformerBlock

from nvfp4_titan.torchtitan_qat.converter import NVFP4QATConverter

SETTINGS = ("activation_scale", "tensor_scale", "calibration_batches", "fsdp_nvfp4_all_gather")
"""The ``NVFP4QATConverter.Config`` fields ``nvfp4_qat`` takes (the others hold their defaults)."""


@override(
    target=TransformerBlock.Config,
    fqns=["*layers.*"],  # from the trainer config: "model_spec.model.layers.0"
    description="NVFP4 QAT linears with global-amax tensor scales (nvfp4-titan)",
)
def nvfp4_qat(cfg: TransformerBlock.Config, **qat) -> TransformerBlock.Config:
    """The block ``cfg`` with its linears NVFP4 QAT ones (``qat``: ``SETTINGS``). Raises ``ValueError``
    for other keys or values ``NVFP4QATConverter`` refuses."""
    if unknown := set(qat) - set(SETTINGS):
        raise ValueError(f"nvfp4_qat: unknown settings {sorted(unknown)}; give {', '.join(SETTINGS)}")
    block = derive(cfg, type(cfg))
    return NVFP4QATConverter(NVFP4QATConverter.Config(**qat)).convert(block)
