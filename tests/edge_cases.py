"""Edge tensors for the NVFP4 quantizer, shared by the CPU parity tests and the CUDA tests."""

from __future__ import annotations

import torch

# With a block max of 6 and tensor amax 2688 both scales are exactly 1, so these values
# reach the E2M1 rounding unscaled: every tie, and its neighbours one ulp away.
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _ties_tensor() -> torch.Tensor:
    vals = []
    for t in TIES:
        t = torch.tensor(t)
        vals += [t, torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(9.0))]
    vals = torch.stack(vals)  # 21 values
    row = torch.cat([vals, -vals, torch.tensor([6.0, -6.0, 0.0, -0.0, 0.5, 3.0])])  # 48
    x = row.reshape(3, 16).clone()
    x[:, 0] = 6.0  # every block has max exactly 6 -> block scale 1
    x = torch.cat([x, torch.full((1, 16), 2688.0)])  # tensor amax 2688 -> tensor scale 1
    return x


def edge_tensors() -> dict[str, torch.Tensor]:
    """name -> fp32 tensor [rows, K]; the K are multiples of 16."""
    g = torch.Generator().manual_seed(1234)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    zero_block = randn(4, 64)
    zero_block[1, 16:32] = 0.0
    signed_zeros = torch.zeros(2, 32)
    signed_zeros[0, 1::2] = -0.0
    signed_zeros[1] = randn(32)
    signed_zeros[1, ::3] = -0.0
    subnormal = randn(4, 32)
    subnormal[0, :16] = torch.tensor(1e-40) * torch.arange(16)  # a block of fp32 subnormals
    subnormal[1, 3] = 1e-45  # one subnormal in a normal block
    near_max = randn(2, 32) * 1e37
    near_max[0, 5] = 3.0e38
    outlier = randn(8, 64)
    outlier[3, 17] = 1.0e6
    small_blocks = randn(4, 32)
    small_blocks[2, :16] *= 1e-12  # scale clamps at the E4M3 minimum
    return {
        "ties": _ties_tensor(),
        "zero_block": zero_block,
        "all_zero": torch.zeros(3, 32),
        "signed_zeros": signed_zeros,
        "subnormal": subnormal,
        "near_fp32_max": near_max,
        "bf16_max": torch.full((1, 16), torch.finfo(torch.bfloat16).max) * torch.linspace(-1, 1, 16),
        "outlier": outlier,
        "small_blocks": small_blocks,
        "random_large": randn(64, 256) * torch.rand(64, 1, generator=g) * 10,
    }
