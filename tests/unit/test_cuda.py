"""CUDA: the quantizer is bit-identical to the CPU reference; prepare vs convert holds on GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nvfp4
from tests.edge_cases import edge_tensors

pytestmark = pytest.mark.cuda
EDGES = edge_tensors()
CASES = [
    (name, dtype)
    for name in sorted(EDGES)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    if torch.isfinite(EDGES[name].to(dtype)).all()
]


@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("name,dtype", CASES, ids=str)
def test_quantize_cuda_equals_cpu(name, dtype, mode):
    x = EDGES[name].to(dtype)
    cpu = nvfp4.quantize(x, mode=mode)
    gpu = nvfp4.quantize(x.cuda(), mode=mode)
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.block_scale.cpu().view(torch.uint8), cpu.block_scale.view(torch.uint8))
    assert torch.equal(gpu.tensor_scale.cpu(), cpu.tensor_scale)
    assert torch.equal(nvfp4.fake_quantize(x.cuda(), mode=mode).cpu(), nvfp4.fake_quantize(x, mode=mode))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepare_vs_convert_bitwise_on_cuda(dtype, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda().to(dtype)
    nvfp4.prepare(model, nvfp4.QATConfig(activation_scale=mode))
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)
    if mode == "static":
        nvfp4.calibrate(model, [x, x * 0.5])
    with torch.no_grad():
        y_qat = model(x)
        nvfp4.convert(model)
        y_conv = model(x)
    assert torch.equal(y_qat, y_conv)


def test_backward_is_ste_on_cuda():
    torch.manual_seed(2)
    lin = nvfp4.NVFP4QATLinear(256, 128).cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    lin(x).backward(gy)
    xd = nvfp4.fake_quantize(x.detach()).requires_grad_()
    wd = nvfp4.fake_quantize(lin.weight.detach()).requires_grad_()
    F.linear(xd, wd).backward(gy)
    assert torch.equal(x.grad, xd.grad)
    assert torch.equal(lin.weight.grad, wd.grad)


SHAPES = [(1, 16), (33, 48), (7, 80), (129, 272), (2, 3, 512), (1024, 4096), (4096, 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_reference_on_random_tensors(shape, dtype):
    from nvfp4.format import quantize_for_gemm

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 8).to(dtype)
    s = nvfp4.tensor_scale(nvfp4.abs_max(x))
    ref, ref_op = quantize_for_gemm(x, s)  # CPU reference, fp32 operand
    got, op = quantize_for_gemm(x.cuda(), s.cuda())
    assert torch.equal(got.packed.cpu(), ref.packed)
    assert torch.equal(got.block_scale.cpu().view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert op.dtype == torch.bfloat16 and torch.equal(op.cpu().float(), ref_op)  # exact in bf16
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(nvfp4.dequantize(got, out).cpu(), nvfp4.dequantize(ref, out))


def test_kernel_marks_non_finite_blocks_nan():
    x = torch.randn(4, 64, device="cuda")
    x[1, 5], x[2, 40] = float("nan"), float("inf")
    fq = nvfp4.fake_quantize(x, amax=torch.tensor(3.0, device="cuda"))
    assert torch.isnan(fq[1, :16]).all() and torch.isnan(fq[2, 32:48]).all()
    assert torch.isfinite(fq[0]).all() and torch.isfinite(fq[3]).all()
