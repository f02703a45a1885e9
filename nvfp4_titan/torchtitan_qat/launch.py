"""torchtitan 0.3.0's trainer (``torchtitan.train``) with what it needs to run on released torch and,
without a GPU, on the CPU:

    torchrun --nproc_per_node=2 -m nvfp4_titan.torchtitan_qat.launch \\
        --module nvfp4_titan.torchtitan_qat.configs --config debug --parallelism.tensor_parallel_degree 2

- ``torch.distributed.set_timeout`` (which torchtitan calls after the first step, and torch 2.13
  does not have): the process groups keep the timeout they were created with.
- No CUDA device: torchtitan falls back to device "cuda" (``tools/utils.py``); here the device is
  the CPU, its process groups gloo, and a CPU stand-in answers its device and memory queries
  (memory reads 0). FlexAttention, which has no CPU backward, is computed by SDPA with the dense
  form of the same block mask (document-causal: the same attention, slower). FSDP reduces
  gradients with SUM: gloo has no PREMUL_SUM, and torchtitan's divide factor is 1 (it scales the
  loss by the global token count), so the sums are the same.
Everything else is torchtitan's own trainer, unchanged.
"""

from __future__ import annotations

import importlib
import types

import torch
import torch.nn.functional as F


def _keep_timeouts(timeout, parallel_dims) -> None:
    """torchtitan's ``set_pg_timeouts`` without ``torch.distributed.set_timeout``: the barrier only."""
    torch.distributed.barrier()


def _sum_reductions(disable_division):
    """torchtitan's ``disable_fsdp_gradient_division``, then SUM reductions (gloo has no PREMUL_SUM)."""

    def disable(model) -> None:
        from torch.distributed.fsdp import FSDPModule

        disable_division(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    return disable


def _flex_as_sdpa(
    self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale=None, enable_gqa=False, **kwargs
) -> torch.Tensor:
    """FlexAttention's forward (its argument names: TP's local_map reads them), by SDPA over the
    dense block mask."""
    from torch.nn.attention.flex_attention import create_mask

    b, q_len, kv_len = q_BLNH.shape[0], q_BLNH.shape[1], k_BLNH.shape[1]
    mask = create_mask(attention_masks.mask_mod, b, 1, q_len, kv_len, device=q_BLNH.device)
    q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa).transpose(1, 2)


_CPU = types.SimpleNamespace(
    set_device=lambda device: None,
    current_device=lambda: 0,
    device_count=lambda: 1,
    synchronize=lambda *args: None,
    get_device_name=lambda *args: "cpu",
    get_device_properties=lambda *args: types.SimpleNamespace(name="cpu", total_memory=1),
    reset_peak_memory_stats=lambda *args: None,
    empty_cache=lambda: None,
    memory_stats=lambda *args: {},
)
_DEVICE_MODULES = (  # torchtitan modules that bind device_type / device_module at import
    "torchtitan.tools.utils",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiler",
)


def patch_torchtitan() -> None:
    """Apply the compatibility fixes of the module docstring (idempotent)."""
    import torchtitan.distributed.utils as dist_utils

    if not hasattr(torch.distributed, "set_timeout"):
        dist_utils.set_pg_timeouts = _keep_timeouts
    if not torch.cuda.is_available():
        import torchtitan.distributed.fsdp as fsdp
        from torchtitan.models.common.attention import FlexAttention

        if not getattr(fsdp.disable_fsdp_gradient_division, "sums", False):
            fsdp.disable_fsdp_gradient_division = _sum_reductions(fsdp.disable_fsdp_gradient_division)
            fsdp.disable_fsdp_gradient_division.sums = True

        for name in _DEVICE_MODULES:
            module = importlib.import_module(name)
            if hasattr(module, "device_type"):
                module.device_type = "cpu"
            if hasattr(module, "device_module"):
                module.device_module = _CPU
        FlexAttention.forward = _flex_as_sdpa


def main() -> None:
    patch_torchtitan()
    from torchtitan.train import main as train

    train()


if __name__ == "__main__":
    main()
