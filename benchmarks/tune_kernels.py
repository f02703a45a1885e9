"""Tile sweep of the Triton NVFP4 kernels on this GPU: GB/s per (16-element blocks per program,
warps), checked bit-identical to the current tile's output. Prints a table, best first.

    python benchmarks/tune_kernels.py [--mib 256]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from benchmarks.utils import require_cuda, timed  # noqa: E402
from nvfp4 import kernels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=64, help="bf16 input size")
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="R values")
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--amax-blocks", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--amax-per-sm", type=int, nargs="+", default=[2, 4, 8, 16])
    a = p.parse_args()
    require_cuda("tune_kernels.py")
    x = torch.randn(a.mib * 2**19 // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    s = nvfp4.tensor_scale(nvfp4.amax(x))
    y = torch.empty_like(x)
    copy_gbs = 4 * x.numel() / timed(lambda: y.copy_(x), gpu_only=True) / 1e6
    want_q = kernels.quantize([x], [s], with_operand=True)[0]
    want_d = kernels.dequantize([(want_q[0], want_q[1], None)], torch.bfloat16)[0]
    default = dict(kernels.TILE)
    q_bytes, qo_bytes, d_bytes = x.numel() * (2.5 + 1 / 16), x.numel() * (4.5 + 1 / 16), x.numel() * (2.5 + 1 / 16)
    rows = []
    print(
        f"{torch.cuda.get_device_name()}, {a.mib} MiB bf16, copy {copy_gbs:.0f} GB/s, current tile {default}",
        flush=True,
    )
    for r, w in itertools.product(a.blocks, a.warps):
        kernels.TILE.update(R=r, num_warps=w)
        q = kernels.quantize([x], [s], with_operand=True)[0]
        same = all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(q, want_q))
        same &= torch.equal(kernels.dequantize([(q[0], q[1], None)], torch.bfloat16)[0], want_d)
        t_q = timed(lambda: kernels.quantize([x], [s]), gpu_only=True)
        t_qo = timed(lambda: kernels.quantize([x], [s], with_operand=True)[0], gpu_only=True)
        t_d = timed(lambda: kernels.dequantize([(q[0], q[1], None)], torch.bfloat16)[0], gpu_only=True)
        rows.append((q_bytes / t_q / 1e6, qo_bytes / t_qo / 1e6, d_bytes / t_d / 1e6, r, w, same))
        print(f"  measured R={r} warps={w}", flush=True)
    kernels.TILE.update(default)
    print("| R | warps | quantize GB/s (x copy) | quantize+operand GB/s | dequantize GB/s | bitwise |")
    print("|---:|---:|---:|---:|---:|---|")
    for q, qo, d, r, w, same in sorted(rows, reverse=True):
        print(f"| {r} | {w} | {q:.0f} ({q / copy_gbs:.2f}) | {qo:.0f} | {d:.0f} | {'yes' if same else 'NO'} |")
    tune_amax(x, copy_gbs, a.amax_blocks, a.amax_per_sm)


def tune_amax(x: torch.Tensor, copy_gbs: float, blocks: list[int], per_sm: list[int]) -> None:
    """amax: GB/s read per (elements per iteration, programs per SM, warps), best first."""
    default, want, rows = dict(kernels.AMAX_TILE), nvfp4.amax(x), []
    for block, sm, w in itertools.product(blocks, per_sm, (4, 8, 16)):
        kernels.AMAX_TILE.update(BLOCK=block, per_sm=sm, num_warps=w)
        same = torch.equal(nvfp4.amax(x), want)
        gbs = 2 * x.numel() / timed(lambda: nvfp4.amax(x), gpu_only=True) / 1e6
        rows.append((gbs, block, sm, w, same))
    kernels.AMAX_TILE.update(default)
    print(f"\namax, current {default}\n| BLOCK | programs per SM | warps | amax GB/s (x copy) | bitwise |")
    print("|---:|---:|---:|---:|---|")
    for gbs, block, sm, w, same in sorted(rows, reverse=True)[:12]:
        print(f"| {block} | {sm} | {w} | {gbs:.0f} ({gbs / copy_gbs:.2f}) | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
