"""The QAT linear's autograd: the forward quantizes weight and input with the reference numerics
and runs the emulated GEMM that the converted ``NVFP4Linear`` runs (prepare-vs-convert outputs are
bit-identical); backward is a straight-through estimator over the fake-quantized operands:
grad_x = grad_y @ dq(W), grad_W = grad_y^T @ dq(x), from packed codes saved in forward. Eager and
under torch.compile (``qat_linear`` picks the traced or the opaque path)."""

from __future__ import annotations

from typing import Any

import torch

from nvfp4 import kernels
from nvfp4.format import (
    BLOCK_SIZE,
    NVFP4,
    dequantize,
    dequantize_all,
    operand_dtype,
    quantize_for_gemm,
    quantize_operands,
)
from nvfp4.fsdp_tensors import NVFP4GatheredWeight
from nvfp4.gemm import prescales_weight, scaled_matmul, weight_operands


def _forward(x, weights, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule) -> list[torch.Tensor]:
    """y_i = (q(x) @ q(W_i).T) * scales (+ b: one weight only) for weights sharing one input and
    one tensor scale; x is quantized once (block amax to 6), the weights by ``block_scale_rule``.
    Returns [y_1..y_n, x packed, x block scales, then each W_i's packed and block scales]: the
    packed operands are saved for backward."""
    scale = x_scale * w_scale  # the weights share their tensor scale
    prescaled = prescales_weight(x, x.dtype, bias, tensor_scale_mode)
    if isinstance(weights[0], NVFP4GatheredWeight):  # NVFP4 all-gather: quantized before gathering
        ((xq, x_operand),) = quantize_operands([(x, x_scale)])
        wqs = [w.nvfp4 for w in weights]
        w_operands = weight_operands(wqs, scale, prescaled, operand_dtype(x.device))
    else:  # the input and the weights, four per launch on CUDA
        operand_scales = [None] + [scale if prescaled else None] * len(weights)
        (xq, x_operand), *w_pairs = quantize_operands(
            [(x, x_scale)] + [(w, w_scale) for w in weights],
            operand_scales=operand_scales,
            block_scale_rules=["amax"] + [block_scale_rule] * len(weights),
        )
        wqs, w_operands = [q for q, _ in w_pairs], [operand for _, operand in w_pairs]
    ys = [scaled_matmul(x_operand, w_operand, None if prescaled else scale, bias, x.dtype) for w_operand in w_operands]
    return [*ys, xq.packed, xq.block_scale, *(t for q in wqs for t in (q.packed, q.block_scale))]


def _backward_impl(grad_ys, saved, w_dtype, has_bias) -> list[torch.Tensor]:
    """Straight-through estimator: grad_x = sum_i gy_i @ dq(W_i), grad_W_i = gy_i^T @ dq(x),
    grad_b = sum gy (an empty tensor without a bias). Returns [grad_x, grad_b, grad_W_1..n]."""
    x_packed, x_block, x_scale, w_scale, *w_parts = saved
    ws = [NVFP4(p, b, w_scale) for p, b in zip(w_parts[0::2], w_parts[1::2])]
    *w_dqs, x_dq = dequantize_all([*ws, NVFP4(x_packed, x_block, x_scale)], grad_ys[0].dtype)
    x_dq = x_dq.reshape(-1, x_dq.shape[-1])
    gys = [gy.reshape(-1, gy.shape[-1]) for gy in grad_ys]  # [M, N_i]
    grad_x = None
    for gy, w_dq in zip(gys[::-1], w_dqs[::-1]):  # summed as autograd sums separate linears': last first
        grad_x = gy @ w_dq if grad_x is None else grad_x.add_(gy @ w_dq)
    grad_ws = [(gy.t() @ x_dq).to(w_dtype) for gy in gys]
    grad_b = gys[0].sum(0) if has_bias else gys[0].new_empty(0)
    return [grad_x.reshape(*x_packed.shape[:-1], -1), grad_b, *grad_ws]


def _save(ctx: Any, x_scale, w_scale, bias, w_dtype, outputs: list, n: int) -> None:
    """What backward needs from the forward of ``n`` weights (both autograd paths)."""
    xp, xb, *w_parts = outputs[n:]
    ctx.save_for_backward(xp, xb, x_scale, w_scale, *w_parts)  # packed: 4.5 bits per element
    ctx.has_bias, ctx.w_dtype = bias is not None, w_dtype


class _QATLinearFn(torch.autograd.Function):
    """Returns [y_1..y_n]. Eager, and traced by torch.compile where the Triton kernels run: the
    forward's amax and quantize kernels are triton_ops there, launched by Inductor; the backward
    is the opaque ``nvfp4::qat_linear_backward`` (Inductor failed to compile the dequantize kernel
    as a triton_op in some backward graphs, and this way the input gradient's sum keeps eager's
    rounding). ``forward`` takes ctx itself (no ``setup_context``): ``apply`` would bind the
    arguments through ``inspect.signature`` on every call."""

    @staticmethod
    def forward(ctx: Any, x, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule, *weights):  # type: ignore[override]
        outputs = _forward(x, weights, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule)
        _save(ctx, x_scale, w_scale, bias, weights[0].dtype, outputs, len(weights))
        return tuple(outputs[: len(weights)])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        backward = _qat_linear_backward if torch.compiler.is_compiling() else _backward_impl
        grad_x, grad_b, *grad_ws = backward(list(grads), list(ctx.saved_tensors), ctx.w_dtype, ctx.has_bias)
        return grad_x, grad_b if ctx.has_bias else None, None, None, None, None, *grad_ws


# Under torch.compile without the Triton kernels (the reference quantizer), or with a bias, the
# QAT GEMM is a custom op with its own autograd: one opaque node, so that Inductor can neither
# reorder the reference's fp32 arithmetic nor contract the scale and the bias into one fma.
@torch.library.custom_op("nvfp4::qat_linear", mutates_args=())
def _qat_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    tensor_scale_mode: str,
    block_scale_rule: str,
) -> list[torch.Tensor]:
    return _forward(x, weights, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule)


@_qat_linear.register_fake
def _(x, weights, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule):
    k, lead = x.shape[-1], x.shape[:-1]
    ys = [x.new_empty(*lead, w.shape[0]) for w in weights]
    packed = [
        (
            w.new_empty(w.shape[0], k // 2, dtype=torch.uint8),
            w.new_empty(w.shape[0], k // BLOCK_SIZE, dtype=torch.float8_e4m3fn),
        )
        for w in weights
    ]
    return [
        *ys,
        x.new_empty(*lead, k // 2, dtype=torch.uint8),
        x.new_empty(*lead, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn),
        *(t for p in packed for t in p),
    ]


@torch.library.custom_op("nvfp4::qat_linear_backward", mutates_args=())
def _qat_linear_backward(
    grad_ys: list[torch.Tensor],
    saved: list[torch.Tensor],
    w_dtype: torch.dtype,
    has_bias: bool,
) -> list[torch.Tensor]:
    return _backward_impl(grad_ys, saved, w_dtype, has_bias)


@_qat_linear_backward.register_fake
def _(grad_ys, saved, w_dtype, has_bias):
    x_packed, w_packed = saved[0], saved[4::2]
    k = x_packed.shape[-1] * 2
    grad_b = grad_ys[0].new_empty(grad_ys[0].shape[-1] if has_bias else 0)
    return [
        grad_ys[0].new_empty(*x_packed.shape[:-1], k),
        grad_b,
        *(grad_ys[0].new_empty(w.shape[0], k, dtype=w_dtype) for w in w_packed),
    ]


def _op_setup_context(ctx: Any, inputs: tuple, output: list) -> None:
    _, weights, bias, x_scale, w_scale, _, _ = inputs
    n = len(weights)
    _save(ctx, x_scale, w_scale, bias, weights[0].dtype, output, n)
    ctx.set_materialize_grads(False)  # no zero gradients for the packed outputs
    ctx.y_like = [(y.shape, y.dtype, y.device) for y in output[:n]]


def _op_backward(ctx: Any, grads: list) -> tuple:
    grad_ys = [
        torch.zeros(shape, dtype=dtype, device=device) if g is None else g  # an unused y_i's gradient
        for g, (shape, dtype, device) in zip(grads, ctx.y_like)
    ]
    grad_x, grad_b, *grad_ws = _qat_linear_backward(grad_ys, list(ctx.saved_tensors), ctx.w_dtype, ctx.has_bias)
    return grad_x, grad_ws, grad_b if ctx.has_bias else None, None, None, None, None


_qat_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


@torch.library.custom_op("nvfp4::fake_quantize_weight", mutates_args=())
def _fake_quantize_weight(w: torch.Tensor, w_scale: torch.Tensor, block_scale_rule: str) -> torch.Tensor:
    """dq(q(W)) in W's dtype; a custom op so that torch.compile does not trace its kernels."""
    return dequantize(quantize_for_gemm(w, w_scale, with_operand=False, block_scale_rule=block_scale_rule)[0], w.dtype)


@_fake_quantize_weight.register_fake
def _(w, w_scale, block_scale_rule):
    return torch.empty_like(w)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (exact values); backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, w_scale: torch.Tensor, block_scale_rule: str) -> torch.Tensor:  # type: ignore[override]
        if isinstance(w, NVFP4GatheredWeight):
            return dequantize(w.nvfp4, w.dtype)
        return _fake_quantize_weight(w, w_scale, block_scale_rule)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        return grad, None, None


def qat_linear(
    x,
    weights: list[torch.Tensor],
    bias,
    x_scale,
    w_scale,
    tensor_scale_mode: str,
    block_scale_rule: str = "amax",
    recomputed: bool = False,
) -> list[torch.Tensor]:
    """[y_1..y_n] of ``_forward`` with the straight-through backward; ``block_scale_rule``: the
    weights' (``QATConfig.block_scale_rule``).

    ``recomputed``: the call lies in an activation-checkpointed region. Under torch.compile it
    then runs as the opaque ``nvfp4::qat_linear``, one node that the partitioner recomputes in
    backward as the checkpoint asks. Traced through ``_QATLinearFn`` instead, its GEMM outputs
    and packed operands were saved whatever the checkpoint said (torch 2.11: the nodes of a traced
    autograd.Function carry no recompute tag), so checkpointing freed nothing under QAT.
    Outside checkpointed regions ``_QATLinearFn`` is kept: about 7% faster per step (1B, H200)."""
    if torch.compiler.is_compiling() and (recomputed or bias is not None or not kernels.use_triton_op(x)):
        return _qat_linear(x, weights, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule)[: len(weights)]
    return list(_QATLinearFn.apply(x, bias, x_scale, w_scale, tensor_scale_mode, block_scale_rule, *weights))
