"""Llama 3 hyper-parameters and the named flavors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

ActivationCheckpoint = Literal["none", "selective", "full"]
ACTIVATION_CHECKPOINT_MODES = ("none", "selective", "full")


RopeType = Literal["linear", "dynamic", "yarn", "longrope", "llama3"]
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' Llama computes it (``rope_type`` of HF
    ``rope_scaling`` / ``rope_parameters``; formulas: transformers 5.24
    ``modeling_rope_utils.py``, ``ROPE_INIT_FUNCTIONS``). No scaling is ``rope_scaling=None``.

    Fields a type does not use keep their defaults: ``factor`` (all types),
    ``low/high_freq_factor`` (llama3), ``original_max_position_embeddings`` (llama3, yarn,
    longrope), ``beta_fast/beta_slow/truncate`` (yarn), ``short_factor/long_factor`` (longrope:
    one factor per frequency, head_dim / 2 of them), ``attention_factor`` (yarn, longrope: the
    multiplier of cos and sin, resolved from the HF config when it omits it).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: RopeType = "llama3"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def fields_used(self) -> tuple[str, ...]:
        """The fields that ``rope_type`` reads (the keys of its HF ``rope_scaling``)."""
        return {
            "linear": ("factor",),
            "dynamic": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": (
                "factor",
                "original_max_position_embeddings",
                "beta_fast",
                "beta_slow",
                "truncate",
                "attention_factor",
            ),
            "longrope": (
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
                "short_factor",
                "long_factor",
            ),
        }[self.rope_type]

    def __repr__(self) -> str:
        used = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.fields_used())
        return f"RopeScaling(rope_type={self.rope_type!r}, {used})"

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: use one of {ROPE_TYPES}")
        object.__setattr__(self, "short_factor", tuple(self.short_factor))
        object.__setattr__(self, "long_factor", tuple(self.long_factor))


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    """Hidden size of the SwiGLU MLP (HF ``intermediate_size``)."""
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_seq_len: int = 131072
    """Longest sequence the model serves (HF ``max_position_embeddings``)."""
    activation_checkpoint: ActivationCheckpoint = "none"
    """none | selective (recompute each MLP: its ffn_dim-wide activations dominate) | full
    (recompute each transformer block)."""
    head_dim: int | None = None
    """Width of one attention head; None: dim / n_heads (HF ``head_dim``)."""

    def __post_init__(self) -> None:
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; give head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.activation_checkpoint not in ACTIVATION_CHECKPOINT_MODES:
            raise ValueError(
                f"activation_checkpoint={self.activation_checkpoint!r}: use one of {ACTIVATION_CHECKPOINT_MODES}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd: RoPE rotates pairs of features")

    def with_(self, **changes) -> ModelArgs:
        """A copy with ``changes``; a head_dim derived from dim / n_heads is derived again."""
        if "head_dim" not in changes and self.head_dim * self.n_heads == self.dim:
            changes["head_dim"] = None
        return replace(self, **changes)


_LLAMA32_ROPE = RopeScaling(factor=32.0)
_LLAMA31_ROPE = RopeScaling(factor=8.0)

FLAVORS: dict[str, ModelArgs] = {
    # Tiny and CPU-fast; vocab of the bundled 8k BPE tokenizer.
    "debug": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=8192,
        ffn_dim=768,
        rope_theta=500000.0,
        rope_scaling=_LLAMA32_ROPE,
        tie_word_embeddings=True,
        max_seq_len=2048,
    ),
    # ~80M parameters with the 8k tokenizer: the QAT experiment's pre-train on one GPU.
    "80M": ModelArgs(
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        vocab_size=8192,
        ffn_dim=2048,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_seq_len=4096,
    ),
    # Llama 3.2 1B / 3B, Llama 3.1 8B, Llama 3.3 70B (published HF configs).
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_scaling=_LLAMA32_ROPE,
        tie_word_embeddings=True,
    ),
    "3B": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_scaling=_LLAMA32_ROPE,
        tie_word_embeddings=True,
    ),
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        rope_scaling=_LLAMA31_ROPE,
    ),
}


def flavor(name: str) -> ModelArgs:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown Llama 3 flavor {name!r}; choose one of {sorted(FLAVORS)}") from None


def model_args_json(args: ModelArgs) -> str:
    """ModelArgs as JSON (stored in every training checkpoint)."""
    return json.dumps(asdict(args), indent=2)


def model_args_from_json(text: str) -> ModelArgs:
    d = json.loads(text)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelArgs(**{f.name: d[f.name] for f in fields(ModelArgs) if f.name in d})
