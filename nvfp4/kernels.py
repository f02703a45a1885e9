"""Triton kernels for CUDA, bit-identical to the reference in ``format.py``.

Same fp32 arithmetic in the same order: divisions are correctly rounded (``div_rn``, as the
CPU and torch's CUDA division by a device tensor), the e4m3 cast rounds to nearest even
after the same clamp, E2M1 rounding matches the reference's threshold count (half to even,
by one fused multiply-add: ``_e2m1``), and the sign comes from the sign bit (so -0 keeps
code 8). One pass over x gives the packed codes, the block scales and, for the emulated
GEMM, the bf16 operand ``code * block_scale``. Blocks holding NaN/Inf get a NaN scale as in
the reference (their codes are unspecified: they dequantize to NaN).

Layout: a [M, K] tensor is M*K/16 blocks of 8 element pairs. Each pair is loaded and stored
as one integer (two bf16 in an int32, two fp32 in an int64), so the pair is at hand for
packing its two nibbles, every access is contiguous, and no tile is reshaped. The amax is
one pass of integer maxima over the bits of |x| (NaN bits exceed Inf's, so NaN wins as in
the reference), and the per-tensor scale is one scalar kernel instead of a dozen torch ops.

Dispatch: plain CUDA tensors use these kernels unless ``NVFP4_REFERENCE=1``; everything else
(and any machine without Triton) uses the reference. Under ``torch.compile`` the amax and quantize
kernels are ``triton_op``s, which Inductor launches from its own code (``use_triton_op``); elsewhere
in compiled code (the per-tensor scale, dequantization) Inductor's torch ops run.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


def _cuda_kernels_on(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda and os.environ.get("NVFP4_REFERENCE", "0") != "1"


def use_triton(x: torch.Tensor) -> bool:
    """Triton for plain CUDA tensors in eager code (custom ops run eagerly under compile too);
    tensor subclasses (no storage of their own) take the reference, whose torch ops they dispatch."""
    return _cuda_kernels_on(x) and type(x) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def use_triton_op(x: torch.Tensor) -> bool:
    """The amax and quantize kernels: as ``use_triton``, and under torch.compile too,
    where they are ``triton_op``s that Inductor launches from its own code: a few microseconds of
    CPU per launch instead of tens through Triton's launcher or an opaque custom op's dispatch (on
    H200 Inductor's own reduction of a [8192, 3072] bf16 input also took 73 us of GPU; the amax
    kernel, 30 us for that input and its weight)."""
    if torch.compiler.is_compiling():
        return _cuda_kernels_on(x) and not is_traceable_wrapper_subclass(x)
    return use_triton(x)


# Element dtype -> (Triton kind, integer dtype holding one pair).
_KIND = {torch.bfloat16: (0, torch.int32), torch.float16: (1, torch.int32), torch.float32: (2, torch.int64)}

if HAVE_TRITON:
    SIGNS: tl.constexpr = tl.constexpr(-2147450880)  # 0x80008000, the sign bits of a 16-bit pair
    M_SCALE: tl.constexpr = tl.constexpr(4194411.0)  # 2**22 + 107: 2**E * M_SCALE is _e2m1's m

    @triton.jit
    def _unpack_pair(w, KIND: tl.constexpr):
        """An integer holding two elements -> (even, odd) as fp32, bits unchanged, and an int32
        holding their sign bits at bits 15 and 31 (where a bf16 or fp16 pair has them)."""
        if KIND == 0:  # bf16: the upper half of an fp32
            return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True), w & SIGNS
        elif KIND == 1:
            lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            return lo, (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), w & SIGNS
        else:
            lo, hi = w.to(tl.int32), (w >> 32).to(tl.int32)
            signs = ((lo >> 16) & 0x8000) | (hi & -2147483648)
            return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True), signs

    @triton.jit
    def _pack_pair(lo, hi, KIND: tl.constexpr):
        """(even, odd) fp32 -> one integer of two elements of the kind, each rounded to nearest even."""
        if KIND == 0:
            lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
            hi16 = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
            return (lo16 & 0xFFFF) | (hi16 << 16)
        elif KIND == 1:
            lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
            hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
            return (lo16 & 0xFFFF) | (hi16 << 16)
        else:
            lo32 = lo.to(tl.int32, bitcast=True).to(tl.int64)
            return (lo32 & 0xFFFFFFFF) | (hi.to(tl.int32, bitcast=True).to(tl.int64) << 32)

    @triton.jit
    def _e2m1(x, r):
        """|x * r| clamped to 6, rounded half to even onto the E2M1 grid by the FPU: s = a + m with
        m = 2**(E+22) + 214 * 2**(E-1), E >= 0 the exponent of max(a, 1), so s has an ulp of
        2**(E-1), the grid spacing at a (below 1 it is 0.5). Its mantissa is 214 + k, k <= 4 the
        grid steps of rounded a above 0 (214 is even: a tie goes to the even k, the even code),
        and its exponent field 149 + E, so code = k + 2E is the low byte of bits(s) + (bits(s) >> 22)
        (214 + 2 * 149 = 512).
        Returns that sum, s and 2**E; s - m is the E2M1 value. Every fp32 in [0, 6] checked
        against ``format._e2m1_codes`` (tests/unit/test_e2m1_exhaustive.py)."""
        a = tl.minimum(tl.abs(x * r), 6.0)
        e = (tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        s = tl.fma(e, M_SCALE, a)  # a + m, rounded once (e * M_SCALE is exact)
        bits = s.to(tl.int32, bitcast=True)
        return bits + (bits >> 22), s, e

    @triton.jit
    def _clamp(v, lo, hi):
        """torch.clamp: NaN stays NaN (Triton's min/max would drop it)."""
        v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
        return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _value(code):
        """4-bit code (sign bit 3) -> fp32 E2M1 value, from the bits: 1.0 is code 2 = 254 << 22."""
        m = code & 7
        bits = tl.where(m >= 2, (m + 252) << 22, tl.where(m == 1, 252 << 22, 0))
        return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _nan_max(a, b):
        """max that keeps NaN (as torch's amax)."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _magnitude(rounded, grid_unit):
        """|E2M1 value|, fp32, from ``_e2m1``'s sum and 2**E (the subtraction is exact)."""
        return tl.fma(grid_unit, -M_SCALE, rounded)

    @triton.jit
    def _operand(magnitude, block_scale, operand_scale, OPERAND_SCALED: tl.constexpr):
        """|E2M1 value| * block scale (* operand_scale), fp32."""
        operand = magnitude * block_scale
        if OPERAND_SCALED:
            operand = operand * operand_scale
        return operand

    @triton.jit
    def _block_scale(block_amax, target, tensor_scale):
        """``format._candidate``'s e4m3 block scale [R]: each block amax mapped to ``target``, NaN
        for a block holding NaN or Inf."""
        scale = tl.math.div_rn(tl.math.div_rn(block_amax, target), tensor_scale)
        scale = tl.where(block_amax < float("inf"), _clamp(scale, 0.015625, 448.0), float("nan"))
        return scale.to(tl.float8e4nv)

    @triton.jit
    def _candidate(lo, hi, block_amax, target, tensor_scale):
        """One block scale candidate of R blocks (``lo``, ``hi`` [R, 8] their element pairs): the E4M3
        scale that maps each block's amax to ``target`` ([R]), as fp32 [R, 1], the reciprocal the
        elements are multiplied by, and the E2M1 codes and magnitudes of the pairs under it."""
        scale_e4m3 = _block_scale(block_amax, target, tensor_scale)
        block_scale = scale_e4m3.to(tl.float32)[:, None]
        reciprocal = tl.math.div_rn(tl.math.div_rn(1.0, tensor_scale), block_scale)
        code_lo, rounded_lo, unit_lo = _e2m1(lo, reciprocal)
        code_hi, rounded_hi, unit_hi = _e2m1(hi, reciprocal)
        magnitude_lo, magnitude_hi = _magnitude(rounded_lo, unit_lo), _magnitude(rounded_hi, unit_hi)
        return scale_e4m3, block_scale, reciprocal, code_lo, code_hi, magnitude_lo, magnitude_hi

    @triton.jit
    def _squared_error(x, reciprocal, magnitude):
        """``format._block_error``'s term (|x * r| - |E2M1 value|)**2, the difference (exact) cut to
        12 significant bits so that its square is exact in fp32: a multiply-add contracted into
        one fma then rounds as the reference's separate operations."""
        d = tl.abs(x * reciprocal) - magnitude
        d = (d.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)
        return d * d

    @triton.jit
    def _block_error(x_lo, x_hi, reciprocal, magnitude_lo, magnitude_hi, scale_e4m3, R: tl.constexpr):
        """``format._block_error`` of R blocks ([R] fp32; ``scale_e4m3`` [R] their block scales): the
        16 squares summed as its pairwise tree (element 2i + 2i+1 first, then adjacent pair sums),
        times the block scale squared."""
        e = _squared_error(x_lo, reciprocal, magnitude_lo) + _squared_error(x_hi, reciprocal, magnitude_hi)  # [R, 8]
        a, b = tl.split(tl.reshape(e, [R, 4, 2]))
        a, b = tl.split(tl.reshape(a + b, [R, 2, 2]))
        a, b = tl.split(a + b)
        scale = scale_e4m3.to(tl.float32)
        return (a + b) * (scale * scale)

    @triton.jit
    def _quantize_blocks(
        x_ptr,  # [n_blocks * 8] element pairs of the input (_KIND: int32 or int64 per pair)
        tensor_scale_ptr,  # fp32 [1]: the tensor (second-level) scale
        packed_ptr,  # uint8 [n_blocks * 8] out: two E2M1 codes a byte, the even element's low
        block_scale_ptr,  # uint8 [n_blocks] out: the e4m3 block scales' bits
        operand_ptr,  # int32 [n_blocks * 8] out if WITH_OPERAND: bf16 pairs code * block scale
        operand_scale_ptr,  # fp32 [1] if OPERAND_SCALED: multiplies the operand before its rounding
        pid,  # this program's index among the tensor's programs
        n_blocks,  # 16-element blocks in the tensor
        R: tl.constexpr,  # blocks per program
        KIND: tl.constexpr,  # element dtype: 0 bf16, 1 fp16, 2 fp32
        WITH_OPERAND: tl.constexpr,
        OPERAND_SCALED: tl.constexpr,
        FOUR_OVER_SIX: tl.constexpr,  # the four_over_six block scale rule (else amax)
    ):
        block = pid.to(tl.int64) * R + tl.arange(0, R)  # [R] 16-element blocks
        block_mask = block < n_blocks
        pair = block[:, None] * 8 + tl.arange(0, 8)[None, :]  # [R, 8] pair index = packed byte index
        pair_mask = block_mask[:, None]
        lo, hi, signs = _unpack_pair(tl.load(x_ptr + pair, mask=pair_mask, other=0), KIND)
        block_amax = tl.reduce(_nan_max(tl.abs(lo), tl.abs(hi)), 1, _nan_max)  # NaN wins
        tensor_scale = tl.load(tensor_scale_ptr)
        scale_e4m3, block_scale, reciprocal, code_lo, code_hi, magnitude_lo, magnitude_hi = _candidate(
            lo, hi, block_amax, 6.0, tensor_scale
        )
        scale_bits = scale_e4m3.to(tl.uint8, bitcast=True)
        if FOUR_OVER_SIX:  # format._block_codes: the map-to-4 candidate where its error is smaller
            scale4_e4m3, block_scale4, reciprocal4, code4_lo, code4_hi, magnitude4_lo, magnitude4_hi = _candidate(
                lo, hi, block_amax, 4.0, tensor_scale
            )
            error6 = _block_error(lo, hi, reciprocal, magnitude_lo, magnitude_hi, scale_e4m3, R)
            error4 = _block_error(lo, hi, reciprocal4, magnitude4_lo, magnitude4_hi, scale4_e4m3, R)
            four = error4 < error6  # [R]; ties and NaN: the map-to-6 candidate
            scale_bits = tl.where(four, scale4_e4m3.to(tl.uint8, bitcast=True), scale_bits)
            pick = four[:, None]
            block_scale = tl.where(pick, block_scale4, block_scale)
            code_lo, code_hi = tl.where(pick, code4_lo, code_lo), tl.where(pick, code4_hi, code_hi)
            magnitude_lo = tl.where(pick, magnitude4_lo, magnitude_lo)
            magnitude_hi = tl.where(pick, magnitude4_hi, magnitude_hi)
        # The byte (sign_hi, code_hi, sign_lo, code_lo): the high word of signs * (2**20 + 2**8)
        # is sign_lo * 8 + sign_hi * 128 in its low byte (and a bit above it); the sums' bits
        # above their low bytes only carry upward. Only the low byte is stored.
        byte = tl.umulhi(signs, 0x100100) + (code_lo + (code_hi << 4))
        tl.store(packed_ptr + pair, byte.to(tl.uint8), mask=pair_mask)
        tl.store(block_scale_ptr + block, scale_bits, mask=block_mask)
        if WITH_OPERAND:  # bf16 pairs: magnitudes rounded to nearest even (exact unless scaled), signs
            operand_scale = tl.load(operand_scale_ptr) if OPERAND_SCALED else 1.0
            operand_lo = _operand(magnitude_lo, block_scale, operand_scale, OPERAND_SCALED)
            operand_hi = _operand(magnitude_hi, block_scale, operand_scale, OPERAND_SCALED)
            tl.store(operand_ptr + pair, _pack_pair(operand_lo, operand_hi, 0) | signs, mask=pair_mask)

    @triton.jit
    def _quantize_kernel(
        # Slots A to D hold one tensor each (only the first N are read); a slot's arguments are
        # those of _quantize_blocks, in its order:
        x_a,  # [n_blocks_a * 8] element pairs (int32 or int64)
        tensor_scale_a,  # fp32 [1]
        packed_a,  # uint8 [n_blocks_a * 8] out
        block_scale_a,  # uint8 [n_blocks_a] out
        operand_a,  # int32 [n_blocks_a * 8] out (WITH_OPERAND)
        operand_scale_a,  # fp32 [1] (OPERAND_SCALED_A)
        n_blocks_a,  # int
        x_b,
        tensor_scale_b,
        packed_b,
        block_scale_b,
        operand_b,
        operand_scale_b,
        n_blocks_b,
        x_c,
        tensor_scale_c,
        packed_c,
        block_scale_c,
        operand_c,
        operand_scale_c,
        n_blocks_c,
        x_d,
        tensor_scale_d,
        packed_d,
        block_scale_d,
        operand_d,
        operand_scale_d,
        n_blocks_d,
        end_a,  # programs [0, end_a) work on slot A
        end_b,  # [end_a, end_b) on slot B
        end_c,  # [end_b, end_c) on slot C, the rest on slot D (``_slot_ends``)
        N: tl.constexpr,  # slots used, 1 to 4
        R: tl.constexpr,  # blocks per program
        KIND_A: tl.constexpr,  # each slot's element dtype (``_KIND``)
        KIND_B: tl.constexpr,
        KIND_C: tl.constexpr,
        KIND_D: tl.constexpr,
        OPERAND_SCALED_A: tl.constexpr,  # each slot's operand scale given
        OPERAND_SCALED_B: tl.constexpr,
        OPERAND_SCALED_C: tl.constexpr,
        OPERAND_SCALED_D: tl.constexpr,
        FOUR_OVER_SIX_A: tl.constexpr,  # each slot's block scale rule is four_over_six
        FOUR_OVER_SIX_B: tl.constexpr,
        FOUR_OVER_SIX_C: tl.constexpr,
        FOUR_OVER_SIX_D: tl.constexpr,
        WITH_OPERAND: tl.constexpr,  # write the bf16 GEMM operands
    ):
        """The first N of the tensors in slots A to D, on consecutive ranges of programs."""
        pid = tl.program_id(0)
        if pid < end_a:
            _quantize_blocks(
                x_a,
                tensor_scale_a,
                packed_a,
                block_scale_a,
                operand_a,
                operand_scale_a,
                pid,
                n_blocks_a,
                R,
                KIND_A,
                WITH_OPERAND,
                OPERAND_SCALED_A,
                FOUR_OVER_SIX_A,
            )
        if N > 1:
            if (pid >= end_a) & (pid < end_b):
                _quantize_blocks(
                    x_b,
                    tensor_scale_b,
                    packed_b,
                    block_scale_b,
                    operand_b,
                    operand_scale_b,
                    pid - end_a,
                    n_blocks_b,
                    R,
                    KIND_B,
                    WITH_OPERAND,
                    OPERAND_SCALED_B,
                    FOUR_OVER_SIX_B,
                )
        if N > 2:
            if (pid >= end_b) & (pid < end_c):
                _quantize_blocks(
                    x_c,
                    tensor_scale_c,
                    packed_c,
                    block_scale_c,
                    operand_c,
                    operand_scale_c,
                    pid - end_b,
                    n_blocks_c,
                    R,
                    KIND_C,
                    WITH_OPERAND,
                    OPERAND_SCALED_C,
                    FOUR_OVER_SIX_C,
                )
        if N > 3:
            if pid >= end_c:
                _quantize_blocks(
                    x_d,
                    tensor_scale_d,
                    packed_d,
                    block_scale_d,
                    operand_d,
                    operand_scale_d,
                    pid - end_c,
                    n_blocks_d,
                    R,
                    KIND_D,
                    WITH_OPERAND,
                    OPERAND_SCALED_D,
                    FOUR_OVER_SIX_D,
                )

    @triton.jit
    def _dequantize_blocks(
        packed_ptr,  # uint8 [n_blocks * 8]: two E2M1 codes a byte
        block_scale_ptr,  # uint8 [n_blocks]: e4m3 bits
        tensor_scale_ptr,  # fp32 [1] if SCALED
        out_ptr,  # [n_blocks * 8] out: element pairs of the KIND (int32 or int64)
        pid,  # this program's index among the tensor's programs
        n_blocks,  # 16-element blocks in the tensor
        R: tl.constexpr,  # blocks per program
        KIND: tl.constexpr,  # output dtype: 0 bf16, 1 fp16, 2 fp32
        SCALED: tl.constexpr,  # multiply by the tensor scale
    ):
        block = pid.to(tl.int64) * R + tl.arange(0, R)
        block_mask = block < n_blocks
        pair = block[:, None] * 8 + tl.arange(0, 8)[None, :]
        pair_mask = block_mask[:, None]
        codes = tl.load(packed_ptr + pair, mask=pair_mask, other=0).to(tl.int32)
        scale_bits = tl.load(block_scale_ptr + block, mask=block_mask, other=0)
        block_scale = scale_bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)[:, None]
        lo = _value(codes & 15) * block_scale
        hi = _value(codes >> 4) * block_scale
        if SCALED:
            tensor_scale = tl.load(tensor_scale_ptr)
            lo, hi = lo * tensor_scale, hi * tensor_scale
        tl.store(out_ptr + pair, _pack_pair(lo, hi, KIND), mask=pair_mask)

    @triton.jit
    def _dequantize_kernel(
        # Slots A to D as in _quantize_kernel; a slot's arguments are those of _dequantize_blocks:
        packed_a,  # uint8 [n_blocks_a * 8]
        block_scale_a,  # uint8 [n_blocks_a]
        tensor_scale_a,  # fp32 [1] (SCALED)
        out_a,  # [n_blocks_a * 8] element pairs out
        n_blocks_a,  # int
        packed_b,
        block_scale_b,
        tensor_scale_b,
        out_b,
        n_blocks_b,
        packed_c,
        block_scale_c,
        tensor_scale_c,
        out_c,
        n_blocks_c,
        packed_d,
        block_scale_d,
        tensor_scale_d,
        out_d,
        n_blocks_d,
        end_a,  # programs [0, end_a) work on slot A, [end_a, end_b) on B, [end_b, end_c) on C
        end_b,
        end_c,
        N: tl.constexpr,  # slots used, 1 to 4
        R: tl.constexpr,  # blocks per program
        KIND_A: tl.constexpr,  # each slot's output dtype (``_KIND``)
        KIND_B: tl.constexpr,
        KIND_C: tl.constexpr,
        KIND_D: tl.constexpr,
        SCALED: tl.constexpr,  # multiply by the tensor scales
    ):
        """The first N of the tensors in slots A to D, on consecutive ranges of programs."""
        pid = tl.program_id(0)
        if pid < end_a:
            _dequantize_blocks(packed_a, block_scale_a, tensor_scale_a, out_a, pid, n_blocks_a, R, KIND_A, SCALED)
        if N > 1:
            if (pid >= end_a) & (pid < end_b):
                _dequantize_blocks(
                    packed_b, block_scale_b, tensor_scale_b, out_b, pid - end_a, n_blocks_b, R, KIND_B, SCALED
                )
        if N > 2:
            if (pid >= end_b) & (pid < end_c):
                _dequantize_blocks(
                    packed_c, block_scale_c, tensor_scale_c, out_c, pid - end_b, n_blocks_c, R, KIND_C, SCALED
                )
        if N > 3:
            if pid >= end_c:
                _dequantize_blocks(
                    packed_d, block_scale_d, tensor_scale_d, out_d, pid - end_c, n_blocks_d, R, KIND_D, SCALED
                )

    @triton.jit
    def _scale_of(amax, POW2: tl.constexpr):
        """format.tensor_scale of one fp32 amax."""
        s = tl.math.div_rn(amax, 2688.0)
        finite = (s == s) & (tl.abs(s) != float("inf"))
        s = tl.where(finite, tl.maximum(s, 2.0**-121), s)
        if POW2:
            up = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
            s = tl.where(finite, up, s)
        return tl.where(amax == 0.0, 1.0, s)

    @triton.jit
    def _amax_slot(
        x_ptr,  # [n] any float dtype
        n,  # elements of x
        pid,  # this program's index among x's programs
        grid,  # x's programs
        group_ptr,  # int32 [3]: the group's amax bits, finished programs, tensor scale bits
        programs,  # the programs of all tensors of the group
        SCALE: tl.constexpr,  # compute the tensor scale too
        POW2: tl.constexpr,  # the pow2 tensor-scale mode (else amax)
        BLOCK: tl.constexpr,  # elements per iteration
    ):
        """group[0] = max(group[0], bits of max |x|) over program pid's grid-strided slice of x
        (the bits of |x| as int32 order as the values; NaN's exceed Inf's). SCALE: group[1]
        counts finished programs; the last of ``programs`` writes the scale to group[2]."""
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n, grid * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        tl.atomic_max(group_ptr, tl.max(acc, axis=0))
        if SCALE:
            if tl.atomic_add(group_ptr + 1, 1) == programs - 1:  # acq_rel: every max is visible
                amax = tl.atomic_max(group_ptr, 0).to(tl.float32, bitcast=True)
                tl.store(group_ptr + 2, _scale_of(amax, POW2).to(tl.int32, bitcast=True))

    @triton.jit
    def _amax_kernel(
        # Slots A to D as in _quantize_kernel; a slot's arguments:
        x_a,  # [n_a] any float dtype
        n_a,  # elements of x_a
        group_a,  # int: offset in buf of x_a's group (3 int32 a group)
        programs_a,  # int: programs of x_a's whole group
        x_b,
        n_b,
        group_b,
        programs_b,
        x_c,
        n_c,
        group_c,
        programs_c,
        x_d,
        n_d,
        group_d,
        programs_d,
        end_a,  # programs [0, end_a) work on slot A, [end_a, end_b) on B, [end_b, end_c) on C
        end_b,
        end_c,
        buf_ptr,  # int32 [3 * groups], zeroed: per group amax bits, program count, scale bits
        N: tl.constexpr,  # slots used, 1 to 4
        SCALE: tl.constexpr,  # compute each group's tensor scale
        POW2: tl.constexpr,  # the pow2 tensor-scale mode (else amax)
        BLOCK: tl.constexpr,  # elements per iteration
    ):
        """The first N of the tensors in slots A to D, on consecutive ranges of programs."""
        pid = tl.program_id(0)
        if pid < end_a:
            _amax_slot(x_a, n_a, pid, end_a, buf_ptr + group_a, programs_a, SCALE, POW2, BLOCK)
        if N > 1:
            if (pid >= end_a) & (pid < end_b):
                _amax_slot(x_b, n_b, pid - end_a, end_b - end_a, buf_ptr + group_b, programs_b, SCALE, POW2, BLOCK)
        if N > 2:
            if (pid >= end_b) & (pid < end_c):
                _amax_slot(x_c, n_c, pid - end_b, end_c - end_b, buf_ptr + group_c, programs_c, SCALE, POW2, BLOCK)
        if N > 3:
            if pid >= end_c:
                _amax_slot(
                    x_d, n_d, pid - end_c, tl.num_programs(0) - end_c, buf_ptr + group_d, programs_d, SCALE, POW2, BLOCK
                )

    @triton.jit
    def _tensor_scale_kernel(amax_ptr, out_ptr, POW2: tl.constexpr):
        tl.store(out_ptr, _scale_of(tl.load(amax_ptr), POW2))

    # 16-element blocks per program and warps; elements per amax iteration, programs per SM and
    # warps. benchmarks/tune_kernels.py measures others: these are the best or within 1% of it for
    # each kernel on both H100 and H200 (benchmarks/results/shared_input_h200_2026-11-29.md).
    TILE = {"R": 128, "num_warps": 2}
    AMAX_TILE = {"BLOCK": 4096, "per_sm": 4, "num_warps": 16}


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """t [..., K] contiguous -> the integer view holding two elements each (aligned)."""
    t = t.contiguous()
    if t.storage_offset() % 2:
        t = t.clone()
    return t.view(_KIND[t.dtype][1])


SLOTS = 4  # tensors per launch: the kernels' arguments a to d


def _slots(n: int):
    """The indices of n tensors, ``SLOTS`` per launch."""
    for i in range(0, n, SLOTS):
        yield list(range(i, min(i + SLOTS, n)))


def _slot_args(per_tensor: list[tuple], chunk: list[int]) -> list:
    """Slots a to d's arguments: those of the chunk's tensors, then None for each unused slot (the
    kernels compile only the first N slots). No tensor is passed twice: under torch.compile each
    argument a kernel writes is functionalized on its own, and a repeat's copy would win."""
    unused = [None] * len(per_tensor[chunk[0]]) * (SLOTS - len(chunk))
    return [a for j in chunk for a in per_tensor[j]] + unused


def _slot_ends(programs: list) -> list:
    """end_a, end_b, end_c: where the programs of slots a, b and c end (slot d's run to the grid's)."""
    ends = list(itertools.accumulate(programs))
    return (ends + ends[-1:] * SLOTS)[: SLOTS - 1]


def _launch(kernel, parts: list[tuple], n_blocks: list[int], consts: list[dict[str, int]], **meta) -> None:
    """Launch over the blocks of ``parts`` (each tensor's arguments), ``SLOTS`` tensors per launch;
    ``consts``: each tensor's constexprs, passed as NAME_A to NAME_D (an unused slot repeats the last)."""
    per_tensor = [(*part, n) for part, n in zip(parts, n_blocks)]
    for chunk in _slots(len(parts)):
        programs = [triton.cdiv(n_blocks[j], TILE["R"]) for j in chunk]
        if sum(programs) == 0:  # empty tensors: nothing to launch
            continue
        args = _slot_args(per_tensor, chunk)
        slots = chunk + chunk[-1:] * (SLOTS - len(chunk))
        named = {f"{k}_{slot}": v for slot, j in zip("ABCD", slots) for k, v in consts[j].items()}
        kernel[(sum(programs),)](
            *args, *_slot_ends(programs), N=len(chunk), **named, R=TILE["R"], num_warps=TILE["num_warps"], **meta
        )


def _quantize_launch(
    xs: list[torch.Tensor],
    s_tensors: list[torch.Tensor],
    operand_scales: list[torch.Tensor | None],
    with_operand: bool,
    four_over_six: list[bool],
    kernel,
) -> list[torch.Tensor]:
    """``quantize``'s outputs, flat: packed, e4m3 block scales, bf16 operand (empty without
    ``with_operand``) per tensor; ``four_over_six``: per tensor, its block scale rule is
    four_over_six (else amax)."""
    outs, parts = [], []
    for x, s, operand_scale in zip(xs, s_tensors, operand_scales):
        lead, k = x.shape[:-1], x.shape[-1]
        packed = torch.empty(*lead, k // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(*lead, k // 16, dtype=torch.uint8, device=x.device)
        operand = torch.empty(*lead, k // 2 if with_operand else 0, dtype=torch.int32, device=x.device)
        operand_scale = s if operand_scale is None else operand_scale  # unread without OPERAND_SCALED
        parts.append((_pairs(x), s, packed, scales, operand, operand_scale))
        outs += [packed, scales.view(torch.float8_e4m3fn), operand.view(torch.bfloat16)]
    consts = [
        {
            "KIND": _KIND[x.dtype][0],
            "OPERAND_SCALED": with_operand and o is not None,
            "FOUR_OVER_SIX": four,
        }
        for x, o, four in zip(xs, operand_scales, four_over_six)
    ]
    _launch(kernel, parts, [x.numel() // 16 for x in xs], consts, WITH_OPERAND=with_operand)
    return outs


if HAVE_TRITON:

    @torch.library.triton_op("nvfp4::quantize", mutates_args=())
    def _quantize_op(
        xs: list[torch.Tensor],
        s_tensors: list[torch.Tensor],
        operand_scales: list[torch.Tensor | None],
        with_operand: bool,
        four_over_six: list[bool],
    ) -> list[torch.Tensor]:
        """``_quantize_launch`` for torch.compile: Inductor traces it and launches the kernel itself."""
        return _quantize_launch(
            xs, s_tensors, operand_scales, with_operand, four_over_six, wrap_triton(_quantize_kernel)
        )


def quantize(
    xs: list[torch.Tensor],
    s_tensors: list[torch.Tensor],
    with_operand: bool = False,
    operand_scales: list[torch.Tensor | None] | None = None,
    block_scale_rules: list[str] | None = None,
) -> list[tuple]:
    """x [..., K] (CUDA) -> for each (packed, e4m3 block scales, bf16 operand or None), shaped
    like x; four tensors per launch. An operand scale (fp32 0-dim, or None) multiplies that
    operand in fp32 before its rounding to bf16. ``block_scale_rules``: per tensor ``amax`` (the
    default) or ``four_over_six`` (``format._block_codes``)."""
    operand_scales = list(operand_scales or [None] * len(xs))
    four_over_six = [rule == "four_over_six" for rule in block_scale_rules or ["amax"] * len(xs)]
    if torch.compiler.is_compiling():
        flat = _quantize_op(list(xs), list(s_tensors), operand_scales, with_operand, four_over_six)
    else:  # launched directly (through the op each launch would cost a dispatch)
        flat = _quantize_launch(xs, s_tensors, operand_scales, with_operand, four_over_six, _quantize_kernel)
    return [(p, sc, operand if with_operand else None) for p, sc, operand in zip(flat[0::3], flat[1::3], flat[2::3])]


def dequantize(
    qs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """(packed, block scales, tensor scale or None) -> code * block_scale (* tensor scale) in
    fp32, cast to dtype, shaped [..., K]; four tensors per launch. The tensor scales are all
    given or all None."""
    kind, pair = _KIND[dtype]
    outs, parts = [], []
    for packed, scales, s_tensor in qs:
        out = torch.empty(packed.shape, dtype=pair, device=packed.device)  # one integer holds two outputs
        scales = scales.contiguous().view(torch.uint8)
        s_t = scales if s_tensor is None else s_tensor  # unread without SCALED
        parts.append((packed.contiguous(), scales, s_t, out))
        outs.append(out.view(dtype))
    _launch(
        _dequantize_kernel,
        parts,
        [p[0].numel() // 8 for p in parts],
        [{"KIND": kind}] * len(outs),
        SCALED=qs[0][2] is not None,
    )
    return outs


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _amax_launch(xs: list[torch.Tensor], sizes: list[int], tensor_scale_mode: str | None, kernel) -> torch.Tensor:
    """int32 [3 * len(sizes)]: for each group of xs (``sizes[g]`` tensors, in order) the bits of
    max |x| over the group, a program count, and (unless ``tensor_scale_mode`` is None) the bits of
    the tensor scale, written by the group's last program to finish."""
    buf = torch.zeros(3 * len(sizes), dtype=torch.int32, device=xs[0].device)
    xs = [x.contiguous() for x in xs]
    block = AMAX_TILE["BLOCK"]
    cap = AMAX_TILE["per_sm"] * _sm_count(xs[0].device)
    grids = [torch.sym_max(1, torch.sym_min(triton.cdiv(x.numel(), block), cap)) for x in xs]
    group = [g for g, size in enumerate(sizes) for _ in range(size)]
    totals = [sum(p for p, g in zip(grids, group) if g == h) for h in range(len(sizes))]
    per_tensor = [(x, x.numel(), 3 * g, totals[g]) for x, g in zip(xs, group)]
    for chunk in _slots(len(xs)):
        kernel[(sum(grids[j] for j in chunk),)](
            *_slot_args(per_tensor, chunk),
            *_slot_ends([grids[j] for j in chunk]),
            buf,
            N=len(chunk),
            SCALE=tensor_scale_mode is not None,
            POW2=tensor_scale_mode == "pow2",
            BLOCK=block,
            num_warps=AMAX_TILE["num_warps"],
        )
    return buf


if HAVE_TRITON:

    @torch.library.triton_op("nvfp4::amax", mutates_args=())
    def _amax_op(xs: list[torch.Tensor], sizes: list[int], tensor_scale_mode: str | None) -> torch.Tensor:
        """``_amax_launch`` for torch.compile: Inductor traces it and launches the kernel itself."""
        return _amax_launch(xs, sizes, tensor_scale_mode, wrap_triton(_amax_kernel))


def _amax_buffer(groups: list[list[torch.Tensor]], tensor_scale_mode: str | None) -> torch.Tensor:
    """fp32 view of the amax buffer (the program counts' bits are no floats)."""
    xs, sizes = [x for g in groups for x in g], [len(g) for g in groups]
    if torch.compiler.is_compiling():
        return _amax_op(xs, sizes, tensor_scale_mode).view(torch.float32)
    # Eager: launched directly (through the op or wrap_triton each launch costs a dispatch).
    return _amax_launch(xs, sizes, tensor_scale_mode, _amax_kernel).view(torch.float32)


def amax(*xs: torch.Tensor) -> torch.Tensor:
    """max |x| over all elements of all xs (CUDA, same device), fp32 0-dim; NaN if any is NaN."""
    return _amax_buffer([list(xs)], None)[0]


def amaxes(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """``amax(*group)`` for each group of tensors, in one buffer; one launch for up to four tensors."""
    buf = _amax_buffer(groups, None)
    return [buf[3 * g] for g in range(len(groups))]


def amaxes_and_scales(
    groups: list[list[torch.Tensor]], tensor_scale_mode: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``amax(*group)`` and its ``format.tensor_scale`` for each group of tensors (e.g. a linear's
    input, and its weights), in one buffer; one launch for up to four tensors, none for the scales."""
    buf = _amax_buffer(groups, tensor_scale_mode)
    return [(buf[3 * g], buf[3 * g + 2]) for g in range(len(groups))]


def tensor_scale(amax: torch.Tensor, tensor_scale_mode: str) -> torch.Tensor:
    """``format.tensor_scale`` of a CUDA fp32 0-dim amax, in one launch."""
    out = torch.empty((), dtype=torch.float32, device=amax.device)
    _tensor_scale_kernel[(1,)](amax, out, POW2=tensor_scale_mode == "pow2", num_warps=1)
    return out
