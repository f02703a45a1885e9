"""Quantization error of the pow2 (default) vs amax per-tensor scale, as a table.

The pow2 scale gives up at most one binade of E4M3 block-scale headroom so that every
engine decodes identical bits (docs/numerics.md, "Tensor scale: pow2 vs amax"). This
measures what that costs on weight- and activation-like tensors: SQNR (dB, higher is better)
of fake_quantize, and the share of blocks whose E4M3 scale clamps at its minimum (2**-6,
precision lost in tiny blocks).

No real checkpoint is downloaded here: the tensors are synthetic with the statistics of
trained Llama weights (row-wise scale spread, heavy tails) and activations (channel outliers).
    python benchmarks/bench_tensor_scale.py [--rows 2048 --cols 2048 --seed 0]
"""

from __future__ import annotations

import argparse

import torch

import nvfp4


def tensors(rows: int, cols: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    randn = lambda: torch.randn(rows, cols, generator=g)  # noqa: E731
    row_scale = torch.exp(0.5 * torch.randn(rows, 1, generator=g))
    t3 = torch.distributions.StudentT(3.0).sample((rows, cols))
    act = randn()
    act[:, torch.randperm(cols, generator=g)[:8]] *= 60.0  # a few outlier channels
    return {
        "gaussian init (std 0.02)": randn() * 0.02,
        "row-scaled gaussian": randn() * row_scale * 0.02,
        "student-t df=3 (heavy tail)": t3 * 0.02,
        # An outlier column: identical in every row, or of random size per row.
        "weights + outlier col (=2.0)": torch.cat([randn()[:, :-1] * 0.02, torch.full((rows, 1), 2.0)], 1),
        "weights + outlier col (1-3)": torch.cat([randn()[:, :-1] * 0.02, 1 + 2 * torch.rand(rows, 1, generator=g)], 1),
        "activations, outlier channels": act,
    }


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return (10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())).item()


def min_clamped_share(x: torch.Tensor, mode: str) -> float:
    return (nvfp4.quantize(x, tensor_scale_mode=mode).block_scale.float() == nvfp4.E4M3_MIN_SCALE).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    print(f"NVFP4 fake-quantize error, {args.rows}x{args.cols} fp32 tensors, seed {args.seed}")
    print("| tensor | SQNR amax (dB) | SQNR pow2 (dB) | pow2 - amax (dB) | min-clamped blocks amax / pow2 |")
    print("|---|---:|---:|---:|---:|")
    for name, x in tensors(args.rows, args.cols, g).items():
        s_amax = sqnr_db(x, nvfp4.fake_quantize(x, tensor_scale_mode="amax"))
        s_pow2 = sqnr_db(x, nvfp4.fake_quantize(x, tensor_scale_mode="pow2"))
        clamp = f"{min_clamped_share(x, 'amax'):.2%} / {min_clamped_share(x, 'pow2'):.2%}"
        print(f"| {name} | {s_amax:.3f} | {s_pow2:.3f} | {s_pow2 - s_amax:+.3f} | {clamp} |")


if __name__ == "__main__":
    main()
