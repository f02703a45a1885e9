"""The one map between our parameter names and Hugging Face Llama names.

Training, HF import/export and the NVFP4 converter all use it. Names map by module path,
so a quantized module's extra tensors (``weight_scale``, ``input_scale``) map the same way.
"""

from __future__ import annotations

import re

_LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MODULES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_FROM_LAYER = {v: k for k, v in _LAYER_MODULES.items()}
_FROM_TOP = {v: k for k, v in _TOP_MODULES.items()}
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_HF = re.compile(r"model\.layers\.(\d+)\.(.+)")


def to_hf_module(name: str) -> str:
    """``layers.3.attention.wq`` -> ``model.layers.3.self_attn.q_proj``."""
    if m := _OURS.fullmatch(name):
        return f"model.layers.{m[1]}.{_LAYER_MODULES[m[2]]}"
    return _TOP_MODULES[name]


def from_hf_module(name: str) -> str:
    if m := _HF.fullmatch(name):
        return f"layers.{m[1]}.{_FROM_LAYER[m[2]]}"
    return _FROM_TOP[name]


def to_hf(key: str) -> str:
    """Tensor name: ``layers.0.attention.wq.weight`` -> ``model.layers.0.self_attn.q_proj.weight``.

    Raises KeyError for a name that has no HF counterpart.
    """
    module, _, tensor = key.rpartition(".")
    return f"{to_hf_module(module)}.{tensor}"


def from_hf(key: str) -> str:
    module, _, tensor = key.rpartition(".")
    return f"{from_hf_module(module)}.{tensor}"
