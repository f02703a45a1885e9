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

And one addition, for static activation scales (``NVFP4QATConverter.Config(activation_scale="static")``):
before the first step of a run whose QAT linears are not calibrated, their input amax is calibrated
on the run's first ``calibration_batches`` batches (max over every rank), which the run then trains
on, as ``train.py`` does; a run resumed from a checkpoint keeps the amax it saved. torchtitan's own
``torchtitan.train`` stops at the first forward of an uncalibrated model (``RuntimeError``).
And the NVFP4 all-gather (``NVFP4QATConverter.Config(fsdp_nvfp4_all_gather=True)``): between tensor
parallelism and ``fully_shard`` of torchtitan's Llama (``models.llama3``), the QAT weights are wrapped
so that FSDP2 gathers them as NVFP4 (``nvfp4.fsdp.enable_nvfp4_all_gather``), and a forward pre-hook
computes their tensor scales (one all-reduce) at the first forward after each optimizer step or
checkpoint load. Refused: compile, torchtitan's CUDA graph of each step (``training.disable_cuda_graphs``
must be set on NVIDIA GPUs), CPU offload, pipeline parallelism, SPMD backends but ``partial_dtensor``.
Everything else is torchtitan's own trainer, unchanged.
"""

from __future__ import annotations

import importlib
import itertools
import types

import torch
import torch.nn.functional as F
from torch import nn

import nvfp4
from nvfp4.fsdp import enable_nvfp4_all_gather, precompute_weight_scales_when_stale
from nvfp4_titan.parallel.parallelize import check_even_rows


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


class _TrainerForward(nn.Module):
    """``model`` called as torchtitan's training step calls it, on one ``(input_dict, labels)`` batch."""

    def __init__(self, trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.model = trainer.model_parts[0]

    def forward(self, batch) -> torch.Tensor:
        t = self.trainer
        input_dict = {k: v.to(t.device) if isinstance(v, torch.Tensor) else v for k, v in batch[0].items()}
        seen = t.ntokens_seen  # counted again when the step trains on this batch
        inputs, _, kwargs = t.post_dataloading_process(input_dict, batch[1].to(t.device))
        t.ntokens_seen = seen
        return self.model(inputs, **kwargs)


def _calibrating(batch_generator):
    """torchtitan's ``Trainer.batch_generator`` (called once, before the first step), which first refuses
    the NVFP4 all-gather under CUDA graphs and calibrates static activation scales on the run's next
    ``calibration_batches`` batches when the model (loaded by then) holds none. The data
    loader is rewound after reading them (its state saved and loaded back), so the run trains on the
    same batches, and a checkpoint's data position counts only trained ones."""
    from torchtitan.tools.logging import logger

    def generate(self, data_iterable):
        model = self.model_parts[0]
        _check_cuda_graphs(model, self.config.training.disable_cuda_graphs)
        static = list(nvfp4.static_linears(model).values())
        if static and len(self.model_parts) > 1:
            raise NotImplementedError(
                "static activation scales with pipeline parallelism: use activation_scale = 'dynamic' or "
                "parallelism.pipeline_parallel_degree = 1"
            )
        if static and nvfp4.needs_calibration(model):
            n = static[0].calibration_batches
            state = self.dataloader.state_dict()
            batches = list(itertools.islice(iter(data_iterable), n))
            self.dataloader.load_state_dict(state)
            if len(batches) < n:
                raise ValueError(
                    f"calibration_batches = {n}, but the data holds {len(batches)} batches per rank: lower it"
                )
            nvfp4.calibrate(_TrainerForward(self), batches)
            logger.info(f"NVFP4 QAT: calibrated static activation scales on {n} batches per rank")
        elif static:
            nvfp4.mark_calibrated(model)
        yield from batch_generator(self, data_iterable)

    return generate


def _nvfp4_all_gather_linears(model: nn.Module) -> list[nn.Module]:
    """The QAT linears whose converter asked for the NVFP4 all-gather (``QATLinear.fsdp_nvfp4_all_gather``)."""
    return [m for m in nvfp4.qat_linears(model) if getattr(m, "fsdp_nvfp4_all_gather", False)]


def _check_cuda_graphs(model: nn.Module, disabled: bool) -> None:
    """Refuse the NVFP4 all-gather under torchtitan's CUDA graph of each step (on by default on NVIDIA
    GPUs, ``distributed/cudagraph.py``): a replay runs no Python, so the tensor scales that the forward
    pre-hook computes after each optimizer step would not be recomputed (stale scales, wrong numbers
    with gradient accumulation; a failed capture without)."""
    graphs = not disabled and torch.cuda.is_available() and torch.version.hip is None
    if graphs and _nvfp4_all_gather_linears(model):
        raise ValueError(
            "the NVFP4 all-gather cannot run inside torchtitan's CUDA graph of each step: set "
            "training.disable_cuda_graphs = true (--training.disable_cuda_graphs) or fsdp_nvfp4_all_gather = False"
        )


def _gathering_nvfp4(apply_fsdp):
    """torchtitan's ``apply_fsdp_to_decoder`` (called by ``parallelize_llama`` after TP, AC and compile),
    which first wraps the QAT weights for the NVFP4 all-gather when the converter asks for it
    (``fsdp_nvfp4_all_gather``), and then makes every forward compute the tensor scales it needs."""
    from torchtitan.tools.logging import logger

    def apply(model: nn.Module, dp_mesh, *, param_dtype: torch.dtype, pp_enabled: bool, **kwargs) -> None:
        linears = _nvfp4_all_gather_linears(model)
        if linears:
            _check_nvfp4_all_gather(model, dp_mesh, pp_enabled, kwargs.get("dp_mesh_dims"), kwargs.get("cpu_offload"))
            enable_nvfp4_all_gather(model, param_dtype)
        apply_fsdp(model, dp_mesh, param_dtype=param_dtype, pp_enabled=pp_enabled, **kwargs)
        if linears:
            precompute_weight_scales_when_stale(model)
            logger.info(f"NVFP4 QAT: FSDP all-gathers {len(linears)} linears' weights as NVFP4")

    return apply


def _check_nvfp4_all_gather(model: nn.Module, dp_mesh, pp_enabled: bool, dp_mesh_dims, cpu_offload: bool) -> None:
    """Refuse what the NVFP4 all-gather does not support (``nvfp4.fsdp``), naming the fix."""
    off = "fsdp_nvfp4_all_gather = False"
    if cpu_offload:  # the amax all-reduce would meet CPU shards, FSDP's copy to the GPU a shard without its scale
        raise ValueError(f"the NVFP4 all-gather with CPU offload: set training.enable_cpu_offload = false or {off}")
    if any(m._compiled_call_impl is not None for m in model.modules()):
        raise ValueError(f"the NVFP4 all-gather works in eager mode only: set compile.enable = false or {off}")
    if dp_mesh_dims is not None:
        raise ValueError(f"the NVFP4 all-gather needs parallelism.spmd_backend = 'partial_dtensor', or set {off}")
    if pp_enabled:
        raise NotImplementedError(
            f"the NVFP4 all-gather with pipeline parallelism: set parallelism.pipeline_parallel_degree = 1 or {off}"
        )
    check_even_rows(model, dp_mesh.shape[-1], off)


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
    import torchtitan.models.llama3.parallelize as llama_parallelize
    from torchtitan.trainer import Trainer

    if not getattr(llama_parallelize.apply_fsdp_to_decoder, "gathers_nvfp4", False):
        llama_parallelize.apply_fsdp_to_decoder = _gathering_nvfp4(llama_parallelize.apply_fsdp_to_decoder)
        llama_parallelize.apply_fsdp_to_decoder.gathers_nvfp4 = True
    if not getattr(Trainer.batch_generator, "calibrates", False):
        Trainer.batch_generator = _calibrating(Trainer.batch_generator)
        Trainer.batch_generator.calibrates = True

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
