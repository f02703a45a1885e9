"""Quantization-aware distillation loss: KL(teacher || student) * T^2 per position against an
independent float64 formula and ModelOpt's form, its hand-written gradient against autograd's,
and a student equal to its teacher: zero loss and exactly zero gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.training.distill import distillation_loss, kl_divergence
from nvfp4_titan.training.loss import cross_entropy

B, S, V = 2, 5, 11


def _logits(seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(B, S, V, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
def test_kl_equals_the_definition_and_modelopts_form(temperature):
    s, t = _logits(0), _logits(1)
    got = kl_divergence(s, t, temperature)
    # The definition, in float64: sum_v p_v (log p_v - log q_v), times T^2.
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    want = (p * (p.log() - q.log())).sum(-1).flatten() * temperature**2
    assert got.shape == (B * S,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    # ModelOpt's LogitsDistillationLoss, summed over the vocabulary instead of averaged.
    modelopt = (
        F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="none").sum(-1).flatten()
        * temperature**2
    )
    assert torch.allclose(got, modelopt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_gradient_equals_autograds(temperature):
    s, t = _logits(2).requires_grad_(), _logits(3)
    w = torch.rand(B * S, generator=torch.Generator().manual_seed(4))  # an arbitrary upstream gradient
    (kl_divergence(s, t, temperature) * w).sum().backward()
    s_ref = s.detach().clone().requires_grad_()
    ref = (
        F.kl_div(
            F.log_softmax(s_ref / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .flatten()
        * temperature**2
    )
    (ref * w).sum().backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_the_whole_computation_bitwise(dtype):
    """Chunks of 3 of the 10 positions (and a last chunk of 1) give the values and gradients of one
    chunk holding them all, bit for bit: the chunking only bounds the fp32 temporaries."""
    s, t = _logits(5, dtype=dtype), _logits(6, dtype=dtype)
    w = torch.rand(B * S, generator=torch.Generator().manual_seed(7))
    out = {}
    for rows in (3, B * S):
        x = s.clone().requires_grad_()
        kl = kl_divergence(x, t, 1.5, chunk_rows=rows)
        (kl * w).sum().backward()
        out[rows] = (kl.detach(), x.grad)
    assert torch.equal(out[3][0], out[B * S][0]) and torch.equal(out[3][1], out[B * S][1])
    assert out[3][1].dtype == dtype


def test_bf16_student_gets_a_bf16_gradient_and_fp32_loss():
    s, t = _logits(5, dtype=torch.bfloat16).requires_grad_(), _logits(6, dtype=torch.bfloat16)
    kl = kl_divergence(s, t)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and s.grad.dtype == torch.bfloat16


def test_loss_modes_and_parts():
    s, t = _logits(7), _logits(8)
    y = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
    ce = cross_entropy(s, y)
    kl = kl_divergence(s, t, 2.0).sum()
    got_ce, parts = distillation_loss(s, None, y, "ce")
    assert torch.equal(got_ce, ce) and set(parts) == {"ce"}
    got_kl, parts = distillation_loss(s, t, y, "kl", temperature=2.0)
    assert torch.equal(got_kl, kl)
    agree = (s.argmax(-1) == t.argmax(-1)).sum()
    assert parts["top1_agreement"] == agree and torch.equal(parts["ce"], ce) and torch.equal(parts["kl"], kl)
    got_mix, _ = distillation_loss(s, t, y, "mix", kl_weight=0.25, temperature=2.0)
    assert torch.allclose(got_mix, 0.75 * ce + 0.25 * kl)


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ in shape"):
        kl_divergence(_logits(0), _logits(1)[:, :3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_divergence(_logits(0), _logits(1), 0.0)


@pytest.mark.parametrize("loss, kl_weight", [("kl", 0.5), ("mix", 1.0)])
def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradient(loss, kl_weight):
    torch.manual_seed(0)
    student = Transformer(FLAVORS["debug"].with_(n_layers=2))
    student.init_weights(1)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = teacher(x)
    total, parts = distillation_loss(student(x), t, x, loss, kl_weight=kl_weight, temperature=2.0)
    total.backward()
    assert total.item() == 0.0 and parts["kl"].item() == 0.0 and parts["top1_agreement"].item() == x.numel()
    nonzero = [n for n, p in student.named_parameters() if not torch.equal(p.grad, torch.zeros_like(p))]
    assert not nonzero, f"gradients not exactly zero: {nonzero}"
