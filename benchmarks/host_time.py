"""CPU time to enqueue a QAT projection's work, piece by piece, against bf16 (one CUDA GPU).

    python benchmarks/host_time.py [--k 2048 --widths 2048 512 512 --tokens 8192] [--eager] [--python] [--trace DIR]

A training step is launch-bound where the CPU needs longer to enqueue a layer than the GPU to
run it. Each figure is microseconds of CPU per call, with the GPU held busy (``torch.cuda._sleep``)
so that no launch waits for the device: forward + backward of the Llama block projection (eager
and compiled, bf16 and QAT) and the pieces a QAT call is made of. ``--python``: cProfile's
functions with the most own and cumulative time over the QAT forward + backward (eager, compiled);
``--trace DIR``: a torch.profiler CPU trace of each forward + backward row (chrome://tracing).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from benchmarks.utils import Projection, require_cuda  # noqa: E402
from nvfp4 import kernels  # noqa: E402
from nvfp4.qat.autograd import _forward, _qat_linear, _QATLinearFn  # noqa: E402


def enqueue_us(fn, calls: int = 20, repeat: int = 5) -> float:
    """Median over repeats of the CPU microseconds per fn() while the GPU spins."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda._sleep(200_000_000)  # ~100 ms: longer than the calls take to enqueue
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--widths", type=int, nargs="+", default=[2048, 512, 512])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--eager", action="store_true", help="skip the compiled rows")
    p.add_argument("--python", action="store_true")
    p.add_argument("--trace", type=Path, help="write a Chrome trace (CPU ops) of each fwd+bwd row here")
    a = p.parse_args()
    require_cuda("host_time.py")
    x = torch.randn(a.tokens, a.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gys = [torch.randn(a.tokens, n, device="cuda", dtype=torch.bfloat16) for n in a.widths]
    ref, qat = (Projection(a.k, tuple(a.widths), q).to("cuda", torch.bfloat16) for q in (False, True))
    fwd_bwd = lambda m: lambda: torch.autograd.backward(m(x), gys)  # noqa: E731
    rows = {"bf16 eager fwd+bwd": fwd_bwd(ref), "QAT eager fwd+bwd": fwd_bwd(qat)}
    if not a.eager:
        rows |= {
            "bf16 compiled fwd+bwd": fwd_bwd(torch.compile(ref)),
            "QAT compiled fwd+bwd": fwd_bwd(torch.compile(qat)),
        }
    ws = [m.weight for m in qat.linears]
    xd, wd = x.detach(), [w.detach() for w in ws]
    sx = nvfp4.tensor_scale(nvfp4.amax(xd))
    sw = nvfp4.tensor_scale(nvfp4.amax(*wd))
    args = (xd, None, sx, sw, "pow2", "amax", *wd)
    n, s_all = len(wd), [sx] * (1 + len(wd))
    qs = [(q[0], q[1], None) for q in kernels.quantize([xd, *wd], s_all)]
    times = {name: enqueue_us(fn) for name, fn in rows.items()}
    launches = -(-(n + 1) // kernels.SLOTS)
    pieces = {
        "amax and scale of x (1 launch)": lambda: kernels.amaxes_and_scales([[xd]], "pow2"),
        f"amaxes and scales of x and of the {n} W ({launches} launches)": lambda: kernels.amaxes_and_scales(
            [[xd], wd], "pow2"
        ),
        f"quantize x + {n} W ({launches} launches)": lambda: kernels.quantize([xd, *wd], s_all, True),
        "quantize x alone (1 launch)": lambda: kernels.quantize([xd], [sx], True),
        f"dequantize x + {n} W ({launches} launches)": lambda: kernels.dequantize(qs, torch.bfloat16),
        "torch.mm (one GEMM)": lambda: torch.mm(xd, wd[0].t()),
        "torch.empty": lambda: torch.empty(a.tokens, a.k, device="cuda"),
        "qat._forward (the quantize and GEMM glue)": lambda: _forward(xd, wd, None, sx, sw, "pow2", "amax"),
        "_QATLinearFn.apply, no grad": lambda: _QATLinearFn.apply(*args),
        "custom op nvfp4::qat_linear, no grad": lambda: _qat_linear(xd, wd, None, sx, sw, "pow2", "amax"),
    }
    with torch.no_grad():
        times |= {name: enqueue_us(fn) for name, fn in pieces.items()}
    print(f"{torch.cuda.get_device_name()}: K={a.k}, widths {a.widths}, {a.tokens} tokens; torch {torch.__version__}\n")
    print("| call | CPU us per call |\n|---|---:|")
    for name, us in times.items():
        print(f"| {name} | {us:.0f} |")
    if a.trace:
        a.trace.mkdir(parents=True, exist_ok=True)
        for name, fn in rows.items():
            torch.cuda._sleep(200_000_000)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            prof.export_chrome_trace(str(a.trace / (name.replace(" ", "_").replace("+", "") + ".json")))
    for name in [r for r in rows if r.startswith("QAT")] if a.python else ():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            rows[name]()
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n## {name}, 20 calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
