"""NVFP4: the format and its plain-torch reference quantizer.

Two-level scaling (docs/numerics.md, "Quantization"): FP4 E2M1 codes, one FP8 E4M3 scale per 16
contiguous elements of the last (reduction) dim, one fp32 per-tensor scale from the amax.
Codes and block scales equal torchao 0.18's ``nvfp4_quantize`` (prototype/mx_formats/
nvfp4_tensor.py) given the same per-tensor scale; the tests check it bit for bit.

All arithmetic is fp32 whatever the input dtype, so CPU and CUDA give identical bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch

from nvfp4 import kernels

FP4_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SCALE = 2.0**-6  # smallest normal e4m3: subnormal block scales are never produced
BLOCK_SIZE = 16
# Floor of the per-tensor scale: with the smallest block scale (2**-6) the reciprocal
# r = (1/s_tensor)/s_block must stay finite, so 1/s_tensor <= 2**121. (The smallest normal
# fp32, 2**-126, would overflow r.) Only tensors with amax < 2688 * 2**-121 ever hit it.
TENSOR_SCALE_MIN = 2.0**-121

# Value of each 4-bit code: bit 3 is the sign, bits 0-2 index the E2M1 magnitudes.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CODE_TO_VALUE = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)
# Round-half-to-even onto the E2M1 grid: magnitude code = number of thresholds passed.
# At a tie the even code wins, so ties at 0.25, 1.25, 2.5, 5 round down (strict >) and
# ties at 0.75, 1.75, 3.5 round up (>=).
_STRICT = (0.25, 1.25, 2.5, 5.0)
_INCLUSIVE = (0.75, 1.75, 3.5)

TensorScaleMode = Literal["pow2", "amax"]
TENSOR_SCALE_MODES: tuple[str, ...] = get_args(TensorScaleMode)

# How each block's scale is chosen (docs/numerics.md, "Block scale rule"). amax: the block amax maps
# to 6. four_over_six (arXiv 2512.02010): per block, the candidate whose block amax maps to 4 when
# its squared error is smaller (ties: to 6); its tensor scale is doubled (FOUR_OVER_SIX_TENSOR_SCALE)
# so that the map-to-4 block scale, 1.5x the map-to-6 one, fits in e4m3 for the largest block.
BlockScaleRule = Literal["amax", "four_over_six"]
BLOCK_SCALE_RULES: tuple[str, ...] = get_args(BlockScaleRule)
FOUR_OVER_SIX_TARGET = 4.0
FOUR_OVER_SIX_TENSOR_SCALE = 2.0  # E4M3 bound 448 / 2 = 224: map-to-4 block scales <= 224 * 1.5 = 336
_ERROR_BITS = -4096  # fp32 sign, exponent and 11 mantissa bits: 12 significant bits, squares exact


class NVFP4(NamedTuple):
    """A tensor quantized to NVFP4.

    packed:       uint8 [..., K/2], code of element 2i in the low nibble, 2i+1 in the high one.
    block_scale:  float8_e4m3fn [..., K/16].
    tensor_scale: fp32 0-dim; dequant = code_value * float(block_scale) * tensor_scale.
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 constant on like's device. Dividing by it is a true division: CUDA
    turns division by a Python scalar into multiplication by its rounded reciprocal,
    which differs from the CPU by an ulp (seen on H100 for amax / 2688)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def amax(*xs: torch.Tensor) -> torch.Tensor:
    """max |x| over all elements of all xs, fp32 0-dim (NaN if one holds a NaN); one pass, no |x| copy."""
    if all(kernels.use_triton_op(x) for x in xs):
        return kernels.amax(*(x.detach() for x in xs))
    amaxes = []
    for x in xs:
        lo, hi = torch.aminmax(x.detach())
        amaxes.append(torch.maximum(hi.float(), -lo.float()))
    return amaxes[0] if len(amaxes) == 1 else torch.stack(amaxes).amax()


def amaxes(groups: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``amax`` of each group of tensors; on CUDA one kernel launch for up to four tensors in all."""
    if all(kernels.use_triton_op(x) for g in groups for x in g):
        return kernels.amaxes([[x.detach() for x in g] for g in groups])
    return [amax(*g) for g in groups]


def tensor_scale(
    amax: torch.Tensor | float, tensor_scale_mode: TensorScaleMode = "pow2", block_scale_rule: BlockScaleRule = "amax"
) -> torch.Tensor:
    """Per-tensor (second-level) scale from an amax, fp32 (amax's shape: 0-dim for one tensor).

    ``amax`` mode is torchao's ``per_tensor_amax_to_scale``: amax / (448 * 6). ``pow2`` (the
    default) rounds that up to a power of two, so that 1/s is exact and engines that store
    the scale (ModelOpt) and its reciprocal (compressed-tensors) decode the same bits.
    amax == 0 gives 1.0 (all codes 0); a non-finite amax gives a non-finite scale, so the
    whole tensor dequantizes to NaN instead of hiding the fault. ``block_scale_rule``
    four_over_six doubles the scale (exactly, so pow2 stays a power of two): the headroom its
    map-to-4 block scales need (docs/numerics.md). Raises ``ValueError`` for an unknown mode or rule.
    """
    _check_tensor_scale_mode(tensor_scale_mode)
    _check_block_scale_rule(block_scale_rule)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if amax.dim() == 0 and kernels.use_triton(amax):
        return _with_headroom(kernels.tensor_scale(amax, tensor_scale_mode), block_scale_rule)
    s = amax / _const(E4M3_MAX * FP4_MAX, amax)
    s = torch.where(torch.isfinite(s), s.clamp_min(TENSOR_SCALE_MIN), s)
    if tensor_scale_mode == "pow2":
        # Round up to 2**k in the bits: add all-ones to the mantissa, carry into the exponent.
        bits = s.view(torch.int32)
        up = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
        s = torch.where(torch.isfinite(s), up, s)
    return _with_headroom(torch.where(amax == 0, torch.ones_like(s), s), block_scale_rule)


def _with_headroom(s: torch.Tensor, block_scale_rule: BlockScaleRule) -> torch.Tensor:
    """The tensor scale ``s`` of the amax rule as the block scale rule needs it (x 2: exact)."""
    return s * FOUR_OVER_SIX_TENSOR_SCALE if block_scale_rule == "four_over_six" else s


def _check_tensor_scale_mode(tensor_scale_mode: str) -> None:
    if tensor_scale_mode not in TENSOR_SCALE_MODES:
        raise ValueError(f"tensor scale mode {tensor_scale_mode!r} is not one of {TENSOR_SCALE_MODES}")


def _check_block_scale_rule(block_scale_rule: str) -> None:
    if block_scale_rule not in BLOCK_SCALE_RULES:
        raise ValueError(f"block scale rule {block_scale_rule!r} is not one of {BLOCK_SCALE_RULES}")


def amax_and_scale(
    *xs: torch.Tensor, tensor_scale_mode: TensorScaleMode = "pow2", block_scale_rule: BlockScaleRule = "amax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``amax(*xs)`` and its ``tensor_scale``; on CUDA one kernel computes both."""
    return amaxes_and_scales([xs], tensor_scale_mode, [block_scale_rule])[0]


def amaxes_and_scales(
    groups: Sequence[Sequence[torch.Tensor]],
    tensor_scale_mode: TensorScaleMode = "pow2",
    block_scale_rules: Sequence[BlockScaleRule] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``amax_and_scale`` of each group of tensors (e.g. a linear's input, and its weights), each
    group's scale for its block scale rule (default: all ``amax``); on CUDA one kernel launch for up
    to four tensors in all."""
    _check_tensor_scale_mode(tensor_scale_mode)
    rules = list(block_scale_rules or ["amax"] * len(groups))
    for rule in rules:
        _check_block_scale_rule(rule)
    if all(kernels.use_triton_op(x) for g in groups for x in g):
        pairs = kernels.amaxes_and_scales([[x.detach() for x in g] for g in groups], tensor_scale_mode)
        return [(a, _with_headroom(s, rule)) for (a, s), rule in zip(pairs, rules)]
    amaxes = [amax(*g) for g in groups]
    return [(a, tensor_scale(a, tensor_scale_mode, rule)) for a, rule in zip(amaxes, rules)]


def _scale_for(
    x: torch.Tensor, amax: torch.Tensor | None, tensor_scale_mode: TensorScaleMode, block_scale_rule: BlockScaleRule
) -> torch.Tensor:
    """The tensor scale of x: from the given amax, else from max |x|."""
    if amax is None:
        return amax_and_scale(x, tensor_scale_mode=tensor_scale_mode, block_scale_rule=block_scale_rule)[1]
    return tensor_scale(amax, tensor_scale_mode, block_scale_rule)


def _check_last_dim(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"NVFP4 quantizes floating-point tensors, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"NVFP4 needs the last (reduction) dim to be a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(x.shape)}; pad it or leave this tensor in high precision"
        )


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 y (already clamped to [-6, 6]) half-to-even onto E2M1; uint8 codes."""
    mag = y.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for t in _STRICT:
        code += mag > t
    for t in _INCLUSIVE:
        code += mag >= t
    return code | (torch.signbit(y).to(torch.uint8) << 3)  # -0 keeps its sign, as in torchao


def _candidate(
    xb: torch.Tensor, b_amax: torch.Tensor, target: float, s_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks xb [..., K/16, 16] fp32 quantized with each block amax mapped to ``target`` (6 or
    4): codes uint8, block scales e4m3 [..., K/16], and y = x * r before the clamp to [-6, 6]."""
    s = (b_amax / _const(target, b_amax)) / s_tensor
    # Clamp before the cast: CUDA and CPU disagree on out-of-range e4m3 casts. A block
    # holding Inf or NaN gets a NaN scale, so it dequantizes to NaN (it is never clipped).
    s = torch.where(torch.isfinite(b_amax), s.clamp(E4M3_MIN_SCALE, E4M3_MAX), torch.nan)
    s_block = s.to(torch.float8_e4m3fn)
    r = (_const(1.0, s_tensor) / s_tensor) / s_block.float()  # this order: torchao, MSLK
    y = xb * r.unsqueeze(-1)
    return _e2m1_codes(y.clamp(-FP4_MAX, FP4_MAX)), s_block, y


def _block_error(y: torch.Tensor, codes: torch.Tensor, s_block: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K/16]: each block's squared quantization error in units of the tensor scale,
    s_block**2 * sum d**2 with d = |y| - |value(code)|. Computed so that the Triton kernel gets the
    same bits whatever multiply-adds its compiler contracts into fmas: d is a subtraction of no
    product (exact where |y| <= 12, as with the tensor's own amax: the two lie within a factor of 2,
    or the value is 0), cut to 12 significant bits so that d**2 is exact; the 16 squares are summed
    as a pairwise tree (adjacent pairs first), then scaled by s_block**2 (exact) in one rounding."""
    d = y.abs() - _CODE_TO_VALUE.to(codes.device)[(codes & 7).long()]
    d = (d.view(torch.int32) & _ERROR_BITS).view(torch.float32)
    e = d.square()
    while e.shape[-1] > 1:
        e = e[..., 0::2] + e[..., 1::2]
    return e[..., 0] * s_block.float().square()


def _block_codes(
    x: torch.Tensor, s_tensor: torch.Tensor, block_scale_rule: BlockScaleRule = "amax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [..., K] uint8 and block scales [..., K/16] e4m3 of x under tensor scale s: each block
    amax mapped to 6, or with four_over_six to 4 where that block's squared error is smaller."""
    xb = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE)  # [..., K/16, 16]
    b_amax = xb.abs().amax(dim=-1)
    codes, s_block, y = _candidate(xb, b_amax, FP4_MAX, s_tensor)
    if block_scale_rule == "four_over_six":
        codes4, s_block4, y4 = _candidate(xb, b_amax, FOUR_OVER_SIX_TARGET, s_tensor)
        four = _block_error(y4, codes4, s_block4) < _block_error(y, codes, s_block)  # ties (and NaN): to 6
        codes = torch.where(four.unsqueeze(-1), codes4, codes)
        s_block = torch.where(four, s_block4.view(torch.uint8), s_block.view(torch.uint8)).view(torch.float8_e4m3fn)
    return codes.reshape(x.shape), s_block


def quantize_with_scale(x: torch.Tensor, s_tensor: torch.Tensor, block_scale_rule: BlockScaleRule = "amax") -> NVFP4:
    """Quantize x [..., K] with a given fp32 per-tensor scale (e.g. a frozen input_scale; for
    four_over_six, a ``tensor_scale`` of that rule)."""
    return quantize_for_gemm(x, s_tensor, with_operand=False, block_scale_rule=block_scale_rule)[0]


def operand_dtype(device: torch.device) -> torch.dtype:
    """dtype of the emulated GEMM's operands: bf16 tensor cores on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quantize_for_gemm(
    x: torch.Tensor, s_tensor: torch.Tensor, with_operand: bool = True, block_scale_rule: BlockScaleRule = "amax"
) -> tuple[NVFP4, torch.Tensor | None]:
    """Quantize x [..., K]; ``with_operand``: also return ``code * block_scale`` (exact) in
    ``operand_dtype``: on CUDA one fused pass, so x is read once."""
    return quantize_operands([(x, s_tensor)], with_operand, block_scale_rules=[block_scale_rule])[0]


def quantize_operands(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    with_operand: bool = True,
    operand_scales: list[torch.Tensor | None] | None = None,
    block_scale_rules: Sequence[BlockScaleRule] | None = None,
) -> list[tuple[NVFP4, torch.Tensor | None]]:
    """``quantize_for_gemm`` of several (x, tensor scale), e.g. the operands of a GEMM: on CUDA
    four per launch. ``operand_scales``: per tensor an fp32 0-dim factor of its operand (applied in
    fp32 before the cast, as ``dequantize`` applies a tensor scale), or None. ``block_scale_rules``:
    per tensor (default: all ``amax``). Raises ``ValueError`` for a K that is no multiple of 16 or an
    unknown rule, ``TypeError`` for a tensor that is not floating point."""
    pairs = [(x, torch.as_tensor(s, dtype=torch.float32, device=x.device)) for x, s in pairs]
    operand_scales = operand_scales or [None] * len(pairs)
    rules = list(block_scale_rules or ["amax"] * len(pairs))
    for (x, _), rule in zip(pairs, rules, strict=True):
        _check_last_dim(x)
        _check_block_scale_rule(rule)
    if all(kernels.use_triton_op(x) for x, _ in pairs):
        outs = kernels.quantize([x for x, _ in pairs], [s for _, s in pairs], with_operand, operand_scales, rules)
        return [(NVFP4(packed, s_block, s), operand) for (packed, s_block, operand), (_, s) in zip(outs, pairs)]
    out = []
    for (x, s), operand_scale, rule in zip(pairs, operand_scales, rules):
        codes, s_block = _block_codes(x, s, rule)
        q = NVFP4(codes[..., 0::2] | (codes[..., 1::2] << 4), s_block, s)
        operand = None
        if with_operand:
            operand = scale_blocks(_codes_to_values(codes), s_block)
            operand = (operand if operand_scale is None else operand * operand_scale).to(operand_dtype(x.device))
        out.append((q, operand))
    return out


def quantize(
    x: torch.Tensor,
    amax: torch.Tensor | None = None,
    tensor_scale_mode: TensorScaleMode = "pow2",
    block_scale_rule: BlockScaleRule = "amax",
) -> NVFP4:
    """Quantize x [..., K] to NVFP4.

    ``amax`` defaults to max |x|; pass it to quantize a shard or a fused group with the
    amax of the whole logical tensor. ``block_scale_rule``: how each block's scale is chosen
    (``amax`` or ``four_over_six``; docs/numerics.md). Non-finite inputs never raise (that would
    sync the device): their blocks, or with a non-finite amax the whole tensor, dequantize to NaN.
    """
    _check_last_dim(x)
    return quantize_with_scale(x, _scale_for(x, amax, tensor_scale_mode, block_scale_rule), block_scale_rule)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    return _CODE_TO_VALUE.to(codes.device)[codes.long()]


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """The E2M1 values (fp32 [..., K]) of packed codes, before any scale."""
    return _codes_to_values(unpack_codes(packed))


def scale_blocks(values: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """values [..., K] times their block's scale [..., K/16] (fp32)."""
    v = values.reshape(*values.shape[:-1], -1, BLOCK_SIZE) * block_scale.float().unsqueeze(-1)
    return v.flatten(-2)


def _dequantize(qs: list[NVFP4], dtype: torch.dtype, scaled: bool) -> list[torch.Tensor]:
    if all(kernels.use_triton(q.packed) for q in qs):
        return kernels.dequantize([(q.packed, q.block_scale, q.tensor_scale if scaled else None) for q in qs], dtype)
    unscaled = [scale_blocks(e2m1_values(q.packed), q.block_scale) for q in qs]
    return [(v * q.tensor_scale if scaled else v).to(dtype) for v, q in zip(unscaled, qs)]


def dequantize_unscaled(q: NVFP4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code_value * block_scale, without the tensor scale: exact in bf16 (<= 6 significant bits).

    This is the operand of the emulated FP4 GEMM, as FP4 tensor cores see it.
    """
    return _dequantize([q], dtype, scaled=False)[0]


def dequantize(q: NVFP4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code_value * float(block_scale) * tensor_scale, in fp32, then cast to dtype."""
    return _dequantize([q], dtype, scaled=True)[0]


def dequantize_all(qs: list[NVFP4], dtype: torch.dtype = torch.float32, scaled: bool = True) -> list[torch.Tensor]:
    """``dequantize`` of several tensors (on CUDA four per launch); ``scaled=False``:
    ``dequantize_unscaled``."""
    return _dequantize(qs, dtype, scaled)


def fake_quantize(
    x: torch.Tensor,
    amax: torch.Tensor | None = None,
    tensor_scale_mode: TensorScaleMode = "pow2",
    block_scale_rule: BlockScaleRule = "amax",
) -> torch.Tensor:
    """dequantize(quantize(x, amax)) in x's dtype, without packing and unpacking the codes."""
    _check_last_dim(x)
    s_tensor = _scale_for(x, amax, tensor_scale_mode, block_scale_rule).to(x.device)
    if kernels.use_triton(x):
        return dequantize(quantize_with_scale(x, s_tensor, block_scale_rule), x.dtype)
    codes, s_block = _block_codes(x, s_tensor, block_scale_rule)
    return (scale_blocks(_codes_to_values(codes), s_block) * s_tensor).to(x.dtype)
