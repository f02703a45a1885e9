"""Rotary position embedding tables, as transformers' Llama computes them.

Every ``rope_type`` that transformers' ``LlamaRotaryEmbedding`` accepts (default, linear,
dynamic, yarn, longrope, llama3), formula by formula from transformers 5.24
``modeling_rope_utils.py`` (``_compute_*_parameters`` and ``dynamic_rope_update``); the
logits parity tests check each against ``LlamaForCausalLM``.
"""

from __future__ import annotations

import math

import torch

from nvfp4_titan.models.llama3.args import ModelArgs, RopeScaling


def _powers(theta: float, d: int, device: torch.device) -> torch.Tensor:
    """theta ** (2i / d), i < d / 2, fp32 (transformers builds the exponent in int64 then float)."""
    return theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)


def _llama3(inv_freq: torch.Tensor, rs: RopeScaling) -> torch.Tensor:
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, d: int, rs: RopeScaling, device: torch.device) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return (d * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, d, 2).to(device=device, dtype=torch.float) / d)
    extrapolation = 1 - ramp
    return (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_freq(args: ModelArgs, seq_len: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, cos/sin multiplier) for sequences of ``seq_len``
    positions. dynamic and longrope depend on ``seq_len``, as transformers' forward makes them."""
    d, theta, rs = args.head_dim, args.rope_theta, args.rope_scaling
    if rs is None:
        return 1.0 / _powers(theta, d, device), 1.0
    if rs.rope_type == "linear":
        return 1.0 / _powers(theta, d, device) / rs.factor, 1.0
    if rs.rope_type == "llama3":
        return _llama3(1.0 / _powers(theta, d, device), rs), 1.0
    if rs.rope_type == "dynamic":  # NTK: the base grows once sequences pass max_position_embeddings
        longest = max(seq_len, args.max_seq_len)
        base = theta * ((rs.factor * longest / args.max_seq_len) - (rs.factor - 1)) ** (d / (d - 2))
        return 1.0 / _powers(base, d, device), 1.0
    if rs.rope_type == "yarn":
        return _yarn(theta, d, rs, device), rs.attention_factor
    # longrope: per-frequency factors, the long set past the original context
    ext = rs.long_factor if seq_len > rs.original_max_position_embeddings else rs.short_factor
    ext_t = torch.tensor(ext, dtype=torch.float32, device=device)
    return 1.0 / (ext_t * _powers(theta, d, device)), rs.attention_factor


def rope_tables(args: ModelArgs, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim] fp32, as HF's LlamaRotaryEmbedding computes them.

    Computed per forward (a few KFLOPs): no buffers to materialize, shard or checkpoint.
    """
    freq, scale = inv_freq(args, seq_len, device)
    pos = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, freq)  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos, sin [S, D] (every row's positions 0..S-1) or [B, S, D] (per-token
    positions: packed examples)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
