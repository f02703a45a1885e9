"""QAT vs bf16 on one CUDA GPU: quantize bandwidth, the weight quantize by block scale rule, linear
fwd+bwd, full 1B training step.

    python benchmarks/bench.py [--short] [--out benchmarks/results/bench_<card>.md]
    python benchmarks/bench.py --only block_scale_rule   # four_over_six vs amax weight quantize

Every row is measured side by side in this process (CUDA events, median of repeats after
warm-up); ratios are bf16 time / QAT time (>1: QAT faster). Compile warm-up is excluded.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nvfp4  # noqa: E402
from benchmarks.utils import (  # noqa: E402
    STEP_BATCH,
    STEP_MODES,
    STEP_SEQ,
    Projection,
    block_projections,
    build_step,
    require_cuda,
    timed,
)
from nvfp4 import kernels  # noqa: E402
from nvfp4_titan.training.config import Training  # noqa: E402
from nvfp4_titan.training.runtime import ScheduledGC  # noqa: E402

LINEAR_FLAVORS = ("1B", "3B", "8B")


def bench_bandwidth(rows: list[str], short: bool) -> None:
    rows += [
        "## Quantize bandwidth",
        "",
        "| tensor (bf16) | copy GB/s | quantize GB/s | quantize+operand GB/s | reference GB/s | kernel / copy "
        "| amax GB/s | amax / copy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mib in (64,) if short else (64, 256, 1024):
        n = mib * 2**20 // 2
        x = torch.randn(n // 4096, 4096, device="cuda", dtype=torch.bfloat16)
        s = nvfp4.tensor_scale(nvfp4.amax(x))
        y = torch.empty_like(x)
        t_copy = timed(lambda: y.copy_(x), gpu_only=True)
        t_q = timed(lambda: kernels.quantize([x], [s]), gpu_only=True)
        t_qo = timed(lambda: kernels.quantize([x], [s], with_operand=True)[0], gpu_only=True)
        t_amax = timed(lambda: nvfp4.amax(x), gpu_only=True)
        os.environ["NVFP4_REFERENCE"] = "1"
        t_ref = timed(lambda: nvfp4.quantize_with_scale(x, s), warmup=1, repeat=3)
        os.environ["NVFP4_REFERENCE"] = "0"
        copy_gbs = 2 * x.numel() * 2 / t_copy / 1e6
        q_bytes = x.numel() * (2 + 0.5 + 1 / 16)
        gbs = q_bytes / t_q / 1e6
        rows.append(
            f"| {mib} MiB | {copy_gbs:.0f} | {gbs:.0f} | {(q_bytes + 2 * x.numel()) / t_qo / 1e6:.0f} | "
            f"{q_bytes / t_ref / 1e6:.0f} | {gbs / copy_gbs:.2f} | {2 * x.numel() / t_amax / 1e6:.0f} | "
            f"{2 * x.numel() / t_amax / 1e6 / copy_gbs:.2f} |"
        )
    rows.append("")


def bench_block_scale_rule(rows: list[str], short: bool, flavors: tuple[str, ...] = LINEAR_FLAVORS) -> None:
    """The weight quantize of each block projection's weights (bf16, one launch as the QAT forward
    quantizes them), by block scale rule: codes and scales alone (the NVFP4 all-gather, the
    converter) and with the GEMM operand prescaled by the tensor scales (the QAT forward on CUDA).
    The issue's target: four_over_six at most 1.3x amax."""
    rows += [
        "## Weight quantize by block scale rule, us of GPU time (bf16 weights; four_over_six / amax)",
        "",
        "| flavor | weights | elements | amax | four_over_six | ratio | amax + operand | four_over_six + operand "
        "| ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for flavor in flavors[:1] if short else flavors:
        for name, k, widths in block_projections(flavor):
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n in widths]
            t = {}
            for rule in nvfp4.BLOCK_SCALE_RULES:
                s = nvfp4.tensor_scale(nvfp4.amax(*ws), "pow2", rule)
                rules, scales = [rule] * len(ws), [s] * len(ws)
                t[rule] = timed(lambda: kernels.quantize(ws, scales, block_scale_rules=rules), gpu_only=True)
                operand_scales = [s * 2.0**-10] * len(ws)  # a power of two, as s_x * s_w
                t[rule, "operand"] = timed(
                    lambda: kernels.quantize(ws, scales, True, operand_scales, rules), gpu_only=True
                )
            r, r_op = t["four_over_six"] / t["amax"], t["four_over_six", "operand"] / t["amax", "operand"]
            ratios += [r, r_op]
            us = {key: f"{v * 1e3:.1f}" for key, v in t.items()}
            rows.append(
                f"| {flavor} | {name} {' + '.join(f'{n}x{k}' for n in widths)} | {sum(widths) * k:,} | "
                f"{us['amax']} | {us['four_over_six']} | {r:.2f} | {us['amax', 'operand']} | "
                f"{us['four_over_six', 'operand']} | {r_op:.2f} |"
            )
    rows += ["", f"Largest ratio {max(ratios):.2f} (target: at most 1.3).", ""]


def bench_linears(rows: list[str], short: bool, flavors: tuple[str, ...] = LINEAR_FLAVORS) -> None:
    rows += [
        "## Block projections forward + backward, ms of GPU time (QAT: dynamic activation scale)",
        "",
        "Each row is what one Llama block calls: q/k/v and gate/up share their input (QAT quantizes it "
        "once). Launch latency hidden (`timed(gpu_only=True)`); the last column is the eager ratio of "
        "wall times, launches included, one projection at a time.",
        "",
        "| flavor | projection | K x N | tokens | bf16 eager | QAT eager | bf16/QAT eager | bf16 compiled "
        "| QAT compiled | bf16/QAT compiled | bf16/QAT eager wall |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compile = lambda m: torch.compile(m, dynamic=True)  # noqa: E731  one graph for every shape
    for flavor in flavors:
        if short and flavor != "3B":
            continue
        for name, k, widths in block_projections(flavor):
            for tokens in (8192,) if short else (8192, 16384):
                x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                gys = [torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16) for n in widths]
                ref, qat = (Projection(k, widths, q).to("cuda", torch.bfloat16) for q in (False, True))

                def step(m):
                    torch.autograd.backward(m(x), gys)

                t = [timed(lambda: step(m), gpu_only=True) for m in (ref, qat, compile(ref), compile(qat))]
                wall = [timed(lambda: step(m)) for m in (ref, qat)]
                rows.append(
                    f"| {flavor} | {name} | {k} x {'+'.join(map(str, widths))} | {tokens} | {t[0]:.3f} | "
                    f"{t[1]:.3f} | {t[0] / t[1]:.2f} | {t[2]:.3f} | {t[3]:.3f} | {t[2] / t[3]:.2f} | "
                    f"{wall[0] / wall[1]:.2f} |"
                )
    rows.append("")


STEP_CHAIN = 10  # steps timed back to back, as training runs them (one host sync per 10 steps)


def bench_step(rows: list[str], short: bool) -> None:
    rows += [
        f"## Llama 1B training step (seq {STEP_SEQ}, batch {STEP_BATCH}, bf16 params, FSDP world 1, AdamW)",
        "",
        f"Median over repeats of {STEP_CHAIN} steps run back to back (one host sync per {STEP_CHAIN} steps), "
        f"garbage collection every training.gc_freq={Training.gc_freq} steps as in training.",
        "",
        "| mode | compile | tokens/s | repeats' tokens/s | peak GiB | vs bf16 tokens/s | vs bf16 memory |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for compile in (True,) if short else (False, True):
        base = None
        for mode in STEP_MODES:
            with ScheduledGC(Training.gc_freq) as collector:  # garbage collection as the trainer schedules it
                step = build_step(mode, compile, 4 if short else 16)
                torch.cuda.reset_peak_memory_stats()
                chain = lambda step=step: [(step(), collector.tick()) for _ in range(STEP_CHAIN)]  # noqa: E731
                samples = []
                ms = timed(chain, warmup=1, repeat=3 if short else 5, samples=samples) / STEP_CHAIN
            tps = STEP_BATCH * STEP_SEQ / ms * 1e3
            each = " ".join(f"{STEP_BATCH * STEP_SEQ * STEP_CHAIN / s:.1f}k" for s in samples)  # tokens/ms
            mem = torch.cuda.max_memory_allocated() / 2**30
            base = base or (tps, mem)
            rows.append(
                f"| {mode} | {compile} | {tps:,.0f} | {each} | {mem:.2f} | {tps / base[0]:.2f} | {mem / base[1]:.2f} |"
            )
            del step, chain  # build_step frees them
    rows.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="fewer sizes and a 4-layer model (CI smoke test)")
    p.add_argument("--out", type=Path)
    p.add_argument("--only", choices=("bandwidth", "block_scale_rule", "linears", "step"))
    p.add_argument(
        "--flavors",
        nargs="+",
        choices=LINEAR_FLAVORS,
        default=LINEAR_FLAVORS,
        help="the block projections of these flavors in the linear and block scale rule tables",
    )
    a = p.parse_args()
    require_cuda("bench.py")
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    rows = [
        f"# QAT vs bf16 on {name}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}{' (short mode)' if a.short else ''}",
        "",
    ]
    parts = (
        ("bandwidth", bench_bandwidth),
        ("block_scale_rule", functools.partial(bench_block_scale_rule, flavors=tuple(a.flavors))),
        ("linears", functools.partial(bench_linears, flavors=tuple(a.flavors))),
        ("step", bench_step),
    )
    for part, fn in parts:
        if a.only in (None, part):
            start = len(rows)
            fn(rows, a.short)
            print("\n".join(rows[start:]), flush=True)
    text = "\n".join(rows) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
