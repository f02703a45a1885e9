"""Apply tensor parallelism, compile and FSDP2 to a Llama, in TorchTitan's order.

Activation checkpointing is a model option (ModelArgs.activation_checkpoint), applied
inside the blocks' forward, so it sits between TP and compile as TorchTitan orders them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from nvfp4.fsdp import enable_nvfp4_all_gather
from nvfp4.qat.linear import NVFP4QATLinear
from nvfp4.sharded import check_local_blocks, local
from nvfp4_titan.models.llama3 import Transformer
from nvfp4_titan.parallel.mesh import ParallelConfigError, dp_mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config names


def _tp_problem(model: Transformer, tp: int) -> str | None:
    """Why ``tp`` cannot split ``model`` (heads, vocabulary, or NVFP4 blocks of a QAT linear
    that a rowwise split would cut), or None."""
    a = model.args
    for what, n in (
        ("n_heads", a.n_heads),
        ("n_kv_heads", a.n_kv_heads),
        ("ffn_dim", a.ffn_dim),
        ("vocab_size", a.vocab_size),
    ):
        if n % tp:
            return f"tensor_parallel_degree={tp} does not divide {what}={n}"
    for name, m in model.named_modules():
        if isinstance(m, NVFP4QATLinear) and name.endswith(("attention.wo", "feed_forward.w2")):
            k = m.in_features // tp
            if k % 16:
                return (
                    f"{name}: with tensor_parallel_degree={tp} each rank holds K={k} input "
                    f"features, not a multiple of 16, so NVFP4 blocks would straddle ranks; "
                    f"exclude it from QAT or choose another degree"
                )
    return None


def check_tp(model: Transformer, tp: int) -> None:
    """Reject a TP degree that splits heads or NVFP4 blocks, before any work, naming the degrees
    that this model allows."""
    if (problem := _tp_problem(model, tp)) is not None:
        valid = [t for t in range(1, model.args.n_kv_heads + 1) if _tp_problem(model, t) is None]
        raise ParallelConfigError(f"{problem}; this model allows tensor_parallel_degree in {valid}")


def check_even_rows(model: nn.Module, dp: int, off: str = "qat.fsdp_nvfp4_all_gather = false") -> None:
    """NVFP4 all-gather needs every QAT weight's rows split evenly over the FSDP ranks; ``off`` is the
    setting that turns it off, named in the ``ParallelConfigError``."""
    for name, m in model.named_modules():
        if isinstance(m, NVFP4QATLinear) and local(m.weight).shape[0] % dp:
            name = name.replace("_checkpoint_wrapped_module.", "")  # torch's activation checkpoint wrapper
            raise ParallelConfigError(
                f"{name}: {local(m.weight).shape[0]} rows do not split evenly over "
                f"data_parallel_shard_degree={dp}, which NVFP4 all-gather needs; choose a degree "
                f"that divides it or set {off}"
            )


# TorchTitan's Llama plan: sequence-parallel norms, colwise q/k/v/w1/w3, rowwise wo/w2.
def _block_plan() -> dict:
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan())
    model.tie_weights()  # both halves are Shard(0) over the vocab: one parameter again
    for name, m in model.named_modules():
        if isinstance(m, NVFP4QATLinear):
            check_local_blocks(name, m.weight)
            # parallelize_module makes every buffer a Replicate DTensor. The calibrated input
            # amax is one number, equal on every rank (calibrate all-reduces it over the world):
            # kept plain as under FSDP, so that calibration's all-reduce (no DTensor sharding
            # rule for c10d ops) and checkpoints are the same on every mesh.
            m.input_amax = local(m.input_amax)


# Dynamo settings for compiled blocks. A selectively checkpointed MLP is traced as one
# checkpoint region only if forward side effects in it need not be replayed on recompute: QAT
# linears record their input amax for metrics (recomputation would record the same value), and
# without this the region falls out of the graph. TorchTitan sets the same for compile + AC
# (pytorch/torchtitan, torchtitan/experiments/simple_fsdp/llama3/parallelize.py).
DYNAMO_CONFIG = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def apply_compile(model: Transformer) -> None:
    """Compile each block in place (parameter names stay layers.N.*). QAT linears inside a block's
    activation-checkpointed region are marked ``recomputed``: they then trace as one op that the
    checkpoint recomputes, so checkpointing frees their saved operands (nvfp4.qat.autograd.qat_linear)."""
    for key, value in DYNAMO_CONFIG.items():
        setattr(torch._dynamo.config, key, value)
    for block in model.layers:
        for region in block.checkpointed_modules():
            for m in region.modules():
                if isinstance(m, NVFP4QATLinear):
                    m.recomputed = True
        block.compile()


def _plain_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The embedding's output under TP as a plain tensor. Its TP plan returns an
    AsyncCollectiveTensor (the reduce-scatter's pending result); fed as is to the first compiled
    block, its gradient comes back as zeros (seen with torch 2.13 on gloo: the embedding never
    trained under TP + compile; with the copy the TP=2 compiled gradients equal the 1-process
    ones on gloo and on NCCL with torch 2.11). It keeps the autograd history and costs one
    [B, S / tp, dim] copy."""
    return output.clone()


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: str, reduce_dtype: str) -> None:
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize_llama(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: str,
    reduce_dtype: str,
    compile: bool,
    nvfp4_all_gather: bool = False,
) -> None:
    """TP (if the tp dim > 1), compile, then FSDP2 over the dp_shard dim (HSDP over
    ("dp_replicate", "dp_shard") when the mesh has a replicate dim); in place.

    ``nvfp4_all_gather``: FSDP2 gathers QAT weights as NVFP4 (nvfp4/fsdp.py; eager only).
    """
    tp = mesh["tp"].size()
    if tp > 1:
        check_tp(model, tp)
        apply_tp(model, mesh["tp"])
    if compile:
        if nvfp4_all_gather:
            raise ValueError("NVFP4 all-gather works in eager mode only: turn compile off")
        if tp > 1:
            model.tok_embeddings.register_forward_hook(_plain_output)
        apply_compile(model)
    if nvfp4_all_gather:
        check_even_rows(model, mesh["dp_shard"].size())
        enable_nvfp4_all_gather(model, DTYPES[param_dtype])
    apply_fsdp(model, dp_mesh(mesh), param_dtype, reduce_dtype)
