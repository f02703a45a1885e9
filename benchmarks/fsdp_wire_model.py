"""When FP4 on the wire pays: a model of one FSDP2 step with the bf16 or the NVFP4 all-gather,
and the bus bandwidth below which the NVFP4 one is faster (docs/distributed.md, "When FP4 on the
wire pays").

FSDP2 prefetches each block's all-gather while the block before it computes, and reduce-scatters
gradients while the backward goes on; a step takes the longer of its compute and its traffic:

    t_bf16(B)  = max(C,           (A_bf16  + R) / B)    compiled, as the recipes run
    t_nvfp4(B) = max(C_eager + Q, (A_nvfp4 + R) / B)    the NVFP4 all-gather runs eager only

- A: bytes one rank receives from a step's all-gathers: each block twice (forward, and backward
  after resharding), the root module (embedding, final norm, untied head) once, times
  (N - 1) / N; QAT weights at 2 bytes (bf16) or 9/16 (NVFP4: a 4-bit code and one E4M3 scale per
  16), the rest bf16 (``gathered_bytes`` is what benchmarks/fsdp_all_gather_bytes.py counts).
- R: the reduce-scatter of fp32 gradients, 4 bytes per parameter times (N - 1) / N, the same in
  both (under HSDP the replicas' all-reduce adds to both alike).
- B: the all-gather's bus bandwidth (NCCL-tests' busbw) over the FSDP shard group.
- C, C_eager: the step's compute per rank, compiled and eager; Q: what the NVFP4 all-gather adds
  to an eager step (benchmarks/fsdp_nvfp4_overhead.py measures it on one GPU).

The NVFP4 all-gather is faster exactly where (A_bf16 + R) / B > C_eager + Q, below

    B* = (A_bf16 + R) / (C_eager + Q).

HSDP with one replica per node, for comparison: its all-gathers stay on NVLink, and only the
replicas' gradient all-reduce, 2 (M - 1) / M x 4 bytes per parameter per node, crosses the network.

    python benchmarks/fsdp_wire_model.py [--gpus 16] [--overhead-from Q.json]     # the 1B record
    python benchmarks/fsdp_wire_model.py --flavor 8B --compute S --eager-compute S --overhead S
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.models.llama3 import FLAVORS, ModelArgs  # noqa: E402

NVFP4_BYTES = 9 / 16  # per element: a 4-bit code and a one-byte E4M3 scale per 16
BF16_BYTES, FP32_BYTES = 2, 4


def block_params(a: ModelArgs) -> tuple[int, int]:
    """(QAT weight elements, other elements) of one transformer block: wq, wk, wv, wo, w1, w2, w3
    (every block linear is quantized by default) and the two norms."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return a.dim * (q + 2 * kv) + q * a.dim + 3 * a.dim * a.ffn_dim, 2 * a.dim


def root_params(a: ModelArgs) -> int:
    """Elements of the root module's own parameters (bf16 in both: the output head is excluded from
    QAT by default): the embedding, the final norm, the untied output head."""
    return a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2) + a.dim


def gathered_bytes(a: ModelArgs, nvfp4: bool) -> float:
    """Bytes the all-gathers of one forward + backward deliver to each rank, its own shard included
    (what benchmarks/fsdp_all_gather_bytes.py counts; times (N - 1) / N is what crosses the wire).
    Blocks are gathered twice, the root once (FSDP2 keeps the root unsharded after forward)."""
    qat, other = block_params(a)
    block = qat * (NVFP4_BYTES if nvfp4 else BF16_BYTES) + other * BF16_BYTES
    return 2 * a.n_layers * block + root_params(a) * BF16_BYTES


def reduced_bytes(a: ModelArgs) -> float:
    """Bytes of the fp32 gradients one step reduce-scatters (times (N - 1) / N on the wire)."""
    qat, other = block_params(a)
    return FP32_BYTES * (a.n_layers * (qat + other) + root_params(a))


@dataclass(frozen=True)
class StepTimes:
    """Seconds per step and rank: C (compiled), C_eager, Q (the NVFP4 all-gather's overhead)."""

    compute: float
    eager_compute: float
    overhead: float


# The record: issue #25's table (commit 7dc831f, 2 x H200 over NVLink, the 1B recipe under FSDP=2,
# seq 2048, global batch 8 = 8192 tokens per rank): QAT compiled 79.2k tokens/s; eager with the
# bf16 all-gather 51.7-54.7k, with the NVFP4 all-gather 39.2-41.1k (midpoints below). NVLink moves
# the 1B step's traffic in ~15 ms, so these are compute: C, C_eager, C_eager + Q.
RECORD_TOKENS = 16384
RECORD = StepTimes(
    compute=RECORD_TOKENS / 79.2e3,
    eager_compute=RECORD_TOKENS / 53.2e3,
    overhead=RECORD_TOKENS / 40.15e3 - RECORD_TOKENS / 53.2e3,
)

# Bus bandwidths, GB/s, nominal (NCCL reaches 70-90% of them): NVLink 4 (H100/H200 SXM, 18 links)
# per direction; across nodes the node's network, all its NICs together.
LINKS = {
    "NVLink (one node, H100/H200)": 450.0,
    "InfiniBand 400 Gb/s, one NIC per GPU (8 per node)": 400.0,
    "InfiniBand 400 Gb/s, one NIC per node": 50.0,
    "Ethernet 100 Gb/s, one NIC per node": 12.5,
}


def step_seconds(a: ModelArgs, gpus: int, bandwidth_gbs: float, t: StepTimes) -> tuple[float, float]:
    """(t_bf16, t_nvfp4): predicted seconds per step with FSDP over ``gpus`` ranks whose all-gathers
    run at ``bandwidth_gbs`` GB/s bus bandwidth."""
    wire = (gpus - 1) / gpus / (bandwidth_gbs * 1e9)
    r = reduced_bytes(a)
    return (
        max(t.compute, (gathered_bytes(a, False) + r) * wire),
        max(t.eager_compute + t.overhead, (gathered_bytes(a, True) + r) * wire),
    )


def hsdp_step_seconds(a: ModelArgs, nodes: int, bandwidth_gbs: float, t: StepTimes) -> float:
    """Predicted seconds per step under HSDP, one replica per node (compiled, bf16 all-gathers on
    NVLink, hidden behind compute): the replicas' all-reduce of the fp32 gradients, 2 (M - 1) / M
    times the gradient bytes per node, crosses the network at ``bandwidth_gbs``."""
    return max(t.compute, 2 * (nodes - 1) / nodes * reduced_bytes(a) / (bandwidth_gbs * 1e9))


def crossover_gbs(a: ModelArgs, gpus: int, t: StepTimes) -> float:
    """B*: the bus bandwidth (GB/s) below which the NVFP4 all-gather gives the shorter step."""
    return (gathered_bytes(a, False) + reduced_bytes(a)) * (gpus - 1) / gpus / (t.eager_compute + t.overhead) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="1B", choices=sorted(FLAVORS))
    p.add_argument("--gpus", type=int, default=16, help="FSDP shard group: ranks sharing each weight")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the HSDP column: one replica per node")
    p.add_argument("--compute", type=float, help="C: seconds per compiled step and rank (default: the record)")
    p.add_argument("--eager-compute", type=float, help="C_eager: seconds per eager step (default: the record)")
    p.add_argument("--overhead", type=float, help="Q: seconds the NVFP4 all-gather adds per step (default: the record)")
    p.add_argument("--overhead-from", type=Path, help="Q from the JSON of fsdp_nvfp4_overhead.py --json")
    a = p.parse_args()
    if a.overhead_from:
        a.overhead = json.loads(a.overhead_from.read_text())["q_s"]
    given = (a.compute, a.eager_compute, a.overhead)
    if a.flavor != "1B" and None in given:
        p.error(
            "the recorded step times are the 1B recipe's (8192 tokens per rank on H200): for another flavor give "
            "--compute and --eager-compute (benchmarks/recipes.py) and --overhead or --overhead-from"
        )
    t = StepTimes(
        *(g if g is not None else r for g, r in zip(given, (RECORD.compute, RECORD.eager_compute, RECORD.overhead)))
    )
    args = FLAVORS[a.flavor]
    print(
        f"{a.flavor}, FSDP over {a.gpus} ranks: C {t.compute * 1e3:.0f} ms, C_eager {t.eager_compute * 1e3:.0f} ms, "
        f"Q {t.overhead * 1e3:.0f} ms; all-gathered per step {gathered_bytes(args, False) / 1e9:.2f} GB bf16, "
        f"{gathered_bytes(args, True) / 1e9:.2f} GB NVFP4; reduce-scattered {reduced_bytes(args) / 1e9:.2f} GB"
    )
    print(f"crossover B* = {crossover_gbs(args, a.gpus, t):.1f} GB/s bus bandwidth")
    nodes = max(1, a.gpus // a.gpus_per_node)
    print(
        "| link | B (GB/s) | FSDP, bf16 all-gather (ms) | FSDP, NVFP4 all-gather (ms) | NVFP4 speed / bf16 | "
        f"HSDP, {nodes} replicas (ms) |\n|---|---:|---:|---:|---:|---:|"
    )
    for name, bw in LINKS.items():
        bf16, fp4 = step_seconds(args, a.gpus, bw, t)
        hsdp = f"{hsdp_step_seconds(args, nodes, bw, t) * 1e3:.0f}" if nodes > 1 and "NVLink" not in name else "-"
        print(f"| {name} | {bw:g} | {bf16 * 1e3:.0f} | {fp4 * 1e3:.0f} | {bf16 / fp4:.2f} | {hsdp} |")


if __name__ == "__main__":
    main()
