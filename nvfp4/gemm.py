"""The emulated FP4 GEMM that QAT and the converted ``NVFP4Linear`` share.

No GPU here has FP4 tensor cores, so the GEMM is emulated exactly as they compute it:
operands are ``code * block_scale`` (exact in bf16: at most 6 significant bits), products
are accumulated in fp32, and the two tensor scales are applied to the fp32 accumulator.
QAT calls the very same functions, so prepared and converted models agree bit for bit.
"""

from __future__ import annotations

import torch

from nvfp4.format import (
    NVFP4,
    TensorScaleMode,
    dequantize_all,
    dequantize_unscaled,
    operand_dtype,
)


def _mm_fp32_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, K] @ [K, N] with fp32 accumulation and output; a and b hold bf16-exact values."""
    if a.is_cuda:
        # bf16 tensor-core GEMM with an fp32 result: no rounding of the exact operands.
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def prescales_weight(
    x: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None, tensor_scale_mode: str
) -> bool:
    """Whether the GEMM of input x takes the tensor scales inside its weight operand: on CUDA,
    with power-of-two tensor scales (``tensor_scale_mode`` pow2), a bf16 result and no bias.
    Multiplying the operand by a power of two is exact and commutes with the fp32 accumulation and the rounding to bf16
    (in the normal range), so the GEMM writes the scaled bf16 result directly: the same bits as
    rounding the scaled fp32 accumulator, without its fp32 passes or a pass over the output."""
    return tensor_scale_mode == "pow2" and x.is_cuda and out_dtype == torch.bfloat16 and bias is None


def weight_operands(wqs: list[NVFP4], scale: torch.Tensor, prescaled: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """The GEMM's weight operands: ``code * block_scale``, times ``scale`` (the product of the
    two tensor scales, fp32) when ``prescaled``."""
    if prescaled:
        return dequantize_all([NVFP4(q.packed, q.block_scale, scale) for q in wqs], dtype)
    return dequantize_all(wqs, dtype, scaled=False)


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = (a @ b.T) * scale + bias: a [..., K], b [N, K] hold ``code * block_scale``; ``scale``
    is the product of the two tensor scales (fp32 0-dim), None when b holds it already
    (``prescales_weight``: one bf16 GEMM)."""
    if scale is None:
        y = torch.mm(a.reshape(-1, a.shape[-1]).to(torch.bfloat16), b.to(torch.bfloat16).t())
        return y.reshape(*a.shape[:-1], b.shape[0])
    acc = _mm_fp32_acc(a.reshape(-1, a.shape[-1]), b.t())  # [M, N] fp32
    acc = acc * scale
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype).reshape(*a.shape[:-1], b.shape[0])


def nvfp4_matmul(
    xq: NVFP4, wq: NVFP4, bias: torch.Tensor | None, out_dtype: torch.dtype, tensor_scale_mode: TensorScaleMode = "amax"
) -> torch.Tensor:
    """y = x @ w.T + bias from NVFP4 operands: x [..., K], w [N, K] -> y [..., N].
    ``tensor_scale_mode``: how both tensor scales were made; pow2 lets a CUDA bf16 GEMM fold them
    into the weight operand exactly (``prescales_weight``), amax assumes nothing of them."""
    dt = operand_dtype(xq.packed.device)
    scale = xq.tensor_scale * wq.tensor_scale
    prescaled = prescales_weight(xq.packed, out_dtype, bias, tensor_scale_mode)
    a, (b,) = dequantize_unscaled(xq, dt), weight_operands([wq], scale, prescaled, dt)
    return scaled_matmul(a, b, None if prescaled else scale, bias, out_dtype)
