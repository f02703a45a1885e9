"""NVFP4 quantization-aware training: ``NVFP4QATLinear``, prepare, calibrate, convert.

The QAT forward quantizes weight and input with the reference numerics and runs the same
emulated GEMM as the converted ``NVFP4Linear``: prepare-vs-convert outputs are bit-identical.
Backward is a straight-through estimator over the fake-quantized operands:
grad_x = grad_y @ dq(W), grad_W = grad_y^T @ dq(x), from packed codes saved in forward.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial
from torch.nn.modules import module as _module

from nvfp4 import kernels
from nvfp4.format import (
    BLOCK_SIZE,
    NVFP4,
    TENSOR_SCALE_MODES,
    TensorScaleMode,
    dequantize,
    dequantize_all,
    operand_dtype,
    quantize_for_gemm,
    quantize_operands,
    quantize_with_scale,
    tensor_scale,
)
from nvfp4.fsdp_tensors import NVFP4GatheredWeight, NVFP4TrainingWeight
from nvfp4.inference import NVFP4Linear, prescales_weight, scaled_matmul, weight_operands
from nvfp4.sharded import (
    global_abs_max,
    global_amax_and_scale,
    global_amaxes_and_scales,
    input_grad_placement,
    local,
    output_placement,
)

ACTIVATION_SCALES = ("dynamic", "static", "none")
_UNCALIBRATED = -1.0  # input_amax before calibration; real amaxes are >= 0


@dataclass(frozen=True)
class QATConfig:
    """What to quantize and how. One config drives prepare, convert and export."""

    include: tuple[str, ...] = ("*",)
    """fnmatch patterns of module names (``layers.0.attention.wq``) of nn.Linears to quantize."""
    exclude: tuple[str, ...] = ("output", "lm_head", "*.output", "*.lm_head")
    """Patterns kept in high precision even if included (default: the output head)."""
    activation_scale: Literal["dynamic", "static", "none"] = "dynamic"
    """dynamic: input tensor scale from each input's amax. static: from an amax calibrated
    over batches (``calibrate``), frozen, and exported as ``input_scale``. none: weight-only
    (W4A16): inputs stay in high precision."""
    tensor_scale: TensorScaleMode = "pow2"
    """pow2: per-tensor scale rounded up to a power of two (decodes identically in every
    engine). amax: amax / 2688, as torchao and ModelOpt PTQ."""
    share_fused_amax: bool = True
    """Give the linears that engines fuse (q/k/v, gate/up) one weight amax, as engines assume."""

    def __post_init__(self) -> None:
        if self.activation_scale not in ACTIVATION_SCALES:
            raise ValueError(
                f"activation_scale={self.activation_scale!r}: use one of {ACTIVATION_SCALES}"
            )
        if self.tensor_scale not in TENSOR_SCALE_MODES:
            raise ValueError(f"tensor_scale={self.tensor_scale!r}: use one of {TENSOR_SCALE_MODES}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def selects(self, name: str) -> bool:
        match = lambda pats: any(fnmatch.fnmatchcase(name, p) for p in pats)  # noqa: E731
        return match(self.include) and not match(self.exclude)


def _forward(x, weights, bias, x_scale, w_scale, pow2_scales) -> list[torch.Tensor]:
    """y_i = (q(x) @ q(W_i).T) * scales (+ b: one weight only) for weights sharing one input and
    one tensor scale; x is quantized once. Returns [y_1..y_n, x packed, x block scales, then
    each W_i's packed and block scales]: the packed operands are saved for backward."""
    scale = x_scale * w_scale  # the weights share their tensor scale
    prescaled = prescales_weight(x, x.dtype, bias, pow2_scales)
    if isinstance(weights[0], NVFP4GatheredWeight):  # NVFP4 all-gather: quantized before gathering
        ((xq, x_op),) = quantize_operands([(x, x_scale)])
        wqs = [w.nvfp4 for w in weights]
        w_ops = weight_operands(wqs, scale, prescaled, operand_dtype(x.device))
    else:  # the input and the weights, four per launch on CUDA
        op_scales = [None] + [scale if prescaled else None] * len(weights)
        (xq, x_op), *w_pairs = quantize_operands([(x, x_scale)] + [(w, w_scale) for w in weights], op_scales=op_scales)
        wqs, w_ops = [q for q, _ in w_pairs], [op for _, op in w_pairs]
    ys = [scaled_matmul(x_op, w_op, None if prescaled else scale, bias, x.dtype) for w_op in w_ops]
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
    def forward(ctx: Any, x, bias, x_scale, w_scale, pow2_scales, *weights):  # type: ignore[override]
        outputs = _forward(x, weights, bias, x_scale, w_scale, pow2_scales)
        _save(ctx, x_scale, w_scale, bias, weights[0].dtype, outputs, len(weights))
        return tuple(outputs[:len(weights)])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:  # type: ignore[override]
        backward = _qat_linear_backward if torch.compiler.is_compiling() else _backward_impl
        grad_x, grad_b, *grad_ws = backward(list(grads), list(ctx.saved_tensors), ctx.w_dtype, ctx.has_bias)
        return grad_x, grad_b if ctx.has_bias else None, None, None, None, *grad_ws


# Under torch.compile without the Triton kernels (the reference quantizer), or with a bias, the
# QAT GEMM is a custom op with its own autograd: one opaque node, so that Inductor can neither
# reorder the reference's fp32 arithmetic nor contract the scale and the bias into one fma.
@torch.library.custom_op("nvfp4::qat_linear", mutates_args=())
def _qat_linear(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, x_scale: torch.Tensor,
    w_scale: torch.Tensor, pow2_scales: bool,
) -> list[torch.Tensor]:
    return _forward(x, weights, bias, x_scale, w_scale, pow2_scales)


@_qat_linear.register_fake
def _(x, weights, bias, x_scale, w_scale, pow2_scales):
    k, lead = x.shape[-1], x.shape[:-1]
    ys = [x.new_empty(*lead, w.shape[0]) for w in weights]
    packed = [(w.new_empty(w.shape[0], k // 2, dtype=torch.uint8),
               w.new_empty(w.shape[0], k // BLOCK_SIZE, dtype=torch.float8_e4m3fn)) for w in weights]
    return [*ys, x.new_empty(*lead, k // 2, dtype=torch.uint8),
            x.new_empty(*lead, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn), *(t for p in packed for t in p)]


@torch.library.custom_op("nvfp4::qat_linear_backward", mutates_args=())
def _qat_linear_backward(
    grad_ys: list[torch.Tensor], saved: list[torch.Tensor], w_dtype: torch.dtype, has_bias: bool,
) -> list[torch.Tensor]:
    return _backward_impl(grad_ys, saved, w_dtype, has_bias)


@_qat_linear_backward.register_fake
def _(grad_ys, saved, w_dtype, has_bias):
    x_packed, w_packed = saved[0], saved[4::2]
    k = x_packed.shape[-1] * 2
    grad_b = grad_ys[0].new_empty(grad_ys[0].shape[-1] if has_bias else 0)
    return [grad_ys[0].new_empty(*x_packed.shape[:-1], k), grad_b,
            *(grad_ys[0].new_empty(w.shape[0], k, dtype=w_dtype) for w in w_packed)]


def _op_setup_context(ctx: Any, inputs: tuple, output: list) -> None:
    _, weights, bias, x_scale, w_scale, _ = inputs
    n = len(weights)
    _save(ctx, x_scale, w_scale, bias, weights[0].dtype, output, n)
    ctx.set_materialize_grads(False)  # no zero gradients for the packed outputs
    ctx.y_like = [(y.shape, y.dtype, y.device) for y in output[:n]]


def _op_backward(ctx: Any, grads: list) -> tuple:
    grad_ys = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g  # an unused y_i's gradient
               for g, (shape, dtype, device) in zip(grads, ctx.y_like)]
    grad_x, grad_b, *grad_ws = _qat_linear_backward(grad_ys, list(ctx.saved_tensors), ctx.w_dtype, ctx.has_bias)
    return grad_x, grad_ws, grad_b if ctx.has_bias else None, None, None, None


_qat_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


@torch.library.custom_op("nvfp4::fake_quantize_weight", mutates_args=())
def _fake_quantize_weight(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """dq(q(W)) in W's dtype; a custom op so that torch.compile does not trace its kernels."""
    return dequantize(quantize_for_gemm(w, w_scale, operand=False)[0], w.dtype)


@_fake_quantize_weight.register_fake
def _(w, w_scale):
    return torch.empty_like(w)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (exact values); backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if isinstance(w, NVFP4GatheredWeight):
            return dequantize(w.nvfp4, w.dtype)
        return _fake_quantize_weight(w, w_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        return grad, None


def qat_linear(
    x, weights: list[torch.Tensor], bias, x_scale, w_scale, pow2_scales: bool, recomputed: bool = False,
) -> list[torch.Tensor]:
    """[y_1..y_n] of ``_forward`` with the straight-through backward.

    ``recomputed``: the call lies in an activation-checkpointed region. Under torch.compile it
    then runs as the opaque ``nvfp4::qat_linear``, one node that the partitioner recomputes in
    backward as the checkpoint asks. Traced through ``_QATLinearFn`` instead, its GEMM outputs
    and packed operands were saved whatever the checkpoint said (torch 2.11: the nodes of a traced
    autograd.Function carry no recompute tag), so checkpointing freed nothing under QAT.
    Outside checkpointed regions ``_QATLinearFn`` is kept: about 7% faster per step (1B, H200)."""
    if torch.compiler.is_compiling() and (recomputed or bias is not None or not kernels.op_enabled(x)):
        return _qat_linear(x, weights, bias, x_scale, w_scale, pow2_scales)[:len(weights)]
    return list(_QATLinearFn.apply(x, bias, x_scale, w_scale, pow2_scales, *weights))


class NVFP4QATLinear(nn.Linear):
    """nn.Linear that fake-quantizes its weight and input to NVFP4 on every forward.

    ``input_amax`` (fp32 buffer, checkpointed) holds the calibrated activation amax in
    static mode; -1 until calibrated. Members of a fused group (q/k/v, gate/up) share one
    weight amax: the max over the group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: QATConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config or QATConfig()
        self.register_buffer(
            "input_amax", torch.full((), _UNCALIBRATED, dtype=torch.float32, device=device)
        )
        self.amax_peers: tuple[NVFP4QATLinear, ...] = ()  # other members of the fused group
        self.last_input_amax: torch.Tensor | None = None  # dynamic mode, for metrics
        self.enabled = True  # False: a plain linear (training in float before QAT starts)
        self.calibrating = False
        self._calibrated = False
        self._same_input_amax: bool | None = None  # static: as the fused group's peers (forward_shared)
        self.recomputed = False  # in an activation-checkpointed region (see qat_linear)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> NVFP4QATLinear:
        """Wrap ``linear``'s own parameters (no copy; works on the meta device)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            config=config,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.input_amax = torch.full((), _UNCALIBRATED, device=linear.weight.device)
        return new

    def reset_calibration(self) -> None:
        """Forget the calibrated input amax (also needed after materializing from meta)."""
        self.input_amax.fill_(_UNCALIBRATED)
        self._calibrated = False
        self._same_input_amax = None

    def weight_amax(self) -> torch.Tensor:
        """max |W| over this weight and its fused-group peers, over all their shards."""
        return global_abs_max(self.weight, *(p.weight for p in self.amax_peers))

    def weight_scale(self) -> torch.Tensor:
        """The per-tensor scale of ``weight_amax``."""
        peers = (p.weight for p in self.amax_peers)
        return global_amax_and_scale(self.weight, *peers, mode=self.config.tensor_scale)[1]

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.config.tensor_scale
        if self.config.activation_scale == "dynamic" or self.calibrating:
            a, s = global_amax_and_scale(x, mode=mode)
            self.last_input_amax = a
            if self.calibrating:
                self.input_amax.copy_(torch.maximum(self.input_amax, a))
            return s
        if not self._calibrated:
            if float(self.input_amax) < 0:  # one host sync per module lifetime
                raise RuntimeError(
                    "static activation scale used before calibration: run "
                    "nvfp4.calibrate(model, batches) or load a calibrated checkpoint"
                )
            self._calibrated = True
        return tensor_scale(self.input_amax, mode)

    @property
    def _pow2(self) -> bool:
        return self.config.tensor_scale == "pow2"

    def observed_input_amax(self) -> float:
        """The calibrated amax (static) or the last input's (dynamic); 0 before any forward
        or in weight-only mode."""
        if self.config.activation_scale == "static":
            return max(float(self.input_amax), 0.0)
        return 0.0 if self.last_input_amax is None else float(self.last_input_amax)

    def quantized_weight(self) -> NVFP4:
        """The weight (this rank's shard of it) exactly as the forward quantizes it."""
        w = local(self.weight.detach())
        if isinstance(w, NVFP4TrainingWeight):  # NVFP4 all-gather: its high-precision shard
            w = w._tensor
        return quantize_with_scale(w, self.weight_scale())

    def _peers_share_input_amax(self) -> bool:
        """Static mode: whether the fused group's peers hold this calibrated input amax (then
        they share one quantized input). One host sync per calibration."""
        if self._same_input_amax is None:
            self._same_input_amax = all(torch.equal(p.input_amax, self.input_amax) for p in self.amax_peers)
        return self._same_input_amax

    def _gemm_weight_scale(self) -> torch.Tensor:
        """The weight's tensor scale as the forward uses it (the NVFP4 all-gather's, if any)."""
        w = local(self.weight)
        return w.nvfp4.tensor_scale if isinstance(w, NVFP4GatheredWeight) else self.weight_scale()

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input's and the weight's tensor scales for the GEMM; a dynamic input's amax and the
        weights' come from one kernel launch where nothing is sharded."""
        if (self.config.activation_scale != "dynamic" or self.calibrating
                or isinstance(local(self.weight), NVFP4GatheredWeight)):
            return self._input_scale(x), self._gemm_weight_scale()
        weights = (self.weight, *(p.weight for p in self.amax_peers))
        (amax, x_scale), (_, w_scale) = global_amaxes_and_scales([(x,), weights], mode=self.config.tensor_scale)
        self.last_input_amax = amax
        return x_scale, w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        w = self.weight
        if self.config.activation_scale == "none":  # weight-only: F.linear on dq(W), by STE
            w_fq = _StraightThrough.apply(local(w), self._gemm_weight_scale())
            if isinstance(w, DTensor):
                w_fq = DTensor.from_local(w_fq, w.device_mesh, w.placements, run_check=False)
            return nn.functional.linear(x, w_fq, self.bias)
        x_scale, w_scale = self._scales(x)
        if not isinstance(w, DTensor):
            return qat_linear(x, [w], self.bias, x_scale, w_scale, self._pow2, self.recomputed)[0]
        # Tensor parallel: quantize and multiply the local shards (global scales above),
        # then say how the local outputs combine.
        if not isinstance(x, DTensor):
            raise TypeError("tensor-parallel NVFP4 linear expects a DTensor input (apply a TP plan)")
        placements = output_placement(x, w)
        if self.bias is not None and isinstance(placements[0], Partial):
            raise NotImplementedError("rowwise-parallel NVFP4 linear with a bias")
        bias = None if self.bias is None else local(self.bias)
        x_local = x.to_local(grad_placements=input_grad_placement(x, w))
        y = qat_linear(x_local, [w.to_local()], bias, x_scale, w_scale, self._pow2, self.recomputed)[0]
        return DTensor.from_local(y, w.device_mesh, placements, run_check=False)

    @staticmethod
    def forward_shared(linears: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """``[m(x) for m in linears]``, bit for bit; when the linears form one fused group
        (q/k/v, gate/up: shared weight amax, see ``prepare``) x is quantized once and the
        group's weight scale computed once. Anything else (module hooks such as a TP plan's,
        biases, DTensor weights, calibration) takes the per-module path."""
        if not _shares_input(linears):
            return [m(x) for m in linears]
        first = linears[0]
        x_scale, w_scale = first._scales(x)
        for m in linears[1:]:
            m.last_input_amax = first.last_input_amax
        return qat_linear(x, [m.weight for m in linears], None, x_scale, w_scale, first._pow2, first.recomputed)

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, activation_scale={c.activation_scale}, tensor_scale={c.tensor_scale}"


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks (nn.Module.__call__'s own test): forward or backward,
    the module's or global ones. Bypassing __call__ would skip them."""
    return bool(m._backward_hooks or m._backward_pre_hooks or m._forward_hooks or m._forward_pre_hooks
                or _module._global_backward_pre_hooks or _module._global_backward_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks)


def _shares_input(linears: Sequence[nn.Module]) -> bool:
    """Whether ``forward_shared`` may quantize the input once for all of ``linears``."""
    first = linears[0]
    if not (len(linears) > 1 and all(type(m) is NVFP4QATLinear for m in linears)
            and len(first.amax_peers) == len(linears) - 1
            and all(p is m for p, m in zip(first.amax_peers, linears[1:]))):
        return False
    for m in linears:
        if (not m.enabled or m.calibrating or m.bias is not None or m.config != first.config
                or isinstance(m.weight, DTensor) or _has_hooks(m)):
            return False
    act = first.config.activation_scale
    return act == "dynamic" or (act == "static" and first._peers_share_input_amax())  # "none": F.linear each


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def selected_linears(model: nn.Module, config: QATConfig) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model`` that ``config`` quantizes (what
    ``prepare`` swaps); works on the meta device."""
    return [name for name, mod in model.named_modules() if type(mod) is nn.Linear and config.selects(name)]


def prepare(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """Swap the selected ``nn.Linear``s of ``model`` for ``NVFP4QATLinear``s, in place.

    A model may define ``fused_linear_groups() -> list[list[str]]`` naming linears that
    engines fuse; with ``share_fused_amax`` their weights share one amax.
    """
    config = config or QATConfig()
    swapped: dict[str, NVFP4QATLinear] = {}
    for name in selected_linears(model, config):
        mod = model.get_submodule(name)
        if mod.in_features % BLOCK_SIZE:
            raise ValueError(
                f"{name}: in_features={mod.in_features} is not a multiple of {BLOCK_SIZE}; "
                f"NVFP4 blocks run along it. Exclude the layer with QATConfig.exclude"
            )
        swapped[name] = NVFP4QATLinear.from_linear(mod, config)
        _swap(model, name, swapped[name])
    groups = getattr(model, "fused_linear_groups", lambda: [])()
    if config.share_fused_amax:
        for group in groups:
            members = [swapped[n] for n in group if n in swapped]
            for m in members:
                m.amax_peers = tuple(p for p in members if p is not m)
    return model


def qat_linears(model: nn.Module) -> list[NVFP4QATLinear]:
    return [m for m in model.modules() if isinstance(m, NVFP4QATLinear)]


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization on or off in every QAT linear (parameters are unchanged)."""
    for m in qat_linears(model):
        if not enabled and isinstance(local(m.weight), (NVFP4TrainingWeight, NVFP4GatheredWeight)):
            raise ValueError("QAT cannot be switched off while weights are all-gathered as NVFP4")
        m.enabled = enabled


def needs_calibration(model: nn.Module) -> bool:
    """True if a static-mode QAT linear has no calibrated input amax yet (one host sync)."""
    static = [m.input_amax for m in qat_linears(model) if m.config.activation_scale == "static"]
    return bool(static) and bool((torch.stack([local(a) for a in static]) < 0).any())


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], group: dist.ProcessGroup | None = None
) -> int:
    """Set the static input amax of every QAT linear to the max over ``batches``.

    Each batch is passed as ``model(batch)``. Under torch.distributed the amax is also
    the max over all ranks of ``group`` (default: the world). Returns the batch count.
    """
    layers = [m for m in qat_linears(model) if m.config.activation_scale == "static"]
    for m in layers:
        m.input_amax.zero_()
        m.calibrating = True
    n = 0
    try:
        for batch in batches:
            model(batch)
            n += 1
    finally:
        for m in layers:
            m.calibrating = False
    if n == 0:
        raise ValueError("calibrate got no batches")
    if layers and dist.is_available() and dist.is_initialized():
        amaxes = torch.stack([m.input_amax for m in layers])
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
        for m, a in zip(layers, amaxes):
            m.input_amax.copy_(a)
    for m in layers:
        m._calibrated = True
        m._same_input_amax = None
        m._peers_share_input_amax()  # now, not in the first (compiled) forward
    return n


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Swap every ``NVFP4QATLinear`` for an ``NVFP4Linear`` holding its quantized weight."""
    qat = {name: m for name, m in model.named_modules() if isinstance(m, NVFP4QATLinear)}
    # Quantize all before swapping anything: fused peers must still see each other's weights.
    converted = {}
    for name, m in qat.items():
        static = m.config.activation_scale == "static"
        if static and float(m.input_amax) < 0:
            raise RuntimeError(f"{name}: static activation scale is not calibrated; run calibrate")
        converted[name] = NVFP4Linear(
            m.quantized_weight(),
            bias=None if m.bias is None else m.bias.detach().clone(),
            input_scale=tensor_scale(m.input_amax, m.config.tensor_scale) if static else None,
            tensor_scale_mode=m.config.tensor_scale,
            weight_only=m.config.activation_scale == "none",
        )
    for name, new in converted.items():
        _swap(model, name, new)
    return model
