"""Tile sweep of the Triton NVFP4 kernels on this GPU: GB/s per (rows, blocks, warps), checked
bit-identical to the current tile's output. Prints a table, best first.

    python scripts/tune_kernels.py [--mib 256]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from nvfp4 import kernels  # noqa: E402
from scripts.bench import timed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=64, help="bf16 input size")
    p.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128], help="BM values")
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="G values (16-element blocks)")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    a = p.parse_args()
    x = torch.randn(a.mib * 2**19 // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    s = nvfp4.tensor_scale(nvfp4.abs_max(x))
    y = torch.empty_like(x)
    copy_gbs = 4 * x.numel() / timed(lambda: y.copy_(x)) / 1e6
    want_q = kernels.quantize(x, s, emit_operand=True)
    want_d = kernels.dequantize(want_q[0], want_q[1], None, torch.bfloat16)
    default = dict(kernels.TILE)
    q_bytes, qo_bytes, d_bytes = x.numel() * (2.5 + 1 / 16), x.numel() * (4.5 + 1 / 16), x.numel() * (2.5 + 1 / 16)
    rows = []
    print(f"{torch.cuda.get_device_name()}, {a.mib} MiB bf16, copy {copy_gbs:.0f} GB/s, current tile {default}", flush=True)
    for bm, g, w in itertools.product(a.rows, a.blocks, a.warps):
        if bm * g * 16 > 32768:
            continue
        kernels.TILE.update(BM=bm, G=g, num_warps=w)
        q = kernels.quantize(x, s, emit_operand=True)
        same = all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(q, want_q))
        same &= torch.equal(kernels.dequantize(q[0], q[1], None, torch.bfloat16), want_d)
        t_q = timed(lambda: kernels.quantize(x, s))
        t_qo = timed(lambda: kernels.quantize(x, s, emit_operand=True))
        t_d = timed(lambda: kernels.dequantize(q[0], q[1], None, torch.bfloat16))
        rows.append((q_bytes / t_q / 1e6, qo_bytes / t_qo / 1e6, d_bytes / t_d / 1e6, bm, g, w, same))
        print(f"  measured BM={bm} G={g} warps={w}", flush=True)
    kernels.TILE.update(default)
    print("| BM | G | warps | quantize GB/s (x copy) | quantize+operand GB/s | dequantize GB/s | bitwise |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for q, qo, d, bm, g, w, same in sorted(rows, reverse=True):
        print(f"| {bm} | {g} | {w} | {q:.0f} ({q / copy_gbs:.2f}) | {qo:.0f} | {d:.0f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
