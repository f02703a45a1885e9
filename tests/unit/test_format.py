"""NVFP4 reference quantizer: bit-exact parity with torchao, tensor scales, edge cases."""

import math

import pytest
import torch
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

import nvfp4
from nvfp4.format import E2M1_VALUES, TENSOR_SCALE_MIN
from tests.edge_cases import edge_tensors

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EDGES = edge_tensors()


def _torchao(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's packed codes and block scales (as raw bytes); it takes fp32 or bf16."""
    x = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()  # fp16 -> fp32 is exact
    scales, packed = nvfp4_quantize(x.contiguous(), per_tensor_scale=s)
    return packed, scales.view(torch.uint8)


def _assert_matches_torchao(x: torch.Tensor, amax: torch.Tensor, mode: str) -> None:
    s = nvfp4.tensor_scale(amax, mode)
    q = nvfp4.quantize(x, amax, mode)
    packed, scales = _torchao(x, s)
    assert torch.equal(q.packed, packed.reshape(q.packed.shape))
    assert torch.equal(q.block_scale.view(torch.uint8), scales.reshape(q.block_scale.shape))
    assert torch.equal(q.tensor_scale, s)


# Every edge tensor in every dtype that can hold it (3e38 overflows fp16: not its edge).
EDGE_CASES = [
    (name, dtype) for name in sorted(EDGES) for dtype in DTYPES if torch.isfinite(EDGES[name].to(dtype)).all()
]


@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("name,dtype", EDGE_CASES, ids=str)
def test_edge_tensors_match_torchao(name, dtype, mode):
    x = EDGES[name].to(dtype)
    _assert_matches_torchao(x, nvfp4.amax(x), mode)


@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (3, 32), (7, 48), (64, 128), (2, 5, 64), (128, 1024)])
def test_random_tensors_match_torchao(shape, dtype, mode):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = (
        torch.randn(*shape, generator=g)
        * torch.rand(shape[0], 1, 1)[: shape[0]].reshape(shape[0], *[1] * (len(shape) - 1))
        * 4
    ).to(dtype)
    _assert_matches_torchao(x, nvfp4.amax(x), mode)


@pytest.mark.parametrize("mode", ["pow2", "amax"])
def test_block_scale_clamps_at_e4m3_max_with_small_supplied_amax(mode):
    x = torch.randn(8, 64)
    amax = nvfp4.amax(x) / 100  # a stale static amax: blocks overflow the E4M3 range
    q = nvfp4.quantize(x, amax, mode)
    assert (q.block_scale.float() == 448.0).any()
    _assert_matches_torchao(x, amax, mode)


def test_amax_of_several_tensors():
    a, b = torch.tensor([[1.0, -7.5]]), torch.tensor([3.0, -2.0, 0.5]).to(torch.bfloat16)
    assert torch.equal(nvfp4.amax(a, b), torch.tensor(7.5))
    assert torch.equal(nvfp4.amax(b), torch.tensor(3.0))
    assert torch.isnan(nvfp4.amax(a, torch.tensor([float("nan")]), b))


def test_ties_round_half_to_even():
    x = EDGES["ties"]
    assert torch.equal(nvfp4.tensor_scale(nvfp4.amax(x)), torch.tensor(1.0))
    got = nvfp4.fake_quantize(x)[:3, 1:]
    # Independent oracle: nearest E2M1 value, ties to the even code (even index).
    grid = torch.tensor(E2M1_VALUES)
    v = x[:3, 1:].abs().flatten()
    d = (v[:, None] - grid[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = (d == best).float() * (1 + (torch.arange(8) % 2 == 0).float())  # prefer even codes
    want = grid[cand.argmax(dim=1)].reshape(3, 15) * x[:3, 1:].sign()
    assert torch.equal(got, want)


def test_packing_layout_even_element_low_nibble():
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 6.0, -0.5  # codes 7 and 0b1001
    q = nvfp4.quantize(x)
    assert q.packed[0, 0].item() == 0x7 | (0x9 << 4)
    assert torch.equal(nvfp4.unpack_codes(q.packed)[0, :2], torch.tensor([7, 9], dtype=torch.uint8))


def test_dequantize_equals_fake_quantize_and_round_trips_codes():
    for dtype in DTYPES:
        x = EDGES["random_large"].to(dtype)
        q = nvfp4.quantize(x)
        assert torch.equal(nvfp4.dequantize(q, dtype), nvfp4.fake_quantize(x))
        assert torch.equal(nvfp4.quantize(nvfp4.dequantize(q), nvfp4.amax(x)).packed, q.packed)


# ---- tensor scale ----------------------------------------------------------------------

AMAXES = torch.cat([torch.logspace(-30, 30, 997), torch.tensor([1.0, 2688.0, 2689.0, 448.0, 6.0])])


def test_tensor_scale_amax_mode_is_torchao():
    for a in AMAXES:
        assert torch.equal(nvfp4.tensor_scale(a, "amax"), per_tensor_amax_to_scale(a))


def test_tensor_scale_pow2_is_next_power_of_two_at_or_above_torchao():
    for a in AMAXES:
        ref = per_tensor_amax_to_scale(a).item()
        s = nvfp4.tensor_scale(a).item()
        assert s >= ref and s < 2 * ref, (a, s, ref)
        assert math.frexp(s)[0] == 0.5, s  # a power of two
    assert nvfp4.tensor_scale(torch.tensor(2688.0)).item() == 1.0
    assert nvfp4.tensor_scale(torch.tensor(2689.0)).item() == 2.0


def test_pow2_scale_decodes_identically_by_multiply_and_by_reciprocal():
    """Why pow2: ModelOpt multiplies by s, compressed-tensors divides by 1/s."""
    vals = torch.tensor(E2M1_VALUES[1:])
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    m = (vals[:, None] * e4m3[None, :]).flatten()
    mismatched = {"pow2": 0, "amax": 0}
    for a in torch.logspace(-3, 3, 101):
        for mode in mismatched:
            s = nvfp4.tensor_scale(a, mode)
            mismatched[mode] += int((m * s != m / (1.0 / s)).any())
    assert mismatched["pow2"] == 0
    assert mismatched["amax"] > 50  # the problem pow2 solves is real


def test_tensor_scale_edge_amaxes():
    assert nvfp4.tensor_scale(torch.tensor(0.0)).item() == 1.0
    assert nvfp4.tensor_scale(torch.tensor(0.0), "amax").item() == 1.0
    for mode in ("pow2", "amax"):
        tiny = nvfp4.tensor_scale(torch.tensor(1e-40), mode)
        assert tiny.item() == TENSOR_SCALE_MIN
        assert math.isfinite((1.0 / tiny).item() / nvfp4.E4M3_MIN_SCALE)
        assert torch.isinf(nvfp4.tensor_scale(torch.tensor(math.inf), mode))
        assert torch.isnan(nvfp4.tensor_scale(torch.tensor(math.nan), mode))
    with pytest.raises(ValueError, match="tensor scale mode"):
        nvfp4.tensor_scale(torch.tensor(1.0), "max")


def test_all_zero_and_tiny_tensors_quantize_to_zero_codes():
    for x in (torch.zeros(2, 32), torch.full((2, 32), 1e-42)):
        q = nvfp4.quantize(x)
        assert torch.isfinite(nvfp4.dequantize(q)).all()
    q = nvfp4.quantize(torch.zeros(2, 32))
    assert torch.equal(q.packed, torch.zeros(2, 16, dtype=torch.uint8))
    assert q.tensor_scale.item() == 1.0


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 20), (15,), ()])
def test_k_not_multiple_of_16_names_shape(shape):
    with pytest.raises(ValueError, match=r"multiple of 16.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        nvfp4.quantize(torch.randn(shape))


def test_non_floating_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.int32))


def test_nan_block_dequantizes_to_nan_and_others_survive_with_given_amax():
    x = torch.randn(2, 32)
    x[0, 3] = math.nan
    x[1, 20] = math.inf
    fq = nvfp4.fake_quantize(x, amax=torch.tensor(4.0))
    assert torch.isnan(fq[0, :16]).all() and torch.isnan(fq[1, 16:]).all()
    assert torch.isfinite(fq[0, 16:]).all() and torch.isfinite(fq[1, :16]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensor_dequantizes_to_all_nan(bad):
    x = torch.randn(2, 32)
    x[1, 7] = bad
    assert torch.isnan(nvfp4.fake_quantize(x)).all()
    assert torch.isnan(nvfp4.dequantize(nvfp4.quantize(x))).all()


def test_quantize_operands_equals_one_at_a_time():
    from nvfp4.format import dequantize_all, quantize_for_gemm, quantize_operands

    ts = [torch.randn(5, 48), torch.randn(3, 48).to(torch.bfloat16), torch.randn(2, 2, 32) * 1e-3]
    pairs = [(t, nvfp4.amax_and_scale(t, tensor_scale_mode=m)[1]) for t, m in zip(ts, ("pow2", "amax", "pow2"))]
    together = quantize_operands(pairs)
    assert len(together) == 3
    for (q, op), (t, s) in zip(together, pairs):
        q1, op1 = quantize_for_gemm(t, s)
        assert torch.equal(q.packed, q1.packed) and torch.equal(op, op1)
        assert torch.equal(q.block_scale.view(torch.uint8), q1.block_scale.view(torch.uint8))
    qs = [q for q, _ in together]
    assert all(torch.equal(a, nvfp4.dequantize(q)) for a, q in zip(dequantize_all(qs), qs))


def test_operand_scale_multiplies_the_operand_as_dequantize_applies_a_tensor_scale():
    from nvfp4.format import NVFP4, dequantize_all, quantize_operands

    torch.manual_seed(11)
    x, w = torch.randn(6, 64) * 3, torch.randn(5, 64).to(torch.bfloat16)
    sx, sw = nvfp4.tensor_scale(nvfp4.amax(x)), nvfp4.tensor_scale(nvfp4.amax(w), "amax")
    factor = sx * sw
    (xq, x_op), (wq, w_op) = quantize_operands([(x, sx), (w, sw)], operand_scales=[None, factor])
    (_, x_plain), (wq_plain, w_plain) = quantize_operands([(x, sx), (w, sw)])
    assert torch.equal(x_op, x_plain) and torch.equal(wq.packed, wq_plain.packed)  # only the operand changes
    (want,) = dequantize_all([NVFP4(wq.packed, wq.block_scale, factor)], w_op.dtype)
    assert torch.equal(w_op, want) and not torch.equal(w_op, w_plain)
