"""``NVFP4QATLinear``: the nn.Linear that fake-quantizes its weight and input on every forward."""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial
from torch.nn.modules import module as _module

from nvfp4.format import (
    NVFP4,
    quantize_with_scale,
    tensor_scale,
)
from nvfp4.fsdp_tensors import NVFP4GatheredWeight, NVFP4TrainingWeight
from nvfp4.qat.autograd import _StraightThrough, qat_linear
from nvfp4.qat.config import QATConfig
from nvfp4.sharded import (
    global_amax,
    global_amax_and_scale,
    global_amaxes_and_scales,
    input_grad_placement,
    local,
    output_placement,
)

_UNCALIBRATED = -1.0  # input_amax before calibration; real amaxes are >= 0


class NVFP4QATLinear(nn.Linear):
    """nn.Linear that fake-quantizes its weight and input to NVFP4 on every forward.

    ``input_amax`` (fp32 buffer, checkpointed) holds the calibrated activation amax in
    static mode; -1 until calibrated. Members of a fused group (q/k/v, gate/up) share one
    weight amax: the max over the group.
    """

    uncalibrated_fix = "run nvfp4.calibrate(model, batches) or load a calibrated checkpoint"
    """What the error of a static-mode forward before calibration tells the user to do."""

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
        self.register_buffer("input_amax", torch.full((), _UNCALIBRATED, dtype=torch.float32, device=device))
        self.amax_peers: tuple[NVFP4QATLinear, ...] = ()  # other members of the fused group
        self.last_input_amax: torch.Tensor | None = None  # dynamic tensor_scale_mode, for metrics
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
        return global_amax(self.weight, *(p.weight for p in self.amax_peers))

    def weight_scale(self) -> torch.Tensor:
        """The per-tensor scale of ``weight_amax``."""
        peers = (p.weight for p in self.amax_peers)
        c = self.config
        return global_amax_and_scale(
            self.weight, *peers, tensor_scale_mode=c.tensor_scale, block_scale_rule=c.block_scale_rule
        )[1]

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        tensor_scale_mode = self.config.tensor_scale
        if self.config.activation_scale == "dynamic" or self.calibrating:
            a, s = global_amax_and_scale(x, tensor_scale_mode=tensor_scale_mode)
            self.last_input_amax = a
            if self.calibrating:
                self.input_amax.copy_(torch.maximum(self.input_amax, a))
            return s
        if not self._calibrated:
            if float(self.input_amax) < 0:  # one host sync per module lifetime
                raise RuntimeError(f"static activation scale used before calibration: {self.uncalibrated_fix}")
            self._calibrated = True
        return tensor_scale(self.input_amax, tensor_scale_mode)

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
        return quantize_with_scale(w, self.weight_scale(), self.config.block_scale_rule)

    def _peers_share_input_amax(self) -> bool:
        """Static tensor_scale_mode: whether the fused group's peers hold this calibrated input amax (then
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
        if (
            self.config.activation_scale != "dynamic"
            or self.calibrating
            or isinstance(local(self.weight), NVFP4GatheredWeight)
        ):
            return self._input_scale(x), self._gemm_weight_scale()
        weights = (self.weight, *(p.weight for p in self.amax_peers))
        (amax, x_scale), (_, w_scale) = global_amaxes_and_scales(
            [(x,), weights], self.config.tensor_scale, ["amax", self.config.block_scale_rule]
        )
        self.last_input_amax = amax
        return x_scale, w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        w = self.weight
        if self.config.activation_scale == "none":  # weight-only: F.linear on dq(W), by STE
            w_fq = _StraightThrough.apply(local(w), self._gemm_weight_scale(), self.config.block_scale_rule)
            if isinstance(w, DTensor):
                w_fq = DTensor.from_local(w_fq, w.device_mesh, w.placements, run_check=False)
            return nn.functional.linear(x, w_fq, self.bias)
        x_scale, w_scale = self._scales(x)
        c = self.config
        if not isinstance(w, DTensor):
            return qat_linear(x, [w], self.bias, x_scale, w_scale, c.tensor_scale, c.block_scale_rule, self.recomputed)[
                0
            ]
        # Tensor parallel: quantize and multiply the local shards (global scales above),
        # then say how the local outputs combine.
        if not isinstance(x, DTensor):
            raise TypeError("tensor-parallel NVFP4 linear expects a DTensor input (apply a TP plan)")
        placements = output_placement(x, w)
        if self.bias is not None and isinstance(placements[0], Partial):
            raise NotImplementedError("rowwise-parallel NVFP4 linear with a bias")
        bias = None if self.bias is None else local(self.bias)
        x_local = x.to_local(grad_placements=input_grad_placement(x, w))
        y = qat_linear(
            x_local, [w.to_local()], bias, x_scale, w_scale, c.tensor_scale, c.block_scale_rule, self.recomputed
        )[0]
        return DTensor.from_local(y, w.device_mesh, placements, run_check=False)

    @staticmethod
    def forward_shared(linears: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """``[m(x) for m in linears]``, bit for bit; when the linears form one fused group
        (q/k/v, gate/up: shared weight amax, see ``prepare``) x is quantized once and the
        group's weight scale computed once (one all-reduce under tensor parallelism). Under a TP
        plan the modules' layout hooks run around the shared forward (``_layout_hooks_only``).
        Anything else (other module hooks, a forward replaced on the instance, biases, calibration,
        weights of different placements) takes the per-module path."""
        if not _shares_input(linears):
            return [m(x) for m in linears]
        args = [_run_pre_hooks(m, (x,)) for m in linears]  # the TP plan's input layouts (or (x,))
        x = args[0][0]
        if all(len(a) == 1 and a[0] is x for a in args) and _shares_operands(linears[0], x):
            ys = _forward_group(linears, x)
        else:  # the hooks gave the linears different inputs: each its own forward
            ys = [m.forward(*a) for m, a in zip(linears, args)]
        return [_run_post_hooks(m, a, y) for m, a, y in zip(linears, args, ys)]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, activation_scale={c.activation_scale}, tensor_scale={c.tensor_scale}, "
            f"block_scale_rule={c.block_scale_rule}"
        )


def _forward_group(linears: Sequence[NVFP4QATLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """``[m.forward(x) for m in linears]`` for a fused group that ``_shares_input`` and
    ``_shares_operands`` accept: x quantized once, the group's weight scale (and under TP its
    all-reduce) computed once, one QAT call. Under TP every linear multiplies the same local x by
    its local weight shard, exactly as ``NVFP4QATLinear.forward`` does for one weight."""
    first = linears[0]
    x_scale, w_scale = first._scales(x)
    for m in linears[1:]:
        m.last_input_amax = first.last_input_amax
    weights = [m.weight for m in linears]
    w, c = weights[0], first.config
    if not isinstance(w, DTensor):
        return qat_linear(x, weights, None, x_scale, w_scale, c.tensor_scale, c.block_scale_rule, first.recomputed)
    placements = output_placement(x, w)
    x_local = x.to_local(grad_placements=input_grad_placement(x, w))
    local_weights = [v.to_local() for v in weights]
    ys = qat_linear(
        x_local, local_weights, None, x_scale, w_scale, c.tensor_scale, c.block_scale_rule, first.recomputed
    )
    return [DTensor.from_local(y, w.device_mesh, placements, run_check=False) for y in ys]


def _layout_hook_codes() -> frozenset:
    """The code of the forward pre-hooks and forward hooks that torch's ``distribute_module``
    registers: those of a TP plan (``ColwiseParallel`` ...), which only convert the module's input
    and output layouts (``_prepare_input_fn``, ``_prepare_output_fn``) and may run in any order
    relative to other modules' forwards."""
    from torch.distributed.tensor import distribute_module

    code = inspect.unwrap(distribute_module).__code__
    return frozenset(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == "<lambda>")


_LAYOUT_HOOK_CODES = _layout_hook_codes()


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs hooks (nn.Module.__call__'s own test): forward or backward,
    the module's or global ones. Bypassing __call__ would skip them."""
    return bool(
        m._backward_hooks
        or m._backward_pre_hooks
        or m._forward_hooks
        or m._forward_pre_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


def _layout_hooks_only(m: nn.Module) -> bool:
    """Whether the only hooks that calling ``m`` runs are a TP plan's layout hooks (plain forward
    pre-hooks and forward hooks registered by ``distribute_module``; none at all also qualifies),
    so that ``forward_shared`` may run them itself around a shared forward: ``_run_pre_hooks``,
    the forward, ``_run_post_hooks`` are then what ``m(x)`` runs. Any other hook (backward,
    global, with kwargs, always called, or a user's) needs the module's own ``__call__``."""
    if not _has_hooks(m):
        return True
    if (
        m._backward_hooks
        or m._backward_pre_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or m._forward_pre_hooks_with_kwargs
        or m._forward_hooks_with_kwargs
        or m._forward_hooks_always_called
    ):
        return False
    hooks = (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
    return all(getattr(h, "__code__", None) in _LAYOUT_HOOK_CODES for h in hooks)


def _run_pre_hooks(m: nn.Module, args: tuple) -> tuple:
    """The forward pre-hooks of ``m`` on ``args``, as ``nn.Module.__call__`` runs them."""
    for hook in m._forward_pre_hooks.values():
        result = hook(m, args)
        if result is not None:
            args = result if isinstance(result, tuple) else (result,)
    return args


def _run_post_hooks(m: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
    """The forward hooks of ``m`` on its output ``y``, as ``nn.Module.__call__`` runs them."""
    for hook in m._forward_hooks.values():
        result = hook(m, args, y)
        if result is not None:
            y = result
    return y


def _shares_input(linears: Sequence[nn.Module]) -> bool:
    """Whether ``forward_shared`` may quantize the input once for all of ``linears`` (what does not
    depend on the input; ``_shares_operands`` checks the rest once the hooks have run)."""
    first = linears[0]
    if not (
        len(linears) > 1
        and all(type(m) is NVFP4QATLinear for m in linears)
        and len(first.amax_peers) == len(linears) - 1
        and all(p is m for p, m in zip(first.amax_peers, linears[1:]))
    ):
        return False
    w = first.weight
    for m in linears:
        if (
            not m.enabled
            or m.calibrating
            or m.bias is not None
            or m.config != first.config
            or not _layout_hooks_only(m)
            or "forward" in m.__dict__  # a wrapped forward (torchtitan's parallelize) must run
        ):
            return False
        v = m.weight
        if isinstance(v, DTensor) != isinstance(w, DTensor) or (  # one sharding: one GEMM layout, one all-reduce
            isinstance(w, DTensor) and (v.device_mesh != w.device_mesh or v.placements != w.placements)
        ):
            return False
    act = first.config.activation_scale
    return act == "dynamic" or (act == "static" and first._peers_share_input_amax())  # "none": F.linear each


def _shares_operands(first: NVFP4QATLinear, x: torch.Tensor) -> bool:
    """Whether the group's (hooked) input suits one shared QAT call: a DTensor input for DTensor
    weights (the per-module path raises the error otherwise)."""
    return isinstance(x, DTensor) or not isinstance(first.weight, DTensor)
