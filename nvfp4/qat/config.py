"""``QATConfig``: what to quantize and how; one config drives prepare, convert and export."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from nvfp4.format import (
    BLOCK_SCALE_RULES,
    TENSOR_SCALE_MODES,
    BlockScaleRule,
    TensorScaleMode,
)

ActivationScale = Literal["dynamic", "static", "none"]
ACTIVATION_SCALES: tuple[str, ...] = get_args(ActivationScale)


@dataclass(frozen=True)
class QATConfig:
    """What to quantize and how. One config drives prepare, convert and export."""

    include: tuple[str, ...] = ("*",)
    """fnmatch patterns of module names (``layers.0.attention.wq``) of nn.Linears to quantize."""
    exclude: tuple[str, ...] = ("output", "lm_head", "*.output", "*.lm_head")
    """Patterns kept in high precision even if included (default: the output head)."""
    activation_scale: ActivationScale = "dynamic"
    """dynamic: input tensor scale from each input's amax. static: from an amax calibrated
    over batches (``calibrate``), frozen, and exported as ``input_scale``. none: weight-only
    (W4A16): inputs stay in high precision."""
    tensor_scale: TensorScaleMode = "pow2"
    """pow2: per-tensor scale rounded up to a power of two (decodes identically in every
    engine). amax: amax / 2688, as torchao and ModelOpt PTQ; no engine decodes its checkpoints as
    trained (``nvfp4.export.export_problems``)."""
    share_fused_amax: bool = True
    """Give the linears that engines fuse (q/k/v, gate/up) one weight amax, as engines assume."""
    block_scale_rule: BlockScaleRule = "amax"
    """How each weight block's e4m3 scale is chosen. amax: the block amax maps to 6 (engines' own
    rule). four_over_six (arXiv 2512.02010; ModelOpt's NVFP4_FOUR_OVER_SIX_CFG, TransformerEngine's
    nvfp4_4over6): per block of 16, the scale that maps the block amax to 4 where that quantizes the
    block with the smaller squared error (ties: to 6), with a weight tensor scale twice amax's for
    the headroom (docs/numerics.md). Weights only: inputs keep amax, as engines quantize them."""

    def __post_init__(self) -> None:
        if self.activation_scale not in ACTIVATION_SCALES:
            raise ValueError(f"activation_scale={self.activation_scale!r}: use one of {ACTIVATION_SCALES}")
        if self.tensor_scale not in TENSOR_SCALE_MODES:
            raise ValueError(f"tensor_scale={self.tensor_scale!r}: use one of {TENSOR_SCALE_MODES}")
        if self.block_scale_rule not in BLOCK_SCALE_RULES:
            raise ValueError(f"block_scale_rule={self.block_scale_rule!r}: use one of {BLOCK_SCALE_RULES}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def selects(self, name: str) -> bool:
        match = lambda pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
        return match(self.include) and not match(self.exclude)

    def excluding(self, names: Iterable[str]) -> tuple[str, ...]:
        """These exclude patterns and the ``layer_pattern`` of each of ``names``: the exclude list
        that keeps those linears (in every layer) in high precision."""
        return tuple(dict.fromkeys((*self.exclude, *map(layer_pattern, names))))


def layer_pattern(name: str) -> str:
    """The pattern of a linear's role in every layer: ``layers.3.attention.wk`` -> ``layers.*.attention.wk``."""
    return re.sub(r"\.\d+\.", ".*.", name)
