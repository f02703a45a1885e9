"""The two tensor subclasses of the NVFP4 all-gather for FSDP2 (``nvfp4/fsdp.py`` uses them).

``NVFP4TrainingWeight`` wraps the high-precision local shard of a QAT weight: FSDP2 shards,
pads and moves it and the optimizer updates it as a plain tensor, but FSDP2's all-gather
asks it for ``fsdp_pre_all_gather``: the shard cast to the mixed-precision dtype and
quantized with the tensor scale of the *whole* weight (set by ``precompute_weight_scales``),
packed codes and block scales, 4.5 bits per element instead of 16.
``fsdp_post_all_gather`` returns ``NVFP4GatheredWeight``: the unsharded quantized weight,
which the QAT linear uses as is. Blocks run along rows and FSDP2 shards rows, so quantizing
each shard gives exactly the codes and block scales of quantizing the whole.

The pattern is torchao's float8 all-gather (torchao/float8/fsdp_utils.py,
``WeightWithDynamicFloat8CastTensor``). Eager mode only.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor

from nvfp4.format import NVFP4, dequantize, quantize_with_scale

aten = torch.ops.aten

# FSDP2 pads, chunks, copies and moves the shard: those ops keep the subclass (as torchao's).
_PRESERVE = {
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.copy_.default,
    aten.view.default,
    aten.as_strided.default,
    aten._to_copy.default,
    aten._pin_memory.default,
    aten.split.Tensor,
    aten.clone.default,
}


class NVFP4TrainingWeight(torch.Tensor):
    """A QAT weight's local shard that FSDP2 all-gathers as NVFP4.

    ``scale`` (fp32 0-dim) is the tensor scale of the whole weight, set by
    ``precompute_weight_scales`` and cleared when the weights change (optimizer step,
    state-dict load: hooks in nvfp4/fsdp.py). Version counters cannot tell: foreach
    optimizers update DTensor parameters without bumping them. ``block_scale_rule``: the QAT
    linear's (``QATConfig.block_scale_rule``); the choice is per block, so shard by shard.
    """

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, param_dtype: torch.dtype, block_scale_rule: str = "amax"):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.shape,
            strides=tensor.stride(),
            dtype=tensor.dtype,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )

    def __init__(self, tensor: torch.Tensor, param_dtype: torch.dtype, block_scale_rule: str = "amax") -> None:
        self._tensor = tensor
        self.param_dtype = param_dtype
        self.block_scale_rule = block_scale_rule
        self.scale: torch.Tensor | None = None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        first = next(a for a in pytree.tree_leaves(args) if isinstance(a, cls))
        like = (first.param_dtype, first.block_scale_rule)
        if func is aten.detach.default:
            return cls(args[0]._tensor, *like)
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVE:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, *like), out)

    def __repr__(self) -> str:
        return (
            f"NVFP4TrainingWeight({self._tensor}, param_dtype={self.param_dtype}, "
            f"block_scale_rule={self.block_scale_rule})"
        )

    def quantized_shard(self) -> NVFP4:
        """This shard in ``param_dtype``, quantized with the whole weight's tensor scale and the
        linear's block scale rule."""
        if self.scale is None:
            raise RuntimeError(
                "NVFP4 all-gather: no tensor scale for the current weights; call "
                "nvfp4.fsdp.precompute_weight_scales(model) after each optimizer step or "
                "weight load, before the forward"
            )
        return quantize_with_scale(self._tensor.to(self.param_dtype), self.scale, self.block_scale_rule)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # One uint8 input, rows [codes | block scales]: FSDP2 gathers rows, and its
        # world-size-1 path (torch 2.13) copies only the first input.
        q = self.quantized_shard()
        return (torch.cat([q.packed, q.block_scale.view(torch.uint8)], dim=-1),), (q.tensor_scale,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (rows,) = all_gather_outputs
        (scale,) = metadata
        k_half = rows.shape[-1] * 8 // 9  # K/2 code bytes, then K/16 scale bytes per row
        q = NVFP4(rows[:, :k_half].contiguous(), rows[:, k_half:].contiguous().view(torch.float8_e4m3fn), scale)
        if out is not None:  # a later gather into the same buffer
            (out._local_tensor if isinstance(out, DTensor) else out).nvfp4 = q
            return None
        return NVFP4GatheredWeight(q, param_dtype), (rows,)


class NVFP4GatheredWeight(torch.Tensor):
    """An unsharded weight that arrived quantized: ``nvfp4`` holds its codes and scales.

    The QAT linear reads ``nvfp4`` directly. Any other op sees the dequantized weight.
    """

    @staticmethod
    def __new__(cls, q: NVFP4, dtype: torch.dtype):
        shape = (*q.packed.shape[:-1], q.packed.shape[-1] * 2)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=q.packed.device)

    def __init__(self, q: NVFP4, dtype: torch.dtype) -> None:
        self.nvfp4 = q

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (aten.detach.default, aten.alias.default, aten.view.default, aten.as_strided.default):
            t, shape = args[0], args[1] if len(args) > 1 else None
            if shape is None or tuple(shape) == tuple(t.shape):
                return cls(t.nvfp4, t.dtype)
        args, kwargs = pytree.tree_map_only(cls, lambda t: dequantize(t.nvfp4, t.dtype), (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NVFP4GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype})"
