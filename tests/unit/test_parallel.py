"""Parallel configuration checks that run before any work (no process group needed)."""

import pytest
import torch

import nvfp4
from nvfp4_titan.models.llama3 import FLAVORS, ModelArgs, Transformer
from nvfp4_titan.parallel import resolve_dims
from nvfp4_titan.parallel.mesh import ParallelConfigError
from nvfp4_titan.parallel.parallelize import check_even_rows, check_tp


def test_resolve_dims():
    assert resolve_dims(8, -1, 2).dp_shard == 4
    assert resolve_dims(4, 2, 2).world_size == 4
    with pytest.raises(ParallelConfigError, match="tensor_parallel_degree=3 does not divide the world size 8"):
        resolve_dims(8, -1, 3)
    with pytest.raises(
        ParallelConfigError, match=r"data_parallel_shard_degree=3 x tensor_parallel_degree=2 = 6 != world size 8"
    ):
        resolve_dims(8, 3, 2)


def test_resolve_dims_with_replicas():
    """HSDP: -1 fills the shard degree within each replica; the messages name every degree."""
    dims = resolve_dims(16, -1, 2, dp_replicate=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 4, 2, 8)
    with pytest.raises(
        ParallelConfigError,
        match=r"data_parallel_replicate_degree=3 x tensor_parallel_degree=2 does not divide the world size 8",
    ):
        resolve_dims(8, -1, 2, dp_replicate=3)
    with pytest.raises(
        ParallelConfigError,
        match=r"data_parallel_replicate_degree=2 x data_parallel_shard_degree=4 x tensor_parallel_degree=2 = 16 "
        r"!= world size 8",
    ):
        resolve_dims(8, 4, 2, dp_replicate=2)


def _meta(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    return nvfp4.prepare(model)


def test_tp_must_divide_heads():
    with pytest.raises(ParallelConfigError, match="tensor_parallel_degree=3 does not divide n_heads=8"):
        check_tp(_meta(FLAVORS["debug"]), 3)
    smollm2 = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152)
    with pytest.raises(
        ParallelConfigError,
        match=r"does not divide n_heads=9; this model allows "
        r"tensor_parallel_degree in \[1, 3\]",
    ):
        check_tp(_meta(smollm2), 2)
    check_tp(_meta(smollm2), 3)


def test_tp_must_keep_nvfp4_blocks_whole():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=64)
    with pytest.raises(
        ParallelConfigError,
        match=r"layers.0.feed_forward.w2: with tensor_parallel_degree=4 each rank holds K=24.*"
        r"allows tensor_parallel_degree in \[1, 2\]",
    ):
        check_tp(_meta(args), 4)
    check_tp(_meta(args), 2)  # K=48: fine


def test_supported_tp_degrees_of_real_flavors():
    for name, tp in (("1B", 8), ("3B", 8), ("8B", 8), ("debug", 2)):
        check_tp(_meta(FLAVORS[name].with_(n_layers=1)), tp)


def test_nvfp4_all_gather_needs_rows_split_evenly():
    model = _meta(FLAVORS["debug"])
    with pytest.raises(
        ParallelConfigError,
        match=r"layers.0.attention.wq: 256 rows do not split evenly over data_parallel_shard_degree=3",
    ):
        check_even_rows(model, 3)
    check_even_rows(model, 4)
