"""Where a QAT training step's extra time goes: torch.profiler over the Llama 1B step of bench.py.

    python benchmarks/profile_step.py [--layers 4] [--eager] [--steps 3] [--python | --timeline N]

Per mode (bf16, QAT dynamic, QAT static): wall ms per step, GPU-busy ms (sum of kernel times),
kernels per step, and the kernels with the most GPU time, so that the QAT-only kernels and the
gap between wall and GPU time (launch-bound stretches) can be read off; then the ops with the
most CPU time. ``--python``: instead, cProfile's Python functions with the most own time (where
the CPU time of a launch-bound step goes: dispatch, kernel launches, wrappers). ``--timeline N``:
no profiler; N steps back to back as training runs them, each step's GPU time (CUDA events at
step starts) and the CPU's time in ``step()`` (which equals the GPU's once the CPU is a full
launch queue ahead, so the GPU times tell: steps slower than bf16's at random are CPU-bound ones).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.utils import STEP_MODES, build_step, profiled, require_cuda  # noqa: E402
from nvfp4_titan.training.config import Training  # noqa: E402
from nvfp4_titan.training.runtime import ScheduledGC  # noqa: E402


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


def timeline(step, steps: int, mode: str) -> None:
    """A table row: CPU and GPU ms per step (median, max), and every step's GPU ms."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    cpu = []
    torch.cuda.synchronize()
    for i in range(steps):
        starts[i].record()
        t = time.perf_counter()
        step()
        cpu.append((time.perf_counter() - t) * 1e3)
    starts[-1].record()
    torch.cuda.synchronize()
    gpu = [a.elapsed_time(b) for a, b in zip(starts, starts[1:])]
    med = statistics.median
    print(
        f"| {mode} | {med(cpu):.1f} | {max(cpu):.1f} | {med(gpu):.1f} | {min(gpu):.1f} | {max(gpu):.1f} | "
        f"{' '.join(f'{g:.0f}' for g in gpu)} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=15, help="ops listed by GPU time and by CPU time")
    p.add_argument("--python", action="store_true", help="cProfile the Python functions instead")
    p.add_argument("--timeline", type=int, metavar="N", help="time N steps without the profiler (see above)")
    a = p.parse_args()
    require_cuda("profile_step.py")
    print(f"{torch.cuda.get_device_name()}: Llama 1B ({a.layers} layers) step, compile={not a.eager}")
    if a.timeline:
        print(
            "\n| mode | CPU ms median | CPU ms max | GPU ms median | GPU ms min | GPU ms max | GPU ms per step |\n"
            "|---|---:|---:|---:|---:|---:|---|"
        )
    for mode in STEP_MODES:
        step = build_step(mode, not a.eager, a.layers)
        if a.timeline:
            with ScheduledGC(Training.gc_freq) as collector:  # as bench.py and the trainer
                timeline(lambda step=step: (step(), collector.tick()), a.timeline, mode)
        elif a.python:
            python_profile(step, a.steps, a.rows, mode)
        else:
            prof, wall, busy, kernels = profiled(step, a.steps)
            print(f"\n## {mode}: wall {wall:.1f} ms (profiled), GPU busy {busy:.1f} ms, {kernels:.0f} kernels per step")
            for key in ("self_cuda_time_total", "self_cpu_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=70))
        del step  # build_step frees it


if __name__ == "__main__":
    main()
