"""Run train.py in a subprocess from the repository root; read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--training.seq_len=64",
    "--training.local_batch_size=4",
    "--validation.freq=0",
    "--metrics.enable_tensorboard=false",
    "--lr_scheduler.warmup_steps=1",
]


def train(
    dump: Path, *overrides: str, recipe: str = "recipes/debug_cpu.toml", timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "--recipe", recipe, f"--job.dump_folder={dump}", *overrides]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def metrics(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def losses(dump: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(dump) if "loss" in m}


def model_weights(step: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a DCP step folder, named as in the model's state dict, without the
    optimizer state: a whole-checkpoint copy (``dcp_to_torch_save``) of a 135M-parameter run put
    1.7 GB on the test disk."""
    reader = dcp.FileSystemReader(str(step))
    meta = reader.read_metadata().state_dict_metadata
    sd = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return {k.removeprefix("model."): v for k, v in sd.items()}
