"""QAT linear: prepare vs convert bit-exactness, STE backward, saved memory, calibration."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nvfp4
import nvfp4.qat.autograd
from nvfp4 import NVFP4Linear, NVFP4QATLinear, QATConfig
from nvfp4_titan.models.llama3.model import shared_input

DTYPES = (torch.float32, torch.bfloat16)
MODES = ("dynamic", "static")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 32, bias=False)
        self.head = nn.Linear(32, 10)  # K=32 but excluded below: stays float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(F.gelu(self.up(x))))


def _batches(n: int, *shape: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]


def _prepare_convert(model: nn.Module, config: QATConfig, x: torch.Tensor):
    nvfp4.prepare(model, config)
    if config.activation_scale == "static":
        nvfp4.calibrate(model, _batches(3, *x.shape, dtype=x.dtype))
    with torch.no_grad():
        y_qat = model(x)
    nvfp4.convert(model)
    with torch.no_grad():
        y_conv = model(x)
    return y_qat, y_conv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_prepare_vs_convert_bitwise(mode, dtype):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    config = QATConfig(activation_scale=mode, exclude=("head",))
    x = torch.randn(4, 9, 64).to(dtype)
    y_qat, y_conv = _prepare_convert(model, config, x)
    assert isinstance(model.up, NVFP4Linear) and type(model.head) is nn.Linear
    assert torch.equal(y_qat, y_conv)


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("tensor_scale", ["pow2", "amax"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n,bias", [(16, 16, True), (48, 80, False), (256, 33, True), (512, 512, False)])
def test_random_linears_prepare_vs_convert_bitwise(k, n, bias, dtype, mode, tensor_scale, rule):
    torch.manual_seed(k + n)
    model = nn.Sequential(nn.Linear(k, n, bias=bias)).to(dtype)
    config = QATConfig(activation_scale=mode, tensor_scale=tensor_scale, block_scale_rule=rule)
    y_qat, y_conv = _prepare_convert(model, config, torch.randn(2, 5, k).to(dtype))
    assert torch.equal(y_qat, y_conv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_four_over_six_quantizes_weights_by_the_rule_and_inputs_by_block_amax(dtype):
    """The QAT forward is the emulated GEMM of the input quantized with each block amax mapped to 6
    and the weight by four_over_six, bitwise; the converted layer holds that weight."""
    torch.manual_seed(11)
    lin = nn.Sequential(nn.Linear(256, 96, bias=False)).to(dtype)
    w = lin[0].weight.detach().clone()
    nvfp4.prepare(lin, QATConfig(block_scale_rule="four_over_six"))
    x = torch.randn(3, 7, 256).to(dtype) * 4
    wq = nvfp4.quantize(w, block_scale_rule="four_over_six")
    want = nvfp4.nvfp4_matmul(nvfp4.quantize(x), wq, None, dtype, "pow2")
    with torch.no_grad():
        assert torch.equal(lin(x), want)
        assert not torch.equal(lin(x), nvfp4.nvfp4_matmul(nvfp4.quantize(x), nvfp4.quantize(w), None, dtype, "pow2"))
    nvfp4.convert(lin)
    got = lin[0].quantized_weight()
    assert torch.equal(got.packed, wq.packed) and torch.equal(got.tensor_scale, wq.tensor_scale)
    assert torch.equal(got.block_scale.view(torch.uint8), wq.block_scale.view(torch.uint8))


def test_qat_output_is_the_fake_quantized_linear():
    """The emulated GEMM computes dq(x) @ dq(W).T (exact products, fp32 sums)."""
    torch.manual_seed(1)
    lin = NVFP4QATLinear(64, 32)
    x = torch.randn(8, 64) * 3
    ref = F.linear(
        nvfp4.fake_quantize(x).double(), nvfp4.fake_quantize(lin.weight.detach()).double(), lin.bias.detach().double()
    )
    assert torch.allclose(lin(x).double(), ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # it does quantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("xshape", [(8, 64), (2, 5, 64)])
def test_backward_is_ste_over_fake_quantized_operands(xshape, dtype):
    torch.manual_seed(2)
    lin = NVFP4QATLinear(64, 48).to(dtype)
    x = torch.randn(*xshape).to(dtype).requires_grad_()
    gy = torch.randn(*xshape[:-1], 48).to(dtype)
    lin(x).backward(gy)

    xd = nvfp4.fake_quantize(x.detach()).requires_grad_()
    wd = nvfp4.fake_quantize(lin.weight.detach()).requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    F.linear(xd.reshape(-1, 64), wd, b).backward(gy.reshape(-1, 48))
    assert torch.equal(x.grad, xd.grad.reshape(xshape))
    assert torch.equal(lin.weight.grad, wd.grad)
    assert torch.equal(lin.bias.grad, b.grad)  # torchao returns None here


def test_fused_group_shares_weight_amax_and_trains_all_members():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wk, self.wv = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

        def fused_linear_groups(self) -> list[list[str]]:
            return [["wq", "wk", "wv"]]

        def forward(self, x):
            return self.wq(x).sum() + self.wk(x).sum() + self.wv(x).sum()

    torch.manual_seed(3)
    m = Attn()
    with torch.no_grad():
        m.wk.weight[0, 0] = 50.0  # the group's amax lives in wk
    nvfp4.prepare(m)
    for lin in (m.wq, m.wk, m.wv):
        assert lin.weight_amax().item() == 50.0
        assert torch.equal(lin.quantized_weight().tensor_scale, nvfp4.tensor_scale(torch.tensor(50.0)))
    m(torch.randn(4, 32)).backward()
    assert all(lin.weight.grad is not None for lin in (m.wq, m.wk, m.wv))

    separate = Attn()
    nvfp4.prepare(separate, QATConfig(share_fused_amax=False))
    assert separate.wq.weight_amax().item() < 50.0


class QKV(nn.Module):
    """Three bias-free linears of one input and one fused group, called as the Llama model does."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(64, n, bias=False) for n in (64, 32, 32))

    def fused_linear_groups(self) -> list[list[str]]:
        return [["wq", "wk", "wv"]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return shared_input((self.wq, self.wk, self.wv), x)


class QuantizeCounter:
    """Counts the tensors each ``quantize_operands`` call of the QAT forward quantizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        orig = nvfp4.qat.autograd.quantize_operands
        monkeypatch.setattr(
            nvfp4.qat.autograd,
            "quantize_operands",
            lambda pairs, **kw: self.calls.append(len(pairs)) or orig(pairs, **kw),
        )


def _fwd_bwd(fn, x: torch.Tensor, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    x = x.detach().requires_grad_()
    ys = fn(x)
    sum(y.float().square().sum() for y in ys).backward()
    grads = [x.grad, *(p.grad for p in params)]
    for p in params:
        p.grad = None
    return ys, grads


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("tensor_scale", ["pow2", "amax"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_input_quantized_once_equals_each_linear(dtype, mode, tensor_scale, rule, monkeypatch):
    torch.manual_seed(5)
    m = QKV().to(dtype)
    nvfp4.prepare(m, QATConfig(activation_scale=mode, tensor_scale=tensor_scale, block_scale_rule=rule))
    x = torch.randn(2, 8, 64).to(dtype)
    if mode == "static":
        nvfp4.calibrate(m, [x * 0.5])  # smaller: some inputs clip
    lins, params = (m.wq, m.wk, m.wv), [m.wq.weight, m.wk.weight, m.wv.weight]
    counter = QuantizeCounter(monkeypatch)
    shared, shared_grads = _fwd_bwd(m, x, params)
    assert counter.calls == [4]  # x and the three weights, x once
    each, each_grads = _fwd_bwd(lambda x: [lin(x) for lin in lins], x, params)
    assert counter.calls == [4, 2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(shared, each))
    # grad_x sums the three GEMMs in the order autograd sums separate linears' gradients
    assert all(torch.equal(a, b) for a, b in zip(shared_grads, each_grads))


def test_shared_input_takes_the_per_module_path_when_it_cannot_share(monkeypatch):
    torch.manual_seed(6)
    x = torch.randn(4, 64)
    src = QKV()
    nvfp4.prepare(src, QATConfig(activation_scale="static"))
    nvfp4.calibrate(src, [x])
    state = src.state_dict()
    state["wv.input_amax"] = torch.tensor(100.0)  # not the group's amax: one quantized x cannot serve all
    m = QKV()
    nvfp4.prepare(m, QATConfig(activation_scale="static"))
    m.load_state_dict(state)
    counter = QuantizeCounter(monkeypatch)
    ys = m(x)
    assert counter.calls == [2, 2, 2]
    assert all(torch.equal(y, lin(x)) for y, lin in zip(ys, (m.wq, m.wk, m.wv)))

    hooked = QKV()
    nvfp4.prepare(hooked)
    seen = []
    hooked.wk.register_forward_pre_hook(lambda mod, args: seen.append(mod))  # a user's hook (not a TP plan's)
    counter.calls.clear()
    hooked(x)
    assert counter.calls == [2, 2, 2] and seen == [hooked.wk]

    backward_hooked = QKV()  # a backward hook alone also needs the module's own __call__
    nvfp4.prepare(backward_hooked)
    grads = []
    backward_hooked.wv.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0]))
    counter.calls.clear()
    ys = backward_hooked(x.requires_grad_())
    sum(y.sum() for y in ys).backward()
    assert counter.calls == [2, 2, 2] and len(grads) == 1 and torch.equal(grads[0], torch.ones_like(ys[2]))

    separate = QKV()  # no shared weight amax: the weights have different tensor scales
    nvfp4.prepare(separate, QATConfig(share_fused_amax=False))
    counter.calls.clear()
    separate(x)
    assert counter.calls == [2, 2, 2]

    weight_only = QKV()  # W4A16: each linear runs F.linear on its fake-quantized weight
    nvfp4.prepare(weight_only, QATConfig(activation_scale="none"))
    counter.calls.clear()
    assert all(
        torch.equal(y, lin(x)) for y, lin in zip(weight_only(x), (weight_only.wq, weight_only.wk, weight_only.wv))
    )
    assert counter.calls == []


def test_shared_input_saves_x_once():
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    m = QKV().to(torch.bfloat16)
    nvfp4.prepare(m)
    shared_bytes, _ = _saved_bytes(lambda x: sum(y.sum() for y in m(x)), x)
    each_bytes, _ = _saved_bytes(lambda x: sum(lin(x).sum() for lin in (m.wq, m.wk, m.wv)), x)
    x_bytes = 256 * 64 * 9 // 16 + 2 * 4  # codes, block scales, the two fp32 tensor scales
    assert each_bytes - shared_bytes == 2 * x_bytes, (each_bytes, shared_bytes)


def _saved_bytes(module, x: torch.Tensor) -> tuple[int, list[torch.dtype]]:
    sizes, dtypes = [], []

    def pack(t: torch.Tensor):
        sizes.append(t.numel() * t.element_size())
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(sizes), dtypes


def test_saved_tensors_are_packed_and_smaller_than_bf16_linear():
    x = torch.randn(512, 1024, dtype=torch.bfloat16, requires_grad=True)
    bf16 = nn.Linear(1024, 1024).to(torch.bfloat16)
    qat = NVFP4QATLinear(1024, 1024).to(torch.bfloat16)
    bf16_bytes, _ = _saved_bytes(bf16, x)
    qat_bytes, dtypes = _saved_bytes(qat, x)
    assert qat_bytes < 0.3 * bf16_bytes, (qat_bytes, bf16_bytes)  # 4.5 bits vs 16 per element
    assert set(dtypes) <= {torch.uint8, torch.float8_e4m3fn, torch.float32}


def test_static_mode_requires_calibration_and_freezes_amax():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16))
    nvfp4.prepare(model, QATConfig(activation_scale="static"))
    with pytest.raises(RuntimeError, match="calibrat"):
        model(torch.randn(2, 32))
    batches = _batches(4, 2, 32)
    assert nvfp4.calibrate(model, batches) == 4
    lin = model[0]
    assert lin.input_amax.item() == max(b.abs().max().item() for b in batches)
    before = lin.input_amax.clone()
    model(torch.randn(2, 32) * 100)  # larger inputs clamp; the scale stays frozen
    assert torch.equal(lin.input_amax, before)
    assert "0.input_amax" in model.state_dict()


def test_calibrated_amax_survives_state_dict_round_trip():
    src = nn.Sequential(nn.Linear(32, 16))
    nvfp4.prepare(src, QATConfig(activation_scale="static"))
    nvfp4.calibrate(src, _batches(2, 3, 32))
    dst = nn.Sequential(nn.Linear(32, 16))
    nvfp4.prepare(dst, QATConfig(activation_scale="static"))
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(dst(x), src(x))


def test_mark_calibrated_lets_a_loaded_static_model_compile_without_graph_breaks():
    src = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16))
    nvfp4.prepare(src, QATConfig(activation_scale="static"))
    nvfp4.calibrate(src, _batches(2, 3, 32))
    dst = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16))
    nvfp4.prepare(dst, QATConfig(activation_scale="static"))
    with pytest.raises(RuntimeError, match=r"^0: static activation scale is not calibrated"):
        nvfp4.mark_calibrated(dst)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 32)
    with pytest.raises(torch._dynamo.exc.UserError, match="input_amax"):  # the first forward's host check
        torch.compile(dst, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    nvfp4.mark_calibrated(dst)
    assert torch.equal(torch.compile(dst, backend="eager", fullgraph=True)(x), src(x))


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=str)
def test_calibrate_refuses_a_non_finite_amax_naming_the_linear_and_keeps_the_amaxes(bad):
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16))
    nvfp4.prepare(model, QATConfig(activation_scale="static"))
    fresh = [m.input_amax.clone() for m in nvfp4.qat_linears(model)]
    poisoned = _batches(2, 3, 32)
    poisoned[1][2, 5] = bad
    with pytest.raises(ValueError, match=rf"^0: input amax {bad} is not finite: a calibration input held NaN or Inf"):
        nvfp4.calibrate(model, poisoned)
    assert all(torch.equal(m.input_amax, a) for m, a in zip(nvfp4.qat_linears(model), fresh))
    assert nvfp4.needs_calibration(model)
    nvfp4.calibrate(model, _batches(2, 3, 32))
    calibrated = [m.input_amax.clone() for m in nvfp4.qat_linears(model)]
    with pytest.raises(ValueError, match="^0: input amax"):
        nvfp4.calibrate(model, poisoned)  # a recalibration that fails keeps the earlier scales
    assert all(torch.equal(m.input_amax, a) for m, a in zip(nvfp4.qat_linears(model), calibrated))
    with pytest.raises(ValueError, match="got no batches"):
        nvfp4.calibrate(model, [])
    assert all(torch.equal(m.input_amax, a) for m, a in zip(nvfp4.qat_linears(model), calibrated))


def test_convert_and_mark_calibrated_refuse_a_non_finite_input_amax():
    """A checkpoint can hold what calibrate refuses: convert must not deploy an input scale
    that makes every output NaN."""
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16))
    nvfp4.prepare(model, QATConfig(activation_scale="static"))
    nvfp4.calibrate(model, _batches(2, 3, 32))
    model[1].input_amax.fill_(math.nan)
    with pytest.raises(ValueError, match=r"^1: input amax nan is not finite"):
        nvfp4.convert(model)
    assert all(isinstance(m, NVFP4QATLinear) for m in model)  # nothing swapped
    with pytest.raises(ValueError, match=r"^1: input amax nan is not finite"):
        nvfp4.mark_calibrated(model)


def test_prepare_rejects_k_not_multiple_of_16_naming_layer_and_swaps_nothing():
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 20), nn.Linear(20, 16))
    assert nvfp4.unquantizable_linears(model, QATConfig()) == {"2": 20}
    with pytest.raises(ValueError, match=r"^2: in_features=20"):
        nvfp4.prepare(model)
    assert [type(m) for m in model] == [nn.Linear] * 3
    nvfp4.prepare(model, QATConfig(exclude=QATConfig().excluding(["2"])))
    assert [type(m) for m in model] == [NVFP4QATLinear, NVFP4QATLinear, nn.Linear]


def test_prepare_on_meta_device_shares_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16))
    w = model[0].weight
    nvfp4.prepare(model)
    assert isinstance(model[0], NVFP4QATLinear) and model[0].weight is w
    assert model[0].input_amax.is_meta


def test_bad_config_values_rejected():
    with pytest.raises(ValueError, match="activation_scale"):
        QATConfig(activation_scale="dynamc")
    with pytest.raises(ValueError, match="tensor_scale"):
        QATConfig(tensor_scale="fp32")
    with pytest.raises(ValueError, match=r"block_scale_rule='4/6': use one of \('amax', 'four_over_six'\)"):
        QATConfig(block_scale_rule="4/6")


def test_non_finite_input_makes_output_nan_not_garbage():
    lin = NVFP4QATLinear(32, 8)
    x = torch.randn(4, 32)
    x[1, 2] = math.nan
    assert torch.isnan(lin(x)).all()  # the dynamic amax is NaN: the loss will say so


@pytest.mark.parametrize("rule", nvfp4.BLOCK_SCALE_RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_only_prepare_vs_convert_bitwise_and_inputs_unquantized(dtype, rule):
    torch.manual_seed(5)
    model = MLP().to(dtype)
    config = QATConfig(activation_scale="none", exclude=("head",), block_scale_rule=rule)
    x = torch.randn(3, 7, 64).to(dtype)
    y_qat, y_conv = _prepare_convert(model, config, x)
    assert torch.equal(y_qat, y_conv)
    assert model.up.activation_scale == "none" and model.up.input_scale is None
    qat = nn.Sequential(nn.Linear(64, 32).to(dtype))
    w_fq = nvfp4.fake_quantize(qat[0].weight.detach(), block_scale_rule=rule)
    want = F.linear(x, w_fq, qat[0].bias)  # x itself, dq(W)
    nvfp4.prepare(qat, config)
    assert torch.equal(qat(x), want)


def test_weight_only_backward_is_ste():
    torch.manual_seed(6)
    qat = nn.Sequential(nn.Linear(64, 48))
    nvfp4.prepare(qat, QATConfig(activation_scale="none"))
    x = torch.randn(8, 64, requires_grad=True)
    gy = torch.randn(8, 48)
    qat(x).backward(gy)
    wd = nvfp4.fake_quantize(qat[0].weight.detach()).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, wd, qat[0].bias.detach()).backward(gy)
    assert torch.equal(x.grad, x2.grad) and torch.equal(qat[0].weight.grad, wd.grad)
