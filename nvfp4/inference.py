"""The emulated FP4 GEMM and ``NVFP4Linear``, the layer of a converted (deployed) model.

No GPU here has FP4 tensor cores, so the GEMM is emulated exactly as they compute it:
operands are ``code * block_scale`` (exact in bf16: at most 6 significant bits), products
are accumulated in fp32, and the two tensor scales are applied to the fp32 accumulator.
QAT calls the very same function, so prepared and converted models agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from nvfp4.format import (
    NVFP4,
    TensorScaleMode,
    dequantize,
    dequantize_all,
    dequantize_unscaled,
    operand_dtype,
    quantize,
    quantize_with_scale,
)


def _mm_fp32_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, K] @ [K, N] with fp32 accumulation and output; a and b hold bf16-exact values."""
    if a.is_cuda:
        # bf16 tensor-core GEMM with an fp32 result: no rounding of the exact operands.
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def prescales_weight(x: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None, pow2_scales: bool) -> bool:
    """Whether the GEMM of input x takes the tensor scales inside its weight operand: on CUDA,
    with power-of-two tensor scales, a bf16 result and no bias. Multiplying the operand by a
    power of two is exact and commutes with the fp32 accumulation and the rounding to bf16
    (in the normal range), so the GEMM writes the scaled bf16 result directly: the same bits as
    rounding the scaled fp32 accumulator, without its fp32 passes or a pass over the output."""
    return pow2_scales and x.is_cuda and out_dtype == torch.bfloat16 and bias is None


def weight_operands(wqs: list[NVFP4], scale: torch.Tensor, prescaled: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """The GEMM's weight operands: ``code * block_scale``, times ``scale`` (the product of the
    two tensor scales, fp32) when ``prescaled``."""
    if prescaled:
        return dequantize_all([NVFP4(q.packed, q.block_scale, scale) for q in wqs], dtype)
    return dequantize_all(wqs, dtype, scaled=False)


def scaled_matmul(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
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
    xq: NVFP4, wq: NVFP4, bias: torch.Tensor | None, out_dtype: torch.dtype, pow2_scales: bool = False
) -> torch.Tensor:
    """y = x @ w.T + bias from NVFP4 operands: x [..., K], w [N, K] -> y [..., N]."""
    dt = operand_dtype(xq.packed.device)
    scale = xq.tensor_scale * wq.tensor_scale
    prescaled = prescales_weight(xq.packed, out_dtype, bias, pow2_scales)
    a, (b,) = dequantize_unscaled(xq, dt), weight_operands([wq], scale, prescaled, dt)
    return scaled_matmul(a, b, None if prescaled else scale, bias, out_dtype)


class NVFP4Linear(nn.Module):
    """A linear layer holding an NVFP4 weight, named as in ModelOpt NVFP4 checkpoints.

    Buffers: ``weight`` uint8 [N, K/2] (packed codes), ``weight_scale`` float8_e4m3fn
    [N, K/16], ``weight_scale_2`` fp32 (the per-tensor scale, multiplied), ``input_scale``
    fp32 (static activation scale; absent in dynamic mode), ``bias`` (optional).
    ``weight_only``: inputs stay in high precision (W4A16): y = F.linear(x, dq(W), bias).
    """

    def __init__(
        self,
        weight: NVFP4,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        tensor_scale_mode: TensorScaleMode = "pow2",
        weight_only: bool = False,
    ) -> None:
        super().__init__()
        if weight_only and input_scale is not None:
            raise ValueError("a weight-only NVFP4Linear takes no input_scale")
        self.weight_only = weight_only
        self.out_features, half_k = weight.packed.shape
        self.in_features = 2 * half_k
        self.tensor_scale_mode = tensor_scale_mode
        self.register_buffer("weight", weight.packed)
        self.register_buffer("weight_scale", weight.block_scale)
        self.register_buffer("weight_scale_2", weight.tensor_scale)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("bias", bias)

    @property
    def activation_scale(self) -> str:
        if self.weight_only:
            return "none"
        return "dynamic" if self.input_scale is None else "static"

    def quantized_weight(self) -> NVFP4:
        return NVFP4(self.weight, self.weight_scale, self.weight_scale_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only:
            return nn.functional.linear(x, dequantize(self.quantized_weight(), x.dtype), self.bias)
        if self.input_scale is None:
            xq = quantize(x, mode=self.tensor_scale_mode)
        else:
            xq = quantize_with_scale(x, self.input_scale)
        pow2 = self.tensor_scale_mode == "pow2"
        return nvfp4_matmul(xq, self.quantized_weight(), self.bias, x.dtype, pow2)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation_scale={self.activation_scale}"
        )
