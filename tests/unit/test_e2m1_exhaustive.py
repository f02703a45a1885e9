"""The quantize kernel's E2M1 rounding and byte packing (``kernels._e2m1``,
``kernels._quantize_blocks``), its integer and float steps replayed in torch on the CPU,
exhaustively: every fp32 in [0, 6] against the reference ``format._e2m1_codes`` (code and
value), and every pair of codes and signs against the byte ``code_lo | code_hi << 4`` with the
signs in bits 3 and 7. The CUDA tests run the kernel itself on every 16-bit input (test_cuda.py).
About 10-30 s on 2 cores."""

import pytest
import torch

from nvfp4 import kernels
from nvfp4.format import E2M1_VALUES, _e2m1_codes

M_SCALE = 4194411.0  # kernels.M_SCALE: 2**22 + 107, so that 2**E * M_SCALE is _e2m1's m
SIGNS_TIMES = 0x100100  # kernels._quantize_blocks: umulhi(signs, this) puts them in bits 3 and 7
CHUNK = 1 << 21  # fp32 bit patterns per step


def kernel_e2m1(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels._e2m1 on fp32 a in [0, 6]: (bits(s) + (bits(s) >> 22), s - m), s = a + m."""
    e = (torch.clamp_min(a, 1.0).view(torch.int32) & 0x7F800000).view(torch.float32)  # 2**E
    m = e * M_SCALE  # exact
    s = a + m  # one rounding, as the kernel's fma
    bits = s.view(torch.int32)
    return bits + (bits >> 22), s - m


def test_kernel_rounding_equals_reference_for_every_fp32_in_0_to_6():
    last = torch.tensor(6.0).view(torch.int32).item()  # bit patterns 0..last: every fp32 in [0, 6]
    values = torch.tensor(E2M1_VALUES)
    for start in range(0, last + 1, CHUNK):
        a = torch.arange(start, min(start + CHUNK, last + 1), dtype=torch.int32).view(torch.float32)
        summed, value = kernel_e2m1(a)
        want = _e2m1_codes(a)
        code, want = summed & 0xFF, want.to(torch.int32)  # the code is the sum's low byte
        ok = (code == want) & (value == values[want.long()])
        if not ok.all():
            i = int((~ok).nonzero()[0])
            pytest.fail(
                f"{int((~ok).sum())} fp32 in [{a[0].item()}, {a[-1].item()}] off the reference; "
                f"first {a[i].item()!r}: code {int(code[i])} value {value[i].item()}, reference code "
                f"{int(want[i])} value {values[want[i]].item()}"
            )


def test_packed_byte_for_every_code_and_sign_pair():
    sums = kernel_e2m1(torch.tensor(E2M1_VALUES))[0].long() & 0xFFFFFFFF  # code k's sum, as uint32
    lo, hi = torch.arange(8).view(8, 1, 1, 1), torch.arange(8).view(1, 8, 1, 1)
    sign_lo, sign_hi = torch.arange(2).view(1, 1, 2, 1), torch.arange(2).view(1, 1, 1, 2)
    signs = sign_lo << 15 | sign_hi << 31  # w & 0x80008000 of the bf16 pair word, as uint32
    byte = ((signs * SIGNS_TIMES >> 32) + sums[lo] + (sums[hi] << 4)) & 0xFF  # low 8 bits
    assert torch.equal(byte, lo | sign_lo << 3 | hi << 4 | sign_hi << 7)


@pytest.mark.cuda
@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs Triton")
def test_replayed_constants_are_the_kernels():
    assert kernels.M_SCALE.value == M_SCALE
    assert kernels.SIGNS.value & 0xFFFFFFFF == 0x80008000
