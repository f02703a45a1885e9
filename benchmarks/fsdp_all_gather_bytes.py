"""Bytes FSDP2 all-gathers per training step, with and without NVFP4 all-gather, as a table.

Measured, not estimated: one forward + backward of each Llama flavor under FSDP2 on N gloo
ranks (CPU; bf16 parameters, the recipes' mixed precision), counting the output bytes of
every all-gather collective. A step gathers each block twice (forward, and again in backward
after resharding). Bytes do not depend on batch or sequence length, so a tiny batch is used.

    python benchmarks/fsdp_all_gather_bytes.py [--flavors debug 80M 1B] [--ranks 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nvfp4
from nvfp4.fsdp import precompute_weight_scales
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.parallel import ParallelDims, build_mesh, parallelize_llama


@contextlib.contextmanager
def count_all_gather_bytes() -> Iterator[list[int]]:
    """Count the bytes every all-gather collective delivers on this rank (FSDP2 calls
    ``dist.all_gather_single`` or ``dist.all_gather_into_tensor``, by torch version)."""
    counted = [0]
    originals = {}
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if (fn := getattr(dist, name, None)) is None:
            continue

        def counting(output, *args, _fn=fn, **kwargs):
            counted[0] += output.numel() * output.element_size()
            return _fn(output, *args, **kwargs)

        originals[name] = fn
        setattr(dist, name, counting)
    try:
        yield counted
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def step_bytes(flavor: str, nvfp4_all_gather: bool, world: int) -> tuple[int, int]:
    """(bytes all-gathered on this rank in one forward + backward, QAT weight elements)."""
    args = FLAVORS[flavor]
    with torch.device("meta"):
        model = Transformer(args)
    nvfp4.prepare(model)
    parallelize_llama(
        model,
        build_mesh(ParallelDims(world, 1), "cpu"),
        "bfloat16",
        "float32",
        compile=False,
        nvfp4_all_gather=nvfp4_all_gather,
    )
    model.to_empty(device="cpu")
    model.init_weights()
    precompute_weight_scales(model)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with count_all_gather_bytes() as counted:
        model(tokens).float().mean().backward()
    qat_elements = sum(m.weight.numel() for m in nvfp4.qat_linears(model))
    return counted[0], qat_elements


def _rank_main(rank: int, world: int, store: str, flavors: list[str], queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    rows = []
    for flavor in flavors:
        off, qat = step_bytes(flavor, False, world)
        gc.collect()  # FSDP hooks hold reference cycles: free one model before the next
        on, _ = step_bytes(flavor, True, world)
        gc.collect()
        rows.append((flavor, qat, off, on))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def measure(flavors: list[str], world: int) -> list[tuple[str, int, int, int]]:
    """[(flavor, QAT weight elements, bytes off, bytes on)] measured on rank 0 of ``world``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main, args=(world, str(Path(tmp, "store")), flavors, queue), nprocs=world, start_method="spawn"
        )
    return queue.get()


def table(rows: list[tuple[str, int, int, int]], world: int) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [
        f"FSDP2 all-gather bytes per step and rank, {world} ranks, bf16 params, QAT on all block linears",
        "",
        "| flavor | QAT weights (M elements) | bf16 all-gather (MiB) | NVFP4 all-gather (MiB) | NVFP4 / bf16 |",
        "|---|---:|---:|---:|---:|",
    ]
    for flavor, qat, off, on in rows:
        lines.append(f"| {flavor} | {qat / 1e6:,.1f} | {mib(off)} | {mib(on)} | {on / off:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavors", nargs="+", default=["debug", "80M"], choices=sorted(FLAVORS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    a = p.parse_args()
    text = table(measure(a.flavors, a.ranks), a.ranks)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
