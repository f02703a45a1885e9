"""NVFP4 numerics and quantization-aware training; knows nothing of meshes or models."""

from nvfp4.format import (
    BLOCK_SIZE,
    E4M3_MAX,
    E4M3_MIN_SCALE,
    FP4_MAX,
    NVFP4,
    abs_max,
    dequantize,
    dequantize_unscaled,
    fake_quantize,
    quantize,
    quantize_with_scale,
    tensor_scale,
    unpack_codes,
)
from nvfp4.inference import NVFP4Linear, nvfp4_matmul
from nvfp4.qat import (
    NVFP4QATLinear,
    QATConfig,
    calibrate,
    convert,
    needs_calibration,
    prepare,
    qat_linears,
    set_enabled,
)

__all__ = [
    "BLOCK_SIZE",
    "E4M3_MAX",
    "E4M3_MIN_SCALE",
    "FP4_MAX",
    "NVFP4",
    "NVFP4Linear",
    "NVFP4QATLinear",
    "QATConfig",
    "abs_max",
    "calibrate",
    "convert",
    "dequantize",
    "dequantize_unscaled",
    "fake_quantize",
    "needs_calibration",
    "nvfp4_matmul",
    "prepare",
    "qat_linears",
    "quantize",
    "quantize_with_scale",
    "set_enabled",
    "tensor_scale",
    "unpack_codes",
]
