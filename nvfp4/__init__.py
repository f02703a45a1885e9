"""NVFP4 numerics and quantization-aware training; knows nothing of meshes or models."""

from nvfp4.format import (
    BLOCK_SIZE,
    E4M3_MAX,
    E4M3_MIN_SCALE,
    FP4_MAX,
    NVFP4,
    amax,
    amax_and_scale,
    amaxes_and_scales,
    dequantize,
    dequantize_unscaled,
    fake_quantize,
    quantize,
    quantize_with_scale,
    tensor_scale,
    unpack_codes,
)
from nvfp4.gemm import nvfp4_matmul
from nvfp4.inference import NVFP4Linear
from nvfp4.qat.api import (
    calibrate,
    convert,
    mark_calibrated,
    needs_calibration,
    prepare,
    qat_linears,
    selected_linears,
    set_enabled,
    static_linears,
    unquantizable_linears,
)
from nvfp4.qat.config import QATConfig, layer_pattern
from nvfp4.qat.linear import NVFP4QATLinear

__all__ = [
    "BLOCK_SIZE",
    "E4M3_MAX",
    "E4M3_MIN_SCALE",
    "FP4_MAX",
    "NVFP4",
    "NVFP4Linear",
    "NVFP4QATLinear",
    "QATConfig",
    "amax",
    "amax_and_scale",
    "amaxes_and_scales",
    "calibrate",
    "convert",
    "dequantize",
    "dequantize_unscaled",
    "fake_quantize",
    "layer_pattern",
    "mark_calibrated",
    "needs_calibration",
    "nvfp4_matmul",
    "prepare",
    "qat_linears",
    "quantize",
    "quantize_with_scale",
    "selected_linears",
    "set_enabled",
    "static_linears",
    "tensor_scale",
    "unpack_codes",
    "unquantizable_linears",
]
