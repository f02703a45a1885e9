"""The four_over_six block scale rule of the reference quantizer (nvfp4/format.py): each weight block
mapped to 4 where that quantizes it with the smaller squared error, ties to 6; the tensor scale's
headroom. Expected values come from hand-built blocks and from an fp64 oracle written here."""

import pytest
import torch

import nvfp4
from nvfp4.format import E2M1_VALUES, E4M3_MIN_SCALE

GRID = torch.tensor(E2M1_VALUES, dtype=torch.float64)


def _oracle_candidate(xb: torch.Tensor, s_tensor: float, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks xb [B, 16] (fp64 holding fp32 values) quantized with each block amax mapped to
    ``target``, written independently of format.py from docs/numerics.md: block scales (fp64 values
    of e4m3) and the dequantized blocks, each element the nearest E2M1 value of y = x * r with
    r = (1 / s_tensor) / block scale and y in fp32, as documented (ties: the even code)."""
    s = (xb.abs().amax(-1) / target / s_tensor).clamp(E4M3_MIN_SCALE, 448.0)
    s = s.float().to(torch.float8_e4m3fn).double()
    r = (1.0 / torch.tensor(s_tensor, dtype=torch.float32)) / s.float()
    y = (xb.float().abs() * r.unsqueeze(-1)).double().unsqueeze(-1)  # [B, 16, 1]
    dist = (y - GRID).abs()
    nearest = dist.min(-1, keepdim=True).values
    index = torch.where(dist == nearest, torch.arange(8) % 2, 2).argmin(-1)  # a tie: the even index
    dq = xb.sign() * GRID[index] * s.unsqueeze(-1) * s_tensor  # exact in fp64, one rounding to fp32
    return s, dq.float().double()


def test_a_block_that_four_represents_exactly_is_mapped_to_four_within_the_e4m3_range():
    """[2048, 1536 x 15] with tensor amax 2048: s_tensor = 2 * pow2(2048 / 2688) = 2, the map-to-4
    block scale (2048 / 4) / 2 = 256 and every element on the grid (codes 4 and 3): exact. Without
    the doubled tensor scale that block scale would be 512, clamped to 448, and not exact."""
    x = torch.tensor([[2048.0] + [1536.0] * 15, [100.0, -37.5] * 8])
    q = nvfp4.quantize(x, block_scale_rule="four_over_six")
    assert q.tensor_scale.item() == 2.0
    assert q.block_scale[0].float().item() == 256.0
    assert torch.equal(nvfp4.dequantize(q)[0], x[0])
    six = nvfp4.quantize(x)
    assert not torch.equal(nvfp4.dequantize(six)[0], x[0])  # 1536 * 6 / 2048 = 4.5: between codes


def test_a_tie_keeps_the_block_amax_mapped_to_six():
    """[48, 0 x 15] under s_tensor 2: block scales 4 (map to 6) and 6 (map to 4) both represent it
    exactly, a tie: the amax rule's scale 4 is kept. All-zero and tiny blocks (both candidates at the
    2**-6 floor) keep 2**-6."""
    x = torch.zeros(4, 16)
    x[0, 0] = 2688.0  # tensor amax: pow2 scale 1, doubled to 2
    x[1, 0] = 48.0
    x[3] = 1e-12 * torch.arange(16)
    q = nvfp4.quantize(x, block_scale_rule="four_over_six")
    assert q.tensor_scale.item() == 2.0
    assert q.block_scale[1].float().item() == 4.0
    assert torch.equal(nvfp4.dequantize(q)[1], x[1])
    assert q.block_scale[2].float().item() == q.block_scale[3].float().item() == E4M3_MIN_SCALE


@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_block_takes_the_candidate_of_smaller_squared_error(dtype, mode):
    """Against the fp64 oracle: where one candidate's squared error is smaller by more than 1% (the
    rule compares errors computed from the fp32 scaled values, 12 significant bits of each
    difference), the rule picks it; every block is one of the two candidates, bit for bit; the
    tensor's squared error is below the amax rule's."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(256, 512, generator=g) * torch.rand(256, 1, generator=g) * 0.05).to(dtype)
    x[7, 40] = 0.9  # an outlier sets the tensor amax
    q = nvfp4.quantize(x, tensor_scale_mode=mode, block_scale_rule="four_over_six")
    st = q.tensor_scale.item()
    xb = x.double().reshape(-1, 16)
    s6, dq6 = _oracle_candidate(xb, st, 6.0)
    s4, dq4 = _oracle_candidate(xb, st, 4.0)
    err6, err4 = ((dq6 - xb) ** 2).sum(-1), ((dq4 - xb) ** 2).sum(-1)
    chosen = q.block_scale.double().reshape(-1)
    got = nvfp4.dequantize(q).double().reshape(-1, 16)
    is4, is6 = chosen == s4, chosen == s6
    assert (is4 | is6).all()
    assert torch.equal(got[is6 & ~is4], dq6[is6 & ~is4]) and torch.equal(got[is4 & ~is6], dq4[is4 & ~is6])
    clear4, clear6 = err4 < 0.99 * err6, err6 < 0.99 * err4
    assert clear4.sum() > 1000 and clear6.sum() > 1000  # both kinds of blocks are exercised
    assert is4[clear4 & (s4 != s6)].all() and is6[clear6 & (s4 != s6)].all()
    err_rule = ((got - xb) ** 2).sum()
    err_amax = ((nvfp4.dequantize(nvfp4.quantize(x, tensor_scale_mode=mode)).double().reshape(-1, 16) - xb) ** 2).sum()
    assert err_rule < err_amax


@pytest.mark.parametrize(
    "amax,mode,want",
    [(2688.0, "pow2", 2.0), (2048.0, "pow2", 2.0), (1.0, "pow2", 2.0**-10), (2688.0, "amax", 2.0), (0.0, "pow2", 2.0)],
)
def test_tensor_scale_is_doubled_for_the_map_to_four_headroom(amax, mode, want):
    """Twice the amax rule's (448 * 6 -> 224 * 6): the map-to-4 block scale of the tensor's largest
    block, 1.5x its map-to-6 one, stays <= 336 < 448; a power of two stays one."""
    assert nvfp4.tensor_scale(torch.tensor(amax), mode, "four_over_six").item() == want


def test_largest_blocks_map_to_four_unclamped_at_every_pow2_rounding():
    """For tensor amaxes across one binade (every pow2 rounding factor in [1, 2)), the largest
    block's map-to-4 scale, amax / 4 / s_tensor before its e4m3 rounding, stays below 448."""
    for amax in torch.linspace(2048.0, 4096.0, 257):
        s = nvfp4.tensor_scale(amax, "pow2", "four_over_six")
        assert (amax / 4 / s).item() <= 336.0


def test_unknown_rule_is_refused_naming_the_rules():
    with pytest.raises(ValueError, match=r"block scale rule 'mse' is not one of \('amax', 'four_over_six'\)"):
        nvfp4.quantize(torch.randn(2, 16), block_scale_rule="mse")
    with pytest.raises(ValueError, match="block scale rule 'four-over-six'"):
        nvfp4.tensor_scale(torch.tensor(1.0), "pow2", "four-over-six")


def test_non_finite_blocks_dequantize_to_nan_and_others_survive():
    x = torch.randn(3, 32)
    x[1, 3] = float("nan")
    x[2, 20] = float("inf")
    amax = torch.tensor(4.0)
    q = nvfp4.quantize(x, amax, block_scale_rule="four_over_six")
    dq = nvfp4.dequantize(q)
    assert torch.isnan(dq[1, :16]).all() and torch.isnan(dq[2, 16:]).all()
    assert torch.isfinite(dq[0]).all() and torch.isfinite(dq[1, 16:]).all() and torch.isfinite(dq[2, :16]).all()
