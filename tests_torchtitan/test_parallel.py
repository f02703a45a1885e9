"""torchtitan's Llama with ``NVFP4QATConverter``, parallelized by torchtitan's own
``parallelize_llama`` on 2 gloo ranks (TP=2, FSDP=2; the ``partial_dtensor`` backend): from the
1-process model's weights, one QAT step gives its codes and scales bitwise and every parameter's
gradient to 1e-4 (relative L2), as ``tests/distributed`` requires of this project's trainer. The
``spmd_types`` backend, whose TP weights are plain local shards, is refused."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchtitan.distributed.parallel_dims as parallel_dims_module
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import parallelize_llama

from nvfp4_titan.torchtitan_qat.configs import DEBUG_VOCAB
from tests.distributed.harness import cat_nvfp4, gather_nvfp4, run_ranks
from tests_torchtitan.helpers import build, model_config, qat_linears

GRAD_RTOL = 1e-4  # as tests/distributed/parity.py: fp32 reduction-order noise, far below any missing reduction


def _batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, DEBUG_VOCAB, (4, 65), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _step(model, x, y, scale: float) -> None:
    logits = model(x)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    (F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) * scale).backward()


def _sharded(dp: int, tp: int, spmd_backend: str = "partial_dtensor"):
    """The converted debug model, parallelized as torchtitan's trainer does (on the CPU), then given
    the 1-process model's initial weights."""
    parallel_dims_module.device_type = "cpu"  # torchtitan falls back to "cuda" without a GPU
    parallelism = ParallelismConfig(data_parallel_shard_degree=dp, tensor_parallel_degree=tp, spmd_backend=spmd_backend)
    dims = ParallelDims(
        dp_replicate=1, dp_shard=dp, cp=1, tp=tp, pp=1, ep=1, world_size=dp * tp, spmd_backend=spmd_backend
    )
    dims.build_mesh()
    cfg = model_config()
    cfg.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    with torch.device("meta"):
        model = cfg.build()
    parallelize_llama(
        model,
        parallel_dims=dims,
        training=TrainingConfig(mixed_precision_param="float32"),
        parallelism=parallelism,
        compile_config=CompileConfig(enable=False),
        ac_config=None,
        dump_folder=tempfile.gettempdir(),
    )
    for m in model.modules():  # gloo has no PREMUL_SUM; torchtitan's divide factor is 1, so a SUM is the same
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
        ref = build(model_config(), seed=5)
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            p.copy_(
                distribute_tensor(want[name], p.device_mesh, p.placements) if isinstance(p, DTensor) else want[name]
            )
    return model, ref


def parity_worker(rank: int, world: int, dp: int, tp: int) -> None:
    model, ref = _sharded(dp, tp)
    x, y = _batch()
    # The 1-process run: data-parallel ranks each see half the batch (and quantize their own
    # activations), so the reference accumulates the two halves' gradients.
    halves = list(zip(x.chunk(dp), y.chunk(dp)))
    for xh, yh in halves:
        _step(ref, xh, yh, 1 / dp)
    xl, yl = halves[rank // tp] if dp > 1 else (x, y)
    _step(model, xl, yl, 1 / dp)  # torchtitan's FSDP sums gradients (it scales the loss by the global token count)

    want = qat_linears(ref)
    for name, m in qat_linears(model).items():
        q = m.quantized_weight()
        w = m.weight
        # the dim split across the 2 ranks (the mesh's other axis has size 1)
        dims = [p.dim for p, n in zip(w.placements, w.device_mesh.shape) if isinstance(p, Shard) and n > 1]
        dim = dims[0] if isinstance(w, DTensor) and dims else None
        got = q if dim is None else cat_nvfp4(gather_nvfp4(q, None), dim)
        r = want[name].quantized_weight()
        assert torch.equal(m.weight_amax(), want[name].weight_amax()), name  # pow2 scales could hide it
        assert torch.equal(got.packed, r.packed), name
        assert torch.equal(got.block_scale.view(torch.uint8), r.block_scale.view(torch.uint8)), name
        assert torch.equal(got.tensor_scale, r.tensor_scale), name
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    bad = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        err = float((g - grads_ref[name]).norm() / grads_ref[name].norm())
        if not err <= GRAD_RTOL:
            bad[name] = f"{err:.2e}"
    assert not bad, f"gradients off by more than {GRAD_RTOL} (relative L2): {bad}"
    dist.barrier()


@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 1)], ids=["tp2", "fsdp2"])
def test_sharded_step_equals_one_process(dp, tp):
    run_ranks(parity_worker, 2, dp, tp)


def refusal_worker(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="spmd_backend = 'partial_dtensor'"):
        _sharded(1, 2, spmd_backend="spmd_types")


def test_tensor_parallel_under_spmd_types_is_refused():
    run_ranks(refusal_worker, 2)
