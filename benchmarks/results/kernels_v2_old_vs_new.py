"""How the old-vs-new table of kernels_v2_h100_2026-11-25.md was measured (kept as its record).

    git show d15af36:nvfp4/kernels.py > /tmp/kernels_old.py
    PYTHONPATH=.:/tmp python benchmarks/results/kernels_v2_old_vs_new.py
"""
import os

import kernels_old as old
import torch

import nvfp4
from nvfp4 import kernels as new
from scripts.bench import timed

print(torch.cuda.get_device_name())
print("| MiB bf16 | copy GB/s | quantize old | quantize new | new/old | q+operand old | q+operand new | new/old "
      "| dequant old | dequant new | new/old | amax+scale torch ops | amax+scale new | new/old |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for mib in (64, 256):
    x = torch.randn(mib * 2**19 // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    s = nvfp4.tensor_scale(nvfp4.abs_max(x))
    y = torch.empty_like(x)
    n = x.numel()
    copy = 4 * n / timed(lambda: y.copy_(x), gpu_only=True) / 1e6
    po, so, oo = old.quantize(x, s, emit_operand=True)
    pn, sn, on = new.quantize([x], [s], emit_operand=True)[0]
    same = torch.equal(po, pn) and torch.equal(so.view(torch.uint8), sn.view(torch.uint8)) and torch.equal(oo, on)
    same &= torch.equal(old.dequantize(po, so, s, torch.bfloat16), new.dequantize([(pn, sn, s)], torch.bfloat16)[0])
    t = [timed(fn, gpu_only=True) for fn in (
        lambda: old.quantize(x, s), lambda: new.quantize([x], [s]),
        lambda: old.quantize(x, s, emit_operand=True), lambda: new.quantize([x], [s], emit_operand=True),
        lambda: old.dequantize(po, so, s, torch.bfloat16), lambda: new.dequantize([(pn, sn, s)], torch.bfloat16))]
    os.environ["NVFP4_REFERENCE"] = "1"  # the torch ops: aminmax, then tensor_scale's scalar ops
    t_ref = timed(lambda: nvfp4.amax_and_scale(x), gpu_only=True)
    os.environ["NVFP4_REFERENCE"] = "0"
    ta = [t_ref, timed(lambda: new.amax_and_scale((x,), True), gpu_only=True)]
    qb, qob = n * (2.5 + 1 / 16), n * (4.5 + 1 / 16)  # dequantize moves as many bytes as quantize

    def g(nbytes, ms):
        return f"{nbytes / ms / 1e6:.0f}"

    print(f"| {mib} | {copy:.0f} | {g(qb, t[0])} | {g(qb, t[1])} | {t[0] / t[1]:.2f} | {g(qob, t[2])} | {g(qob, t[3])} "
          f"| {t[2] / t[3]:.2f} | {g(qb, t[4])} | {g(qb, t[5])} | {t[4] / t[5]:.2f} | {g(2 * n, ta[0])} "
          f"| {g(2 * n, ta[1])} | {ta[0] / ta[1]:.2f} |  bitwise {same}")
