"""What the NVFP4 all-gather adds to an FSDP2 step on one GPU, without the wire: Q of
benchmarks/fsdp_wire_model.py.

Per block of a Llama flavor, with the block's QAT weights split over ``--shards`` FSDP ranks and
``--tokens`` tokens per rank (the recipes' 1B: 4 x 2048 = 8192):

- pre: ``NVFP4TrainingWeight.fsdp_pre_all_gather`` of one rank's shard of every weight (cast to
  bf16, quantize with the whole weight's tensor scale, pack rows), twice per step (forward, and
  the backward's gather after resharding);
- post: ``fsdp_post_all_gather`` of the gathered rows (unpack codes and block scales), twice;
- amax: ``precompute_weight_scales``' local part, the amax of the block's shards, once per step;
- linears: forward + backward of the block's QAT linears given the gathered NVFP4 weights,
  against the plain path (gathered bf16 weights, quantized inside the linear). The two give the
  same outputs and gradients bit for bit (checked here), so the time difference is overhead.

Q per step = layers x (2 (pre + post) + amax + linears(NVFP4) - linears(bf16)). Times are medians
of CUDA-event intervals around each call as issued from Python (the host's enqueue time counts,
as it does in an eager step) and, ``gpu_only``, of the kernels alone. No collective runs.

    python benchmarks/fsdp_nvfp4_overhead.py --flavor 1B --shards 2 --tokens 8192 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.utils import Projection, block_projections, require_cuda, timed  # noqa: E402
from nvfp4.format import amax, tensor_scale  # noqa: E402
from nvfp4.fsdp_tensors import NVFP4TrainingWeight  # noqa: E402
from nvfp4_titan.models.llama3 import FLAVORS  # noqa: E402

BF16 = torch.bfloat16


def _gathered(w: torch.Tensor, shards: int, scale: torch.Tensor) -> tuple[NVFP4TrainingWeight, torch.Tensor]:
    """(rank 0's shard, wrapped as FSDP2 holds it; the rows every rank's pre-all-gather gives,
    concatenated as the all-gather delivers them)."""
    parts = []
    for piece in w.float().chunk(shards):
        shard = NVFP4TrainingWeight(piece.contiguous(), BF16)
        shard.scale = scale
        (rows,), _ = shard.fsdp_pre_all_gather(None, None, None, None, None)
        parts.append((shard, rows))
    return parts[0][0], torch.cat([rows for _, rows in parts])


def measure_block(flavor: str, shards: int, tokens: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per block: pre, post, amax (one call each over all the block's weights) and
    the linears' forward + backward, plain and with NVFP4 weights, wall and GPU-only."""
    torch.manual_seed(0)
    groups = []
    for _, k, widths in block_projections(flavor):
        plain = Projection(k, widths, qat=True).to(device, BF16)
        x = torch.randn(tokens, k, device=device, dtype=BF16, requires_grad=True)
        groups.append((plain, x))
    weights = [m.weight for plain, _ in groups for m in plain.linears]
    # every weight's own tensor scale: the cost does not depend on which scale
    scales = [tensor_scale(amax(w.detach()), "pow2") for w in weights]
    gathered = [_gathered(w.detach(), shards, s) for w, s in zip(weights, scales)]
    shards_, rows = [g[0] for g in gathered], [g[1] for g in gathered]

    def pre() -> None:
        for s in shards_:
            s.fsdp_pre_all_gather(None, None, None, None, None)

    def post() -> list[torch.Tensor]:
        return [s.fsdp_post_all_gather((r,), (s.scale,), BF16)[0] for s, r in zip(shards_, rows)]

    def local_amax() -> None:
        torch.stack([amax(s._tensor) for s in shards_])

    nvfp4_groups = []
    it = iter(post())
    for plain, x in groups:
        twin = Projection(x.shape[-1], tuple(m.out_features for m in plain.linears), qat=True).to(device, BF16)
        for m in twin.linears:
            m.weight = torch.nn.Parameter(next(it), requires_grad=True)  # as FSDP2's unsharded parameter
        nvfp4_groups.append((twin, x))

    def linears(pairs) -> list[torch.Tensor]:
        out = []
        for module, x in pairs:
            ys = module(x)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
            out += [*ys, x.grad.clone(), *(m.weight.grad for m in module.linears)]
            x.grad = None
            for m in module.linears:
                m.weight.grad = None
        return out

    for a, b in zip(linears(groups), linears(nvfp4_groups)):  # the same work, so the difference is overhead
        if not torch.equal(a, b):
            raise AssertionError("the NVFP4-gathered linears differ from the plain QAT linears")
    result = {}
    for name, fn in (
        ("pre", pre),
        ("post", post),
        ("amax", local_amax),
        ("linears_bf16", lambda: linears(groups)),
        ("linears_nvfp4", lambda: linears(nvfp4_groups)),
    ):
        result[f"{name}_ms"] = timed(fn)
        result[f"{name}_gpu_ms"] = timed(fn, gpu_only=True)
    return result


def overhead_per_step(block: dict[str, float], n_layers: int, key: str = "ms") -> float:
    """Q in seconds: the NVFP4 all-gather's extra time per step (``key`` "ms" or "gpu_ms")."""
    b = block
    per_block = 2 * (b[f"pre_{key}"] + b[f"post_{key}"]) + b[f"amax_{key}"]
    per_block += b[f"linears_nvfp4_{key}"] - b[f"linears_bf16_{key}"]
    return n_layers * per_block / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="1B", choices=sorted(FLAVORS))
    p.add_argument("--shards", type=int, default=2, help="FSDP ranks sharing each weight")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    p.add_argument("--json", type=Path, help="also write the figures to this file (fsdp_wire_model.py --overhead)")
    a = p.parse_args()
    require_cuda("fsdp_nvfp4_overhead.py")
    block = measure_block(a.flavor, a.shards, a.tokens, torch.device("cuda"))
    n_layers = FLAVORS[a.flavor].n_layers
    row = {
        "flavor": a.flavor,
        "shards": a.shards,
        "tokens": a.tokens,
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **{k: round(v, 4) for k, v in block.items()},
        "q_s": overhead_per_step(block, n_layers),
        "q_gpu_s": overhead_per_step(block, n_layers, "gpu_ms"),
    }
    print(f"{a.flavor}, {a.shards} shards, {a.tokens} tokens per rank, {row['card']}, per block (ms, wall / GPU):")
    for name in ("pre", "post", "amax", "linears_bf16", "linears_nvfp4"):
        print(f"  {name:14s} {block[f'{name}_ms']:8.3f} / {block[f'{name}_gpu_ms']:8.3f}")
    print(f"Q per step ({n_layers} layers): {row['q_s'] * 1e3:.1f} ms wall, {row['q_gpu_s'] * 1e3:.1f} ms GPU")
    if a.json:
        a.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
