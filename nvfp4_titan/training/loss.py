"""The training loss: next-token cross-entropy, in fp32 whatever the logits' dtype."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: Literal["sum", "mean", "none"] = "sum"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, S, V] (any float dtype, upcast to fp32) against ``labels``
    [B, S] (int64 token ids; -100, ``nvfp4_titan.data.packing.IGNORE``, skips a position): a 0-dim
    fp32 sum or mean over the counted positions, or the [B*S] losses (``reduction="none"``, 0 at
    skipped positions). Every caller (training, validation, perplexity, benchmarks)
    uses this one definition, so their losses agree bit for bit."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction=reduction)
