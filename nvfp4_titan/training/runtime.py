"""Process group, device, logging and teardown for a run (torchrun or a plain process)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nvfp4_titan.training.config import ConfigError


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "training.device=cuda but no CUDA device is visible: set training.device=cpu "
                "(or auto), or run where a GPU is"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun: env://; alone: a one-rank group on an in-memory store
    (a file store left one /tmp file per run)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return dist.get_rank(), dist.get_world_size()


class ScheduledGC:
    """Python's cyclic garbage collector on a schedule (TorchTitan's GarbageCollection): inside
    the ``with``, automatic collection is off and every ``freq``-th ``tick()`` collects
    generations 0-1; ``freq`` 0 leaves collection automatic. An automatic collection pauses the
    host at a random step (tens of ms with torch.compile's objects), stalling a host-bound step."""

    def __init__(self, freq: int) -> None:
        self.freq, self.ticks, self._was_enabled = freq, 0, True

    def __enter__(self) -> ScheduledGC:
        self._was_enabled = gc.isenabled()
        if self.freq:
            gc.collect(1)
            gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.freq and self._was_enabled:
            gc.enable()

    def tick(self) -> None:
        self.ticks += 1
        if self.freq and self.ticks % self.freq == 0:
            gc.collect(1)


def setup_logging(rank: int, log_dir: Path | None = None) -> None:
    """Rank 0 prints INFO to stdout; every rank logs to <log_dir>/rank<r>.log when given."""
    logger = logging.getLogger("nvfp4_titan")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if rank == 0:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        logger.addHandler(h)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        f = logging.FileHandler(log_dir / f"rank{rank}.log")
        f.setFormatter(fmt)
        logger.addHandler(f)
    logger.propagate = False


def teardown_and_exit(code: int) -> None:
    """Leave without the gloo exit crash (docs/distributed.md, "Gloo exit crash"): barrier, destroy,
    flush, os._exit."""
    if dist.is_initialized():
        try:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: exit with our own code anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
