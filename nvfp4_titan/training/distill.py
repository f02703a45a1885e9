"""Quantization-aware distillation (QAD): the NVFP4 QAT student learns the frozen float
teacher's output distribution instead of (or beside) the labels.

Loss per position: ``KL(p_T || p_S) * T**2`` with ``p = softmax(logits / T)``, Hinton et al.
(arXiv 1503.02531) as NVIDIA ModelOpt's ``LogitsDistillationLoss`` computes it
(``modelopt/torch/distill/losses.py``: ``kl_div(log_softmax(s / T), softmax(t / T)) * T**2``),
summed over the vocabulary and, like the cross-entropy, over positions; the trainer divides by
the global batch's tokens (ModelOpt's default ``reduction="mean"`` also divides by the
vocabulary size, which only rescales the learning rate). NVIDIA's QAD report (arXiv
2601.20088) trains NVFP4 students this way against the BF16 teacher.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from nvfp4_titan.data.packing import IGNORE
from nvfp4_titan.training.loss import cross_entropy

DistillLoss = Literal["ce", "kl", "mix"]


# Rows (positions) per chunk of the KL: its fp32 [rows, vocab] temporaries stay at a few hundred
# MB however many positions a step has (one 1B step of 8,192 positions x 128k vocabulary held
# four fp32 [8192, 128256] tensors, 4.2 GB each, and saved one for backward).
KL_CHUNK_ROWS = 1024


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def _kl_grad_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad: torch.Tensor) -> torch.Tensor:
    q = F.log_softmax(student.float() / temperature, dim=-1).exp_()
    p = F.log_softmax(teacher.float() / temperature, dim=-1).exp_()
    return (grad[:, None] * temperature * q.sub_(p)).to(student.dtype)


class _KLDivergence(torch.autograd.Function):
    """Per-position KL(p_T || p_S) * T**2 of logits [N, V]; the gradient w.r.t. the student
    logits is ``T * (p_S - p_T)`` per position, written out so that a student equal to its
    teacher gets a gradient of exactly zero (autograd's log_softmax backward leaves rounding
    residue of the order of 1e-8 there). Computed ``chunk_rows`` positions at a time, in forward
    and again in backward from the saved logits: no [N, V] fp32 tensor is kept (each row's
    values are those of the whole-tensor computation, row operations being independent)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_rows: int):
        kl = torch.cat(
            [_kl_rows(s, t, temperature) for s, t in zip(student.split(chunk_rows), teacher.split(chunk_rows))]
        )
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        n, t = ctx.chunk_rows, ctx.temperature
        grad_student = torch.empty_like(student)
        for i in range(0, student.shape[0], n):
            grad_student[i : i + n] = _kl_grad_rows(student[i : i + n], teacher[i : i + n], t, grad[i : i + n])
        return grad_student, None, None, None


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = KL_CHUNK_ROWS,
) -> torch.Tensor:
    """KL(teacher || student) * temperature**2 per position: logits [B, S, V] (any float dtype,
    computed in fp32, ``chunk_rows`` positions at a time) -> [B*S] fp32 nats. Differentiable in
    the student only.

    Raises:
        ValueError: shapes differ, or temperature <= 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _KLDivergence.apply(
        student_logits.flatten(0, 1), teacher_logits.detach().flatten(0, 1), temperature, chunk_rows
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    loss: DistillLoss,
    kl_weight: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss summed over the counted positions of the B*S (0-dim fp32) and its
    detached parts (sums: ``ce``, ``kl``, ``top1_agreement`` = positions whose argmax equals the
    teacher's).

    ``loss``: ce (labels only; ``teacher_logits`` may be None), kl (the teacher only), mix
    (``(1 - kl_weight) * ce + kl_weight * kl``). Logits [B, S, V], labels [B, S] int64; a label
    ``IGNORE`` (a prompt, padding) drops its position from every term.
    """
    ce = cross_entropy(student_logits, labels)
    if loss == "ce":
        return ce, {"ce": ce.detach()}
    counted = (labels != IGNORE).flatten()  # the positions the cross-entropy counts
    kl = (kl_divergence(student_logits, teacher_logits, temperature) * counted).sum()
    with torch.no_grad():
        agree = ((student_logits.argmax(-1) == teacher_logits.argmax(-1)).flatten() & counted).sum().float()
    parts = {"ce": ce.detach(), "kl": kl.detach(), "top1_agreement": agree}
    if loss == "kl":
        return kl, parts
    return (1 - kl_weight) * ce + kl_weight * kl, parts


def teacher_fingerprint(path: Path) -> str:
    """sha256 over the teacher's weight files (relative names and bytes, sorted): a Hugging Face
    folder's config.json and *.safetensors, or a DCP step's .metadata and *.distcp. A resumed run
    checks it against the one its checkpoint recorded. Reads every byte once (~1 s per GB)."""
    files = sorted(
        [
            *path.glob("*.safetensors"),
            *path.glob("*.distcp"),
            *[path / n for n in ("config.json", ".metadata") if (path / n).is_file()],
        ]
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
