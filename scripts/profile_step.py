"""Where a QAT training step's extra time goes: torch.profiler over the Llama 1B step of bench.py.

    python scripts/profile_step.py [--layers 4] [--eager] [--steps 3] [--python]

Per mode (bf16, QAT dynamic, QAT static): wall ms per step, GPU-busy ms (sum of kernel times),
kernels per step, and the kernels with the most GPU time, so that the QAT-only kernels and the
gap between wall and GPU time (launch-bound stretches) can be read off; then the ops with the
most CPU time. ``--python``: instead, cProfile's Python functions with the most own time (where
the CPU time of a launch-bound step goes: dispatch, kernel launches, wrappers).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench import STEP_MODES, build_step  # noqa: E402
from scripts.profile_linear import profiled  # noqa: E402


def python_profile(step, steps: int, rows: int, mode: str) -> None:
    """cProfile over ``steps`` steps: the functions with the most own time, per step."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    print(f"\n## {mode}: {stats.total_tt / steps * 1e3:.1f} ms of profiled Python per step")
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats("nvfp4|triton|autograd", rows)  # inclusive, our layers
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=15, help="ops listed by GPU time and by CPU time")
    p.add_argument("--python", action="store_true", help="cProfile the Python functions instead")
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}: Llama 1B ({a.layers} layers) step, compile={not a.eager}")
    for mode in STEP_MODES:
        step = build_step(mode, not a.eager, a.layers)
        if a.python:
            python_profile(step, a.steps, a.rows, mode)
            continue
        prof, wall, busy, kernels = profiled(step, a.steps)
        print(f"\n## {mode}: wall {wall:.1f} ms (profiled), GPU busy {busy:.1f} ms, {kernels:.0f} kernels per step")
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=70))
        del step  # build_step frees it


if __name__ == "__main__":
    main()
