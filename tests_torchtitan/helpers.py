"""Shared by the torchtitan tests: torchtitan's debug Llama with the NVFP4 QAT converter, built on the
CPU, and the map from its linears' output rows to this project's (``wqkv`` split into q/k/v and the q/k
rows permuted to the Hugging Face layout, as torchtitan's checkpoint and adapter do)."""

from __future__ import annotations

import torch
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

import nvfp4
from nvfp4_titan.torchtitan_qat.configs import debug_spec
from nvfp4_titan.torchtitan_qat.export import our_modules


def model_config(sdpa: bool = True, **qat):
    """The model config of ``configs.debug`` (torchtitan's debug Llama at the bundled tokenizer's
    vocabulary), converted with ``qat``; ``sdpa``: causal SDPA instead of FlexAttention, whose
    backward torch does not run on the CPU (attention is not what these tests compare)."""
    cfg = debug_spec(**qat).model
    if sdpa:
        for layer in cfg.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return cfg


def build(cfg, seed: int = 0) -> torch.nn.Module:
    """The model of ``cfg`` on the CPU, initialized by torchtitan's ``init_weights`` from ``seed``."""
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


def qat_linears(model: torch.nn.Module) -> dict[str, nvfp4.NVFP4QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}


def row_maps(cfg) -> dict[str, dict[str, torch.Tensor]]:
    """For each torchtitan QAT linear, this project's module names -> the torchtitan output rows that
    are its rows, in order: found by sending each row's index through torchtitan's checkpoint split of
    ``wqkv`` and its Hugging Face adapter (the converter's path)."""
    adapter = Llama3StateDictAdapter(cfg, None)
    model = build(cfg)
    maps = {}
    for fqn, m in qat_linears(model).items():
        index = torch.arange(m.out_features, dtype=torch.float64)[:, None].expand(-1, m.in_features)
        state = {f"{fqn}.weight": index}
        if fqn.endswith(".wqkv"):
            qkv = model.get_submodule(fqn.removesuffix(".wqkv"))
            type(qkv)._split_qkv_on_save(qkv, state, fqn.removesuffix("wqkv"), {})
        hf = adapter.to_hf(state)
        names = our_modules(fqn)
        maps[fqn] = {n: t[:, 0].long() for n, t in zip(names, hf.values())}
    return maps
