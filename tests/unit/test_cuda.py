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


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("name,dtype", CASES, ids=str)
def test_quantize_cuda_equals_cpu(name, dtype, mode, rule):
    x = EDGES[name].to(dtype)
    cpu = nvfp4.quantize(x, tensor_scale_mode=mode, block_scale_rule=rule)
    gpu = nvfp4.quantize(x.cuda(), tensor_scale_mode=mode, block_scale_rule=rule)
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.block_scale.cpu().view(torch.uint8), cpu.block_scale.view(torch.uint8))
    assert torch.equal(gpu.tensor_scale.cpu(), cpu.tensor_scale)
    assert torch.equal(
        nvfp4.fake_quantize(x.cuda(), tensor_scale_mode=mode, block_scale_rule=rule).cpu(),
        nvfp4.fake_quantize(x, tensor_scale_mode=mode, block_scale_rule=rule),
    )


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepare_vs_convert_bitwise_on_cuda(dtype, mode, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).cuda().to(dtype)
    nvfp4.prepare(model, nvfp4.QATConfig(activation_scale=mode, block_scale_rule=rule))
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


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_shared_input_group_on_cuda_equals_each_linear_and_the_reference(mode, rule, monkeypatch):
    """q/k/v quantizing x once (kernels: x and W two per launch) = each linear alone, bitwise;
    and kernels = reference for the group's forward and backward."""
    from tests.unit.test_qat import QKV, _fwd_bwd

    torch.manual_seed(3)
    m = QKV().cuda().to(torch.bfloat16)
    nvfp4.prepare(m, nvfp4.QATConfig(activation_scale=mode, block_scale_rule=rule))
    x = torch.randn(3, 40, 64, device="cuda", dtype=torch.bfloat16)
    if mode == "static":
        nvfp4.calibrate(m, [x * 0.7])
    params = [m.wq.weight, m.wk.weight, m.wv.weight]
    shared, grads = _fwd_bwd(m, x, params)
    each, _ = _fwd_bwd(lambda x: [lin(x) for lin in (m.wq, m.wk, m.wv)], x, params)
    assert all(torch.equal(a, b) for a, b in zip(shared, each))
    monkeypatch.setenv("NVFP4_REFERENCE", "1")
    ref, ref_grads = _fwd_bwd(m, x, params)
    assert all(torch.equal(a, b) for a, b in zip(shared + grads, ref + ref_grads))


SHAPES = [(1, 16), (33, 48), (7, 80), (129, 272), (2, 3, 512), (1024, 4096), (4096, 1024)]


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_reference_on_random_tensors(shape, dtype, rule):
    from nvfp4.format import quantize_for_gemm

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 8).to(dtype)
    s = nvfp4.tensor_scale(nvfp4.amax(x), "pow2", rule)
    ref, ref_op = quantize_for_gemm(x, s, block_scale_rule=rule)  # CPU reference, fp32 operand
    got, op = quantize_for_gemm(x.cuda(), s.cuda(), block_scale_rule=rule)
    assert torch.equal(got.packed.cpu(), ref.packed)
    assert torch.equal(got.block_scale.cpu().view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert op.dtype == torch.bfloat16 and torch.equal(op.cpu().float(), ref_op)  # exact in bf16
    for out in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nvfp4.dequantize(got, out).cpu(), nvfp4.dequantize(ref, out))
    assert torch.equal(nvfp4.amax(x.cuda()).cpu(), nvfp4.amax(x))


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["pow2", "amax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernels_equal_reference_on_every_16_bit_value(dtype, mode, rule):
    """Every finite bf16/fp16 bit pattern: each run of 256 neighbouring values (one or two
    binades: subnormals, every tie) as its own tensor, in order and shuffled, and all of them
    shuffled into one tensor (mixed magnitudes per block); codes, scales and operand bitwise."""
    from nvfp4.format import quantize_for_gemm

    g = torch.Generator().manual_seed(6)
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)].reshape(-1, 256)
    tensors = [t for row in x for t in (row.reshape(16, 16), row[torch.randperm(256, generator=g)].reshape(16, 16))]
    for t in tensors + [x.flatten()[torch.randperm(x.numel(), generator=g)].reshape(-1, 256)]:
        s = nvfp4.tensor_scale(nvfp4.amax(t), mode, rule)
        ref, ref_op = quantize_for_gemm(t, s, block_scale_rule=rule)
        got, op = quantize_for_gemm(t.cuda(), s.cuda(), block_scale_rule=rule)
        assert torch.equal(got.packed.cpu(), ref.packed)
        assert torch.equal(got.block_scale.cpu().view(torch.uint8), ref.block_scale.view(torch.uint8))
        assert torch.equal(op.cpu().float(), ref_op)


def test_amax_kernel_equals_reference():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3000, 4096, generator=g)  # many programs, each grid-striding
    big[1234, 17] = -40.0
    small = torch.randn(7, 16, generator=g) * 100
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = big.to(dtype), small.to(dtype)
        assert torch.equal(nvfp4.amax(a.cuda()).cpu(), torch.tensor(40.0))
        assert torch.equal(nvfp4.amax(a.cuda(), b.cuda()).cpu(), nvfp4.amax(a, b))
    for bad, want in ((float("nan"), torch.isnan), (-float("inf"), torch.isinf)):
        x = big.clone()
        x[2999, 4095] = bad
        assert want(nvfp4.amax(x.cuda())) and want(nvfp4.amax(x))
    tiny = torch.tensor([0.0, -1e-45, 0.0, 0.0] * 4)  # the smallest subnormal wins over zeros
    assert torch.equal(nvfp4.amax(tiny.cuda()).cpu(), nvfp4.amax(tiny))


@pytest.mark.parametrize("mode", ["pow2", "amax"])
def test_amax_and_scale_kernel_equals_reference(mode):
    """One kernel gives the amax and, from its last program, the scale: every repeat sees both."""
    g = torch.Generator().manual_seed(6)
    group = [torch.randn(2048, 2048, generator=g) * 3, torch.randn(512, 2048, generator=g), torch.randn(16, 16)]
    want = nvfp4.amax_and_scale(*group, tensor_scale_mode=mode)
    cuda = [t.cuda().to(torch.bfloat16) for t in group]
    want_bf16 = nvfp4.amax_and_scale(*[t.cpu() for t in cuda], tensor_scale_mode=mode)
    for _ in range(50):
        got = nvfp4.amax_and_scale(*[t.cuda() for t in group], tensor_scale_mode=mode)
        assert all(torch.equal(u.cpu(), v) for u, v in zip(got, want))
        got = nvfp4.amax_and_scale(*cuda, tensor_scale_mode=mode)
        assert all(torch.equal(u.cpu(), v) for u, v in zip(got, want_bf16))


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["pow2", "amax"])
def test_amaxes_and_scales_of_groups_equal_reference(mode, rule):
    """Groups of mixed dtypes share launches (four tensors each) and one buffer: each group's amax
    and scale equal the reference's of that group alone, a group spread over two launches included,
    and a NaN in one group stays there."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 1024, generator=g) * 50
    ws = [torch.randn(n, 1024, generator=g) * (i + 1) for i, n in enumerate((2048, 512, 512, 16, 1000))]
    groups = [
        [x.to(torch.bfloat16)],
        [w.to(dt) for w, dt in zip(ws, (torch.bfloat16, torch.float32) * 3)],
        [torch.randn(16, 16, generator=g).half()],
    ]
    for nan in (False, True):
        if nan:
            groups[1][4][999, 5] = float("nan")  # in the second launch
        rules = ["amax", rule, rule]  # an input's rule and the weights'
        want = [nvfp4.amax_and_scale(*grp, tensor_scale_mode=mode, block_scale_rule=r) for grp, r in zip(groups, rules)]
        assert torch.isnan(want[1][0]) == nan
        for _ in range(20):
            got = nvfp4.amaxes_and_scales([[t.cuda() for t in grp] for grp in groups], mode, rules)
            for u, v in zip((t.cpu() for pair in got for t in pair), (t for pair in want for t in pair)):
                assert torch.equal(u, v) or bool(u.isnan() and v.isnan())


AMAXES = [
    0.0,
    -0.0,
    1e-45,
    1e-40,
    2.0**-126,
    1e-30,
    2688.0 * 2.0**-121,
    0.3,
    1.0,
    2688.0,
    2689.0,
    123.456,
    3.0e38,
    float("inf"),
    float("nan"),
]


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("mode", ["pow2", "amax"])
def test_tensor_scale_kernel_equals_reference(mode, rule):
    for a in AMAXES:
        cpu = nvfp4.tensor_scale(torch.tensor(a), mode, rule)
        gpu = nvfp4.tensor_scale(torch.tensor(a, device="cuda"), mode, rule).cpu()
        assert torch.equal(gpu, cpu) or (gpu.isnan() and cpu.isnan()), (a, gpu, cpu)


def test_kernels_take_misaligned_views():
    base = torch.randn(64 * 16 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(64, 16)  # storage offset 1: no int32 view of its pairs without a copy
    s = nvfp4.tensor_scale(nvfp4.amax(x))
    got, ref = nvfp4.quantize_with_scale(x, s), nvfp4.quantize_with_scale(x.cpu(), s.cpu())
    assert torch.equal(got.packed.cpu(), ref.packed)
    assert torch.equal(got.block_scale.cpu().view(torch.uint8), ref.block_scale.view(torch.uint8))


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16,) * 3,
        (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_operands_two_per_launch_equal_reference(dtypes):
    """Two tensors share a launch; an odd one out runs alone; the slots' block scale rules differ
    (the first tensor amax, as an input; the others alternate)."""
    from nvfp4.format import dequantize_all, quantize_operands

    g = torch.Generator().manual_seed(7)
    shapes = [(333, 96), (3, 5, 1024), (7, 48), (64, 2048)]
    xs = [(torch.randn(*shape, generator=g) * 4**i).to(dt) for i, (shape, dt) in enumerate(zip(shapes, dtypes))]
    rules = ["amax", "four_over_six", "amax", "four_over_six"][: len(xs)]
    scales = [nvfp4.tensor_scale(nvfp4.amax(x), "pow2", r) for x, r in zip(xs, rules)]
    ref = quantize_operands(list(zip(xs, scales)), block_scale_rules=rules)
    got = quantize_operands([(x.cuda(), s.cuda()) for x, s in zip(xs, scales)], block_scale_rules=rules)
    factors = [None if i % 2 else s * 2.0**-7 for i, s in enumerate(scales)]  # operand scales, every other tensor
    ref_scaled = quantize_operands(list(zip(xs, scales)), operand_scales=factors, block_scale_rules=rules)
    got_scaled = quantize_operands(
        [(x.cuda(), s.cuda()) for x, s in zip(xs, scales)],
        operand_scales=[None if f is None else f.cuda() for f in factors],
        block_scale_rules=rules,
    )
    for (_, rop), (_, gop) in zip(ref_scaled, got_scaled):
        assert gop.dtype == torch.bfloat16 and torch.equal(gop.cpu(), rop.to(torch.bfloat16))
    for (rq, rop), (gq, gop) in zip(ref, got):
        assert torch.equal(gq.packed.cpu(), rq.packed)
        assert torch.equal(gq.block_scale.cpu().view(torch.uint8), rq.block_scale.view(torch.uint8))
        assert torch.equal(gop.cpu().float(), rop)
    for out in (torch.float32, torch.bfloat16):
        for r, d in zip(dequantize_all([q for q, _ in ref], out), dequantize_all([q for q, _ in got], out)):
            assert torch.equal(d.cpu(), r)


def test_kernel_marks_non_finite_blocks_nan():
    x = torch.randn(4, 64, device="cuda")
    x[1, 5], x[2, 40] = float("nan"), float("inf")
    fq = nvfp4.fake_quantize(x, amax=torch.tensor(3.0, device="cuda"))
    assert torch.isnan(fq[1, :16]).all() and torch.isnan(fq[2, 32:48]).all()
    assert torch.isfinite(fq[0]).all() and torch.isfinite(fq[3]).all()


@pytest.mark.parametrize("m,k,n", [(8192, 3072, 1024), (4096, 4096, 2048), (333, 96, 48)])
def test_prescaled_weight_gemm_equals_the_scaled_fp32_accumulator(m, k, n):
    """pow2 scales inside the weight operand: the bf16 GEMM gives the bits of rounding the
    fp32 accumulator times the scales (what FP4 tensor cores compute)."""
    from nvfp4.format import quantize_operands
    from nvfp4.gemm import scaled_matmul

    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g) * 3
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    sx, sw = nvfp4.tensor_scale(nvfp4.amax(x)), nvfp4.tensor_scale(nvfp4.amax(w))
    (_, a), (_, b), (_, b_scaled) = quantize_operands([(x, sx), (w, sw), (w, sw)], operand_scales=[None, None, sx * sw])
    fp32_acc = scaled_matmul(a, b, sx * sw, None, torch.bfloat16)
    assert torch.equal(scaled_matmul(a, b_scaled, None, None, torch.bfloat16), fp32_acc)


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("tensor_scale", ["pow2", "amax"])
def test_compiled_qat_linear_runs_the_kernels_and_equals_eager(tensor_scale, rule, tmp_path, monkeypatch):
    """Under torch.compile the QAT linear's forward is traced: Inductor launches the amax and
    quantize kernels (triton_ops) itself, with no reduction of its own and no opaque forward op;
    the backward is the opaque op. Outputs and gradients equal eager's (pow2: the scales folded
    into the weight operand; amax: the fp32 accumulator times the scale)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(4)
    config = nvfp4.QATConfig(tensor_scale=tensor_scale, block_scale_rule=rule)
    lin = nvfp4.NVFP4QATLinear(512, 256, bias=False, config=config)
    lin = lin.cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fwd_bwd(fn):
        x.grad = lin.weight.grad = None
        y = fn(x)
        y.float().square().sum().backward()
        return y.detach(), x.grad, lin.weight.grad

    eager = fwd_bwd(lin)
    compiled, codes = run_and_get_code(fwd_bwd, torch.compile(lin, dynamic=True))
    for name in ("_amax_kernel", "_quantize_kernel", "nvfp4.qat_linear_backward.default"):
        assert any(name in code for code in codes), name
    assert not any("aminmax" in code or "nvfp4.qat_linear.default" in code for code in codes)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


@pytest.mark.parametrize("widths", [(96, 96), (64, 32, 32), (64, 32, 32, 48)], ids=["gate-up", "qkv", "four"])
def test_compiled_shared_input_group_equals_eager(widths, tmp_path, monkeypatch):
    """A fused group under torch.compile (forward traced, backward the opaque op): outputs and
    gradients equal eager's bitwise, the input gradient's sum included. The input and 2-4 weights
    take one launch or, with four weights, two (the second with one tensor)."""
    from benchmarks.utils import Projection
    from tests.unit.test_qat import _fwd_bwd

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(6)
    m = Projection(64, widths, qat=True).cuda().to(torch.bfloat16)
    x = torch.randn(3, 40, 64, device="cuda", dtype=torch.bfloat16)
    params = [lin.weight for lin in m.linears]
    eager, eager_grads = _fwd_bwd(m, x, params)
    compiled, grads = _fwd_bwd(torch.compile(m), x, params)
    assert all(torch.equal(a, b) for a, b in zip(compiled + grads, eager + eager_grads))


def test_selectively_checkpointed_qat_block_compiles_whole_on_cuda(tmp_path, monkeypatch):
    """The 1B/3B recipes' compile + selective checkpointing on the Triton path: the checkpointed
    MLP stays in the block's graph (no break), Inductor launches the amax and quantize kernels, and
    output and input gradient match the block compiled without checkpointing (closely, not
    bitwise: Inductor fuses the two graphs' bf16 element-wise work differently)."""
    from tests.unit.test_compile import compile_block_with_and_without_checkpointing

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    runs = compile_block_with_and_without_checkpointing("cuda", torch.bfloat16)
    assert all(any(name in code for code in runs["selective"][3]) for name in ("_amax_kernel", "_quantize_kernel"))
    for a, b in zip(runs["selective"][:2], runs["none"][:2]):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


def _saved_activation_bytes(model: nn.Module, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes the forward keeps for backward (the model's parameters left out), and the loss."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().logsumexp(-1).mean()
    return total, loss


@pytest.mark.parametrize("ac", ["selective", "full"])
def test_checkpointing_frees_what_compiled_qat_linears_save(ac, tmp_path, monkeypatch):
    """Compiled blocks (apply_compile) with activation checkpointing: the QAT model's forward keeps
    no more for backward than the bf16 model's, and its gradients match the QAT model compiled
    without checkpointing. Traced through the autograd.Function, the QAT linears' GEMM outputs
    and packed operands were kept whatever the checkpoint said (1B recipe: 0.42 GiB per layer at
    8k tokens; full checkpointing freed nothing)."""
    from nvfp4_titan.models.llama3 import FLAVORS, Transformer
    from nvfp4_titan.parallel.parallelize import apply_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tokens = torch.randint(0, 8192, (4, 512), generator=torch.Generator().manual_seed(0)).cuda()
    saved, grads = {}, {}
    for qat, mode in ((True, ac), (False, ac), (True, "none")):
        model = Transformer(FLAVORS["debug"].with_(n_layers=2, activation_checkpoint=mode))
        if qat:
            nvfp4.prepare(model)
        model.init_weights(0)
        model.to("cuda", torch.bfloat16)
        torch._dynamo.reset()
        apply_compile(model)
        saved[qat, mode], loss = _saved_activation_bytes(model, tokens)
        loss.backward()
        grads[qat, mode] = {n: p.grad for n, p in model.named_parameters()}
    assert saved[True, ac] <= saved[False, ac], saved
    assert saved[True, ac] < saved[True, "none"], saved
    for n, g in grads[True, ac].items():
        torch.testing.assert_close(g, grads[True, "none"][n], rtol=0.02, atol=1e-3)
