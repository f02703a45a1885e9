"""``NVFP4Linear``: the layer of a converted (deployed) model, holding an NVFP4 weight as ModelOpt
checkpoints name it; its forward runs the emulated GEMM of ``nvfp4.gemm``."""

from __future__ import annotations

import torch
from torch import nn

from nvfp4.format import (
    NVFP4,
    TensorScaleMode,
    dequantize,
    quantize,
    quantize_with_scale,
)
from nvfp4.gemm import nvfp4_matmul


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
            xq = quantize(x, tensor_scale_mode=self.tensor_scale_mode)
        else:
            xq = quantize_with_scale(x, self.input_scale)
        return nvfp4_matmul(xq, self.quantized_weight(), self.bias, x.dtype, self.tensor_scale_mode)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation_scale={self.activation_scale}"
        )
