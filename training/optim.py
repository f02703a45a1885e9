"""AdamW and the learning-rate schedule (a pure function of the step: nothing to checkpoint)."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import LRScheduler, Optimizer


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
