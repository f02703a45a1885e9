"""torch.compile: the QAT path traces without graph breaks and matches eager bit for bit."""

import torch
import torch._dynamo
from torch._inductor.utils import run_and_get_code

import nvfp4
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.models.llama3.model import rope_tables
from nvfp4_titan.parallel.parallelize import DYNAMO_CONFIG, apply_compile


def test_qat_linear_and_block_have_no_graph_breaks():
    lin = nvfp4.NVFP4QATLinear(64, 32)
    assert torch._dynamo.explain(lin)(torch.randn(4, 64)).graph_break_count == 0
    args = FLAVORS["debug"].with_(n_layers=1)
    model = Transformer(args)
    nvfp4.prepare(model)
    block = model.layers[0]
    cos, sin = rope_tables(args, 16, torch.device("cpu"))
    explanation = torch._dynamo.explain(block)(torch.randn(2, 16, args.dim), cos, sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def compile_block_with_and_without_checkpointing(device: str, dtype: torch.dtype) -> dict[str, tuple]:
    """A one-block QAT model compiled with selective and with no activation checkpointing under
    apply_compile's Dynamo settings: {ac: (compiled output, input gradient, eager output, Inductor's
    code of forward and backward)}.
    Asserts that the checkpointed block has no graph break and that the metric is recorded."""
    runs = {}
    for ac in ("selective", "none"):
        torch.manual_seed(0)
        model = Transformer(FLAVORS["debug"].with_(n_layers=1, activation_checkpoint=ac))
        nvfp4.prepare(model)
        model.init_weights()
        block = model.layers[0].to(device, dtype)
        x = torch.randn(2, 16, model.args.dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        cos, sin = rope_tables(model.args, 16, x.device)
        with torch._dynamo.config.patch(DYNAMO_CONFIG):
            if ac == "selective":
                explanation = torch._dynamo.explain(block)(x, cos, sin)
                assert explanation.graph_break_count == 0, explanation.break_reasons
                for m in nvfp4.qat_linears(block):
                    m.last_input_amax = None
            torch._dynamo.reset()
            x = x.requires_grad_()

            def fwd_bwd():
                y = torch.compile(block)(x, cos, sin)
                y.float().square().sum().backward()
                return y

            y, codes = run_and_get_code(fwd_bwd)
        assert all(m.last_input_amax is not None for m in nvfp4.qat_linears(block))
        runs[ac] = (y, x.grad, block(x, cos, sin), codes)
    return runs


def test_selectively_checkpointed_qat_block_compiles_whole(tmp_path, monkeypatch):
    """With apply_compile's Dynamo settings the checkpointed MLP of a QAT block stays in the graph
    (without them the input-amax metric it records broke it out), outputs equal eager's, the
    compiled gradients equal those of the same block compiled without checkpointing, and the
    metric is still recorded."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        apply_compile(Transformer(FLAVORS["debug"].with_(n_layers=1)))
        assert all(getattr(torch._dynamo.config, k) == v for k, v in DYNAMO_CONFIG.items())
    runs = compile_block_with_and_without_checkpointing("cpu", torch.float32)
    assert all(torch.equal(y, eager) for y, _, eager, _ in runs.values())
    assert all(torch.equal(a, b) for a, b in zip(runs["selective"][:2], runs["none"][:2]))


def test_compiled_qat_linear_equals_eager_forward_and_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    lin = nvfp4.NVFP4QATLinear(64, 48)
    x = torch.randn(8, 64, requires_grad=True)
    y = lin(x)
    y.square().sum().backward()
    eager = (y.detach(), x.grad.clone(), lin.weight.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    y2 = torch.compile(lin)(x)
    y2.square().sum().backward()
    assert torch.equal(y2, eager[0]) and torch.equal(x.grad, eager[1]) and torch.equal(lin.weight.grad, eager[2])


def test_compiled_weight_only_qat_equals_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    nvfp4.prepare(model, nvfp4.QATConfig(activation_scale="none"))
    x = torch.randn(4, 64)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    assert torch.equal(torch.compile(model)(x), model(x))


def test_compiled_shared_input_group_equals_eager_and_quantizes_once(tmp_path, monkeypatch):
    from tests.unit.test_qat import QKV, QuantizeCounter, _fwd_bwd

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(2)
    m = QKV()
    nvfp4.prepare(m)
    x, params = torch.randn(2, 8, 64), [m.wq.weight, m.wk.weight, m.wv.weight]
    assert torch._dynamo.explain(m)(x).graph_break_count == 0
    counter = QuantizeCounter(monkeypatch)
    eager, eager_grads = _fwd_bwd(m, x, params)
    compiled, compiled_grads = _fwd_bwd(torch.compile(m), x, params)
    assert counter.calls == [4, 4]  # one quantize_operands per group, compiled too
    assert all(torch.equal(a, b) for a, b in zip(eager + eager_grads, compiled + compiled_grads))


def test_full_activation_checkpointing_compiles(tmp_path, monkeypatch):
    """activation_checkpoint = "full" with compiled blocks (the 8B recipe): the checkpoint is taken
    inside each compiled block, as TorchTitan wraps blocks before compiling them. Called around a
    compiled block, the recompute ran another graph than the forward and backward stopped with
    CheckpointError (saved [4096, 128], recomputed [4096, 2048] in the 8B recipe). Gradients equal
    those of the compiled model without checkpointing; the loss equals eager's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tokens = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for ac, compiled in (("full", True), ("none", True), ("full", False)):
        model = Transformer(FLAVORS["debug"].with_(n_layers=2, activation_checkpoint=ac))
        nvfp4.prepare(model)
        model.init_weights()
        if compiled:
            torch._dynamo.reset()
            apply_compile(model)
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        runs[ac, compiled] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss, grads), (_, grads_no_ac), (loss_eager, _) = runs.values()
    assert torch.equal(loss, loss_eager)
    assert all(torch.equal(grads[n], grads_no_ac[n]) for n in grads)
