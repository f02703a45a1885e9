"""Where a QAT linear's time goes: torch.profiler over fwd+bwd of one NVFP4QATLinear vs nn.Linear.

    python benchmarks/profile_linear.py [--k 3072 --n 1024 --tokens 8192 --iters 10]

Prints per iteration: the CPU time to enqueue fwd+bwd (no profiler, no sync), wall ms, GPU-busy ms
(sum of kernel times), kernel launches, and the ops with the most CPU time, so that launch-bound
and bandwidth-bound costs can be told apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from benchmarks.utils import profiled, require_cuda  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=3072)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    require_cuda("profile_linear.py")
    x = torch.randn(a.tokens, a.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(a.tokens, a.n, device="cuda", dtype=torch.bfloat16)
    layers = {
        "bf16": torch.nn.Linear(a.k, a.n, bias=False, device="cuda", dtype=torch.bfloat16),
        "qat": nvfp4.NVFP4QATLinear(a.k, a.n, bias=False, device="cuda", dtype=torch.bfloat16),
    }
    print(f"{torch.cuda.get_device_name()}: linear {a.k} x {a.n}, {a.tokens} tokens, eager fwd+bwd")
    for name, m in layers.items():
        for _ in range(3):
            m(x).backward(gy)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.iters):
            m(x).backward(gy)
        enqueue = (time.perf_counter() - start) / a.iters * 1e3
        torch.cuda.synchronize()
        prof, wall, gpu, kernels = profiled(lambda: m(x).backward(gy), a.iters)
        print(
            f"\n## {name}: CPU enqueue {enqueue:.3f} ms, wall {wall:.3f} ms (profiled), GPU busy {gpu:.3f} ms, "
            f"{kernels:.0f} kernels per iteration"
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
