"""torchtitan's Llama with ``NVFP4QATConverter``, parallelized by torchtitan's own
``parallelize_llama`` on 2 gloo ranks (TP=2, FSDP=2; the ``partial_dtensor`` backend): from the
1-process model's weights, one QAT step gives its codes and scales bitwise and every parameter's
gradient to 1e-4 (relative L2), as ``tests/distributed`` requires of this project's trainer, also with
FSDP gathering the QAT weights as NVFP4 (the launcher's ``fsdp_nvfp4_all_gather``: the codes checked are
the ones gathered). The ``spmd_types`` backend, whose TP weights are plain local shards, is refused, and
so is the NVFP4 all-gather under it or under compile."""

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

import nvfp4
from nvfp4.fsdp import NVFP4GatheredWeight, gathers_nvfp4
from nvfp4.sharded import local
from nvfp4_titan.torchtitan_qat import launch
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


def _parallelized(
    dp: int,
    tp: int,
    spmd_backend: str = "partial_dtensor",
    compile: bool = False,
    cpu_offload: bool = False,
    launcher: bool = True,
    **qat,
):
    """The debug model converted with ``qat``, parallelized as torchtitan's trainer does (on the CPU,
    with the ``launcher``'s patches: the NVFP4 all-gather), then initialized by ``init_weights`` from seed 0."""
    parallel_dims_module.device_type = "cpu"  # torchtitan falls back to "cuda" without a GPU
    if launcher:
        launch.patch_torchtitan()
    parallelism = ParallelismConfig(data_parallel_shard_degree=dp, tensor_parallel_degree=tp, spmd_backend=spmd_backend)
    dims = ParallelDims(
        dp_replicate=1, dp_shard=dp, cp=1, tp=tp, pp=1, ep=1, world_size=dp * tp, spmd_backend=spmd_backend
    )
    dims.build_mesh()
    cfg = model_config(**qat)
    cfg.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    with torch.device("meta"):
        model = cfg.build()
    parallelize_llama(
        model,
        parallel_dims=dims,
        training=TrainingConfig(mixed_precision_param="float32", enable_cpu_offload=cpu_offload),
        parallelism=parallelism,
        compile_config=CompileConfig(enable=compile),
        ac_config=None,
        dump_folder=tempfile.gettempdir(),
    )
    for m in model.modules():  # gloo has no PREMUL_SUM; torchtitan's divide factor is 1, so a SUM is the same
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)  # DTensor has no RNG tracker on a CPU mesh: each rank draws its shard from this
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def _sharded(dp: int, tp: int, all_gather: bool = False, **qat):
    """``_parallelized`` (``all_gather``: with the NVFP4 all-gather), then given the 1-process model's
    initial weights; and that model."""
    model = _parallelized(dp, tp, fsdp_nvfp4_all_gather=all_gather, **qat)
    ref = build(model_config(**qat), seed=5)
    want = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                distribute_tensor(want[name], p.device_mesh, p.placements) if isinstance(p, DTensor) else want[name]
            )
    return model, ref


def _gathered_weights(model) -> dict[str, nvfp4.NVFP4]:
    """Forward pre-hooks: the NVFP4 weight each QAT linear receives from FSDP's all-gather."""
    seen = {}

    def hook(module, args, name):
        w = local(module.weight)
        assert isinstance(w, NVFP4GatheredWeight), f"{name}: the weight arrived as {type(w).__name__}, not NVFP4"
        seen[name] = w.nvfp4

    for name, m in qat_linears(model).items():
        m.register_forward_pre_hook(lambda module, args, name=name: hook(module, args, name))
    return seen


def parity_worker(rank: int, world: int, dp: int, tp: int, all_gather: bool, tensor_scale: str) -> None:
    model, ref = _sharded(dp, tp, all_gather, tensor_scale=tensor_scale)
    seen = _gathered_weights(model) if all_gather else {}
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
        w = m.weight
        # the dim split across the 2 ranks (the mesh's other axis has size 1)
        dims = [p.dim for p, n in zip(w.placements, w.device_mesh.shape) if isinstance(p, Shard) and n > 1]
        dim = dims[0] if isinstance(w, DTensor) and dims else None
        q = m.quantized_weight()
        if all_gather:  # what FSDP gathered: the whole weight, or its TP shard
            q, dim = seen[name], dim if tp > 1 else None
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


# amax tensor scales with the NVFP4 all-gather: its own tensor scales (fused groups', global) are then
# checked to every bit, which pow2 rounding could hide
@pytest.mark.parametrize("all_gather,tensor_scale", [(False, "pow2"), (True, "amax")], ids=["", "nvfp4_all_gather"])
@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 1)], ids=["tp2", "fsdp2"])
def test_sharded_step_equals_one_process(dp, tp, all_gather, tensor_scale):
    run_ranks(parity_worker, 2, dp, tp, all_gather, tensor_scale)


def init_worker(rank: int, world: int, dp: int, tp: int) -> None:
    plain, wrapped = _parallelized(dp, tp), _parallelized(dp, tp, fsdp_nvfp4_all_gather=True)
    got = dict(wrapped.named_parameters())
    for name, p in plain.named_parameters():  # FSDP's shards, each rank's own
        assert torch.equal(local(got[name]), local(p)), name
        assert gathers_nvfp4(got[name]) == (name in {f"{n}.weight" for n in qat_linears(plain)}), name


@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 1)], ids=["tp2", "fsdp2"])
def test_nvfp4_all_gather_weights_initialize_as_plain_ones(dp, tp):
    """torchtitan builds on the meta device, wraps, shards, then ``to_empty`` and ``init_weights``: the
    wrapped weights must come out of that path as the plain ones do, and still wrapped."""
    run_ranks(init_worker, 2, dp, tp)


def refusal_worker(rank: int, world: int) -> None:
    with pytest.raises(RuntimeError, match=r"not set up to gather this weight as NVFP4: the launcher `-m nvfp4_titan"):
        _parallelized(2, 1, launcher=False, fsdp_nvfp4_all_gather=True)  # as under torchtitan.train (first here)
    with pytest.raises(ValueError, match="NVFP4 all-gather with CPU offload: set training.enable_cpu_offload"):
        _parallelized(2, 1, cpu_offload=True, fsdp_nvfp4_all_gather=True)
    with pytest.raises(ValueError, match="spmd_backend = 'partial_dtensor'"):
        _parallelized(1, 2, spmd_backend="spmd_types")
    with pytest.raises(ValueError, match=r"NVFP4 all-gather needs parallelism.spmd_backend = 'partial_dtensor'"):
        _parallelized(2, 1, spmd_backend="spmd_types", fsdp_nvfp4_all_gather=True)
    with pytest.raises(ValueError, match="NVFP4 all-gather works in eager mode only: set compile.enable = false"):
        _parallelized(2, 1, compile=True, fsdp_nvfp4_all_gather=True)


def test_tensor_parallel_under_spmd_types_and_unsupported_nvfp4_all_gathers_are_refused():
    run_ranks(refusal_worker, 2)
