"""AdamW and the learning-rate schedule (a pure function of the step: nothing to checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from nvfp4_titan.training.config import LRScheduler, Optimizer


def build_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included), none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_at(step: int, peak: float, total_steps: int, cfg: LRScheduler) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then decay."""
    if step <= cfg.warmup_steps:
        return peak * step / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.min_lr_factor
    if cfg.decay_type == "cosine":
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.decay_type == "linear":
        factor = 1 - (1 - floor) * progress
    else:
        factor = 1.0
    return peak * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm`` (inf:
    no scaling; a non-finite norm scales nothing); returns the norm before scaling (fp32 scalar,
    full over every shard).

    Each gradient's norm is accumulated in float64: the CPU's fp32 ``vector_norm`` loses up to
    8e-4 relative on a 2M-element embedding gradient (measured on torch 2.13), enough to change
    the clipped update, and by an amount that depends on how FSDP/TP split the tensor, so
    sharded runs drifted from the 1-process run. CUDA's tree reductions are accurate in fp32;
    float64 changes nothing there but costs no extra pass.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if isinstance(total, DTensor):
        total = total.full_tensor()
    total = total.float()
    # A non-finite norm scales nothing: the gradients stay as backward left them, for the trainer
    # to name the first non-finite one (that step is skipped or stops the run).
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.where(total.isfinite(), total, 0.0), foreach=True)
    return total
