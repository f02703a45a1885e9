"""Metrics to stdout, <dump_folder>/metrics.jsonl, TensorBoard and wandb (rank 0 writes)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import nvfp4
from nvfp4.qat.linear import NVFP4QATLinear
from nvfp4.sharded import local
from nvfp4_titan.training.config import Metrics

log = logging.getLogger("nvfp4_titan")

# Dense bf16 tensor-core peak (FLOP/s) by device name, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model_args: Any, n_params: int, seq_len: int) -> float:
    """6 N (dense matmuls, forward + backward) + attention scores, as TorchTitan counts."""
    emb = model_args.vocab_size * model_args.dim
    return 6 * (n_params - emb) + 12 * model_args.n_layers * model_args.dim * seq_len


class MetricsLogger:
    def __init__(self, folder: Path, cfg: Metrics, rank: int, config_dict: dict[str, Any]) -> None:
        self.rank = rank
        self.jsonl = self.tb = self.wandb = None
        if rank != 0:
            return
        self.jsonl = (folder / "metrics.jsonl").open("a")
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tb"))
        if cfg.enable_wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                log.warning("metrics.enable_wandb is set but wandb is not installed: not logging to wandb")
            else:
                self.wandb = wandb.init(
                    project=cfg.wandb_project,
                    mode=cfg.wandb_mode,
                    dir=str(folder),
                    config=config_dict,
                    settings=wandb.Settings(silent=True),
                )

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        # stdout stays one short line; QAT health goes to the files and dashboards only.
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items() if not k.startswith("qat/"))
        log.info(f"step {step:5d}  {shown}")
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        for sink in (self.jsonl, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: float) -> str:
    if isinstance(v, int):  # counts (skipped_steps)
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) and abs(v) < 1e5 else f"{v:.4e}"


def _group(name: str) -> str:
    return "attention" if ".attention." in name else "mlp"


@torch.no_grad()
def qat_health(model: nn.Module) -> dict[str, float]:
    """Per layer group: share of E4M3 block scales that clamp (at 2**-6 or 448), relative
    error of the fake-quantized weights, and the largest recent input amax. Each rank sums
    over the shards it owns; one all-reduce makes the figures global."""
    groups = ("attention", "mlp")
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    stats = torch.zeros(len(groups), 5, dtype=torch.float64, device=device)  # clamped, blocks, err2, w2, amax
    for name, m in model.named_modules():
        if not isinstance(m, NVFP4QATLinear):
            continue
        row = stats[groups.index(_group(name))]
        q = m.quantized_weight()
        s = q.block_scale.float()
        w = local(m.weight).float()
        row[0] += ((s == nvfp4.E4M3_MIN_SCALE) | (s == nvfp4.E4M3_MAX)).sum()
        row[1] += s.numel()
        row[2] += (w - nvfp4.dequantize(q)).pow(2).sum()
        row[3] += w.pow(2).sum()
        row[4] = torch.clamp_min(row[4], m.observed_input_amax())
    if dist.is_initialized():
        sums, amax = stats[:, :4].clone(), stats[:, 4].clone()
        dist.all_reduce(sums)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        stats[:, :4], stats[:, 4] = sums, amax
    out = {}
    for g, row in zip(groups, stats):
        if row[1] > 0:
            out[f"qat/{g}/scale_clamped_share"] = (row[0] / row[1]).item()
            out[f"qat/{g}/weight_rel_err"] = (row[2] / row[3]).sqrt().item() if row[3] > 0 else 0.0
            out[f"qat/{g}/input_amax"] = row[4].item()
    return out
