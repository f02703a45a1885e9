"""Run a function on N ranks in spawned processes (failures come back with their traceback): gloo
on the CPU, or NCCL with one GPU per rank; and helpers to join NVFP4 shards across ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nvfp4

ROWWISE = ("attention.wo", "feed_forward.w2")  # the TP plan's rowwise linears: weights split along K


def _entry(fn: Callable, rank: int, world: int, store_path: str, err_dir: str, args: tuple, backend: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    code = 0
    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kwargs)
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        Path(err_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        code = 1
    # The gloo exit crash (docs/distributed.md, "Gloo exit crash"): destroy the group and
    # leave with os._exit.
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    os._exit(code)


def run_ranks(fn: Callable, world: int, *args, timeout: float = 300, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; raise with the first failure.
    ``backend="nccl"``: rank r runs on GPU r."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, tmp, args, backend)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = sorted(Path(tmp).glob("rank*.txt"))
        if errors:
            raise AssertionError(f"{errors[0].stem} failed:\n{errors[0].read_text()}")
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"exit codes {codes}"


def cat_nvfp4(parts: list[nvfp4.NVFP4], dim: int) -> nvfp4.NVFP4:
    return nvfp4.NVFP4(
        torch.cat([p.packed for p in parts], dim), torch.cat([p.block_scale for p in parts], dim), parts[0].tensor_scale
    )


def gather_nvfp4(q: nvfp4.NVFP4, group) -> list[nvfp4.NVFP4]:
    """all_gather_object of an NVFP4, sent through the CPU (float8 storages do not pickle: send the
    bytes); the parts come back on ``q``'s device."""
    parts = [None] * dist.get_world_size(group)
    mine = (q.packed.cpu(), q.block_scale.view(torch.uint8).cpu(), q.tensor_scale.cpu())
    dist.all_gather_object(parts, mine, group=group)
    dev = q.packed.device
    return [nvfp4.NVFP4(p.to(dev), s.view(torch.float8_e4m3fn).to(dev), t.to(dev)) for p, s, t in parts]


# GPU variants of the distributed tests: NCCL, one GPU per rank, run by `.ci/gpu multi`.
MULTI_GPU = [
    pytest.mark.multigpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs: run by .ci/gpu multi"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=MULTI_GPU)]


def backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def skip_unless_ranks(device_type: str, world: int) -> None:
    """Skip a GPU case that needs more GPUs than this machine has (CPU ranks are processes)."""
    if device_type == "cuda" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
