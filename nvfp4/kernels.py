"""Triton kernels for CUDA, bit-identical to the reference in ``format.py``.

Same fp32 arithmetic in the same order: divisions are correctly rounded (``div_rn``, as the
CPU and torch's CUDA division by a device tensor), the e4m3 cast rounds to nearest even
after the same clamp, E2M1 rounding is the same threshold count, and the sign comes from
the sign bit (so -0 keeps code 8). One pass over x gives the packed codes, the block scales
and, for the emulated GEMM, the bf16 operand ``code * block_scale``. Blocks holding NaN/Inf
get a NaN scale as in the reference (their codes are unspecified: they dequantize to NaN).

Dispatch: CUDA tensors use these kernels unless ``NVFP4_REFERENCE=1``; everything else (and
any machine without Triton) uses the reference.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


def enabled(x: torch.Tensor) -> bool:
    """Triton for plain CUDA tensors; tensor subclasses (no storage of their own) take the
    reference, whose torch ops they dispatch."""
    return (HAVE_TRITON and x.is_cuda and type(x) in (torch.Tensor, torch.nn.Parameter)
            and os.environ.get("NVFP4_REFERENCE", "0") != "1")


if HAVE_TRITON:

    @triton.jit
    def _e2m1(y):
        """fp32 y in [-6, 6] -> int32 code (sign bit 3), round half to even."""
        a = tl.abs(y)
        code = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
        code += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
        code += (a > 5.0).to(tl.int32)
        sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
        return code | (sign << 3)

    @triton.jit
    def _clamp(v, lo, hi):
        """torch.clamp: NaN stays NaN (Triton's min/max would drop it)."""
        v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
        return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _value(code):
        m = code & 7
        v = tl.where(m <= 4, m.to(tl.float32) * 0.5, tl.where(m == 5, 3.0, tl.where(m == 6, 4.0, 6.0)))
        return tl.where((code & 8) != 0, -v, v)

    @triton.jit
    def _quantize_kernel(x_ptr, s_ptr, packed_ptr, scale_ptr, op_ptr, M, K,
                         BM: tl.constexpr, G: tl.constexpr, EMIT_OP: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * G * 16 + tl.arange(0, G * 16)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_t = tl.load(s_ptr)
        xb = tl.reshape(x, (BM, G, 16))
        bad = tl.sum(((xb != xb) | (tl.abs(xb) == float("inf"))).to(tl.int32), axis=2) > 0
        b_amax = tl.max(tl.abs(xb), axis=2)
        s = tl.math.div_rn(tl.math.div_rn(b_amax, 6.0), s_t)
        s = _clamp(s, 0.015625, 448.0)
        s = tl.where(bad, float("nan"), s)
        s8 = s.to(tl.float8e4nv)
        s8f = s8.to(tl.float32)
        r = tl.math.div_rn(tl.math.div_rn(1.0, s_t), s8f)
        y = xb * r[:, :, None]
        y = _clamp(y, -6.0, 6.0)
        code = _e2m1(y)  # [BM, G, 16]
        even, odd = tl.split(tl.reshape(code, (BM, G * 8, 2)))
        pcols = tl.program_id(1) * G * 8 + tl.arange(0, G * 8)
        pmask = (rows[:, None] < M) & (pcols[None, :] < K // 2)
        tl.store(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + pcols[None, :],
                 (even | (odd << 4)).to(tl.uint8), mask=pmask)
        scols = tl.program_id(1) * G + tl.arange(0, G)
        smask = (rows[:, None] < M) & (scols[None, :] < K // 16)
        tl.store(scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :],
                 s8.to(tl.uint8, bitcast=True), mask=smask)
        if EMIT_OP:
            op = tl.reshape(_value(code) * s8f[:, :, None], (BM, G * 16))
            tl.store(op_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], op.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _dequantize_kernel(packed_ptr, scale_ptr, s_ptr, out_ptr, M, K,
                           BM: tl.constexpr, G: tl.constexpr, USE_S: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        pcols = tl.program_id(1) * G * 8 + tl.arange(0, G * 8)
        pmask = (rows[:, None] < M) & (pcols[None, :] < K // 2)
        p = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + pcols[None, :], mask=pmask, other=0).to(tl.int32)
        code = tl.reshape(tl.join(p & 15, p >> 4), (BM, G, 16))
        scols = tl.program_id(1) * G + tl.arange(0, G)
        smask = (rows[:, None] < M) & (scols[None, :] < K // 16)
        sb = tl.load(scale_ptr + rows[:, None].to(tl.int64) * (K // 16) + scols[None, :], mask=smask, other=0)
        sbf = sb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        v = _value(code) * sbf[:, :, None]
        if USE_S:
            v = v * tl.load(s_ptr)
        cols = tl.program_id(1) * G * 16 + tl.arange(0, G * 16)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 tl.reshape(v, (BM, G * 16)).to(out_ptr.dtype.element_ty), mask=mask)

    # Rows x 16-element blocks per program, and warps: scripts/tune_kernels.py measures others.
    TILE = {"BM": 64, "G": 4, "num_warps": 4}

    # Plain launches: under torch.compile these run inside the opaque nvfp4::qat_linear op.
    def _quantize_op(x: torch.Tensor, s: torch.Tensor, emit_op: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        M, K = x.shape
        packed = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(M, K // 16, dtype=torch.uint8, device=x.device)
        op = torch.empty(M, K if emit_op else 0, dtype=torch.bfloat16, device=x.device)
        bm, g = TILE["BM"], TILE["G"]
        grid = (triton.cdiv(M, bm), triton.cdiv(K, g * 16))
        _quantize_kernel[grid](x, s, packed, scales, op, M, K, BM=bm, G=g, EMIT_OP=emit_op,
                               num_warps=TILE["num_warps"])
        return packed, scales, op

    def _dequantize_op(packed: torch.Tensor, scales: torch.Tensor, s: torch.Tensor, dtype: torch.dtype,
                       use_s: bool) -> torch.Tensor:
        M, K = packed.shape[0], packed.shape[1] * 2
        out = torch.empty(M, K, dtype=dtype, device=packed.device)
        bm, g = TILE["BM"], TILE["G"]
        grid = (triton.cdiv(M, bm), triton.cdiv(K, g * 16))
        _dequantize_kernel[grid](packed, scales, s, out, M, K, BM=bm, G=g, USE_S=use_s, num_warps=TILE["num_warps"])
        return out


def quantize(x: torch.Tensor, s_tensor: torch.Tensor, emit_operand: bool = False):
    """x [..., K] CUDA -> (packed, e4m3 block scales, bf16 operand or None), shaped like x."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    packed, scales, op = _quantize_op(x2, s_tensor.reshape(1), emit_operand)
    lead = x.shape[:-1]
    return (packed.reshape(*lead, -1), scales.view(torch.float8_e4m3fn).reshape(*lead, -1),
            op.reshape(x.shape) if emit_operand else None)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, s_tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """code * block_scale (* s_tensor if given) in fp32, cast to dtype; shaped [..., K]."""
    p2 = packed.reshape(-1, packed.shape[-1]).contiguous()
    s2 = scales.reshape(-1, scales.shape[-1]).contiguous().view(torch.uint8)
    s = s_tensor.reshape(1) if s_tensor is not None else torch.ones(1, device=packed.device)
    out = _dequantize_op(p2, s2, s, dtype, s_tensor is not None)
    return out.reshape(*packed.shape[:-1], -1)
