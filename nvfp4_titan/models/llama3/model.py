"""Llama 3 in plain modules, with TorchTitan parameter names (``layers.N.attention.wq``).

RoPE uses the Hugging Face (rotate-half) layout, so HF weights load without permuting
wq/wk; a row permutation would not change NVFP4 codes anyway (blocks run along K).
Built on the meta device, then ``to_empty`` + ``init_weights()`` on the target device.
The model has no buffers: RoPE tables are computed per forward.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from nvfp4_titan.models.llama3.args import ModelArgs
from nvfp4_titan.models.llama3.rope import apply_rope, rope_tables


def shared_input(linears: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """``[m(x) for m in linears]``; linears that can share work on a common input (QAT linears
    quantize it once) say so with a ``forward_shared`` static method."""
    shared = getattr(type(linears[0]), "forward_shared", None)
    return shared(linears, x) if shared else [m(x) for m in linears]


def _param_seed(seed: int, name: str) -> int:
    """A parameter's own seed, independent of the order and the set of parameters drawn; 32 bits,
    as the CPU generator (mt19937) ignores the rest of a seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest(), "little")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask``: None (causal over the whole row) or [B, 1, S, S] bool, True where a query
        (row) may attend to a key (column): packed examples' block-diagonal causal mask."""
        bs, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q, k, v = (y.view(bs, seq, -1, self.head_dim) for y in shared_input((self.wq, self.wk, self.wv), x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, is_causal=mask is None, enable_gqa=True
        )  # [B, H, S, D]
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); HF gate_proj = w1, up_proj = w3, down_proj = w2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input((self.w1, self.w3), x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm attention + SwiGLU MLP. Activation checkpointing happens inside ``forward``, so a
    compiled block traces the checkpoint as a region of its own graph (TorchTitan wraps blocks
    before compiling them). A checkpoint called around a compiled block recomputes through
    another graph than the forward's: backward stopped with CheckpointError on CUDA (8B recipe)."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.full_ac = args.activation_checkpoint == "full"
        self.selective_ac = args.activation_checkpoint == "selective"
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def checkpointed_modules(self) -> list[nn.Module]:
        """The submodules whose forward activation checkpointing runs again in backward."""
        return [self] if self.full_ac else [self.feed_forward, self.ffn_norm] if self.selective_ac else []

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.ffn_norm(h))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.full_ac and torch.is_grad_enabled():
            return checkpoint(self._block, x, cos, sin, mask, use_reentrant=False)
        return self._block(x, cos, sin, mask)

    def _block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        if self.selective_ac and torch.is_grad_enabled():
            return h + checkpoint(self._mlp, h, use_reentrant=False)
        return h + self._mlp(h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head (``to_empty`` unties them)."""
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def get_output_embeddings(self) -> nn.Linear:
        """The output head (Hugging Face's accessor name): the export contract keeps it in high
        precision (``nvfp4.export.export_problems``)."""
        return self.output

    def fused_linear_groups(self) -> list[list[str]]:
        """Linears that inference engines fuse into one GEMM (one weight tensor scale)."""
        groups = []
        for i in range(len(self.layers)):
            p = f"layers.{i}"
            groups.append([f"{p}.attention.wq", f"{p}.attention.wk", f"{p}.attention.wv"])
            groups.append([f"{p}.feed_forward.w1", f"{p}.feed_forward.w3"])
        return groups

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter in place (after ``to_empty`` from the meta device).

        Each parameter is drawn whole on its device from a generator seeded by ``seed`` and its
        name, and a sharded parameter (DTensor: FSDP2, TP) keeps its shard of that draw. So the
        initial model is bitwise the same for 1 process and every FSDP/TP layout of one device
        type (CPU and CUDA draw differently). Drawing per shard would not be: DTensor's RNG
        tracker offsets CUDA streams by shard, not as one process draws, and has none on CPU.
        Costs each rank one full draw of the model, one parameter at a time.
        """
        self.tie_weights()
        for name, p in self.named_parameters():
            shard = p.to_local() if isinstance(p, DTensor) else p
            whole = torch.empty(p.shape, dtype=p.dtype, device=shard.device)
            gen = torch.Generator(shard.device).manual_seed(_param_seed(seed, name))
            self._init_rule(name)(whole, gen)
            if isinstance(p, DTensor):  # this rank's piece, without communication
                whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
            shard.copy_(whole)

    def _init_rule(self, name: str) -> Callable[[torch.Tensor, torch.Generator], object]:
        """How parameter ``name`` is drawn: TorchTitan's Llama init, whose output projections
        (wo, w2, w3) shrink with depth."""
        if name.endswith("norm.weight"):
            return lambda t, g: nn.init.ones_(t)
        if name == "tok_embeddings.weight":
            return lambda t, g: nn.init.normal_(t, std=0.02, generator=g)
        if name == "output.weight":
            std = self.args.dim**-0.5
            return lambda t, g: nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=g)
        layer = int(name.split(".")[1])  # layers.N.<module>.weight
        shrinks = name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"))
        std = 0.02 / math.sqrt(2 * (layer + 1)) if shrinks else 0.02
        return lambda t, g: nn.init.trunc_normal_(t, std=std, generator=g)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] int64 -> logits [B, S, vocab].

        ``segments`` [B, S] int (packed examples): the example each token belongs to, equal ids
        contiguous. Positions then restart at each example and attention never crosses one
        (``packed_positions_and_mask``), so each example's logits are those it gets alone
        (tested to rounding: the masked attention sums other keys' zeros). None: one sequence per
        row, causal attention (the plain-text path)."""
        seq = tokens.shape[1]
        rs = self.args.rope_scaling
        if seq > self.args.max_seq_len and not (rs and rs.rope_type == "dynamic"):  # dynamic NTK extends
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = rope_tables(self.args, seq, tokens.device)
        mask = None
        if segments is not None:
            positions, mask = packed_positions_and_mask(segments)
            cos, sin = cos[positions], sin[positions]  # [B, S, D]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.output(self.norm(h))


def packed_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``segments`` [B, S] (each token's example, equal ids contiguous): the position of each
    token within its example [B, S] int64, and the block-diagonal causal attention mask
    [B, 1, S, S] bool (a token sees the tokens of its own example up to itself), as
    transformers' packed-sequence Llama and FlexAttention document masking define them."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # where each token's example starts
    same = segments[:, :, None] == segments[:, None, :]
    return idx - first, (same & (idx[:, None] >= idx[None, :])).unsqueeze(1)
