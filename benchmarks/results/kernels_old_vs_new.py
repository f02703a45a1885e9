"""Old vs new quantize kernel on one GPU, side by side: bitwise on large tensors (three dtypes,
three magnitudes, both tensor-scale modes, NaN/Inf/-0 blocks), then GB/s; with ``--gemm`` also the
prescaled GEMM vs the fp32-accumulator path. Kept as the record of the old-vs-new tables of
quantize_v3_h200_2026-11-29.md (old: ecb3d46, ``--gemm``) and quantize_v4_h200_2026-11-29.md (old: 88143b7).

    mkdir -p .bench/old/nvfp4 && git show 88143b7:nvfp4/kernels.py > .bench/old/nvfp4/kernels.py
    python benchmarks/results/kernels_old_vs_new.py [--old .bench/old/nvfp4/kernels.py] [--gemm]
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import nvfp4  # noqa: E402
from nvfp4 import kernels as new  # noqa: E402
from nvfp4.inference import scaled_matmul  # noqa: E402
from scripts.bench import timed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--old", default=".bench/old/nvfp4/kernels.py", help="the old commit's nvfp4/kernels.py")
p.add_argument("--gemm", action="store_true", help="also the prescaled GEMM check")
args = p.parse_args()
spec = importlib.util.spec_from_file_location("kernels_old", args.old)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

print(torch.cuda.get_device_name(), flush=True)
g = torch.Generator(device="cuda").manual_seed(0)
# 1. bitwise on big random tensors of three dtypes, several scales, with NaN/Inf blocks
bad = 0
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for mult in (1e-3, 1.0, 300.0):
        x = (torch.randn(4096, 4096, device="cuda", generator=g) * mult).to(dtype)
        x[7, 5] = float("nan"); x[9, 100] = float("inf"); x[11, 3] = -0.0
        xf = x.nan_to_num(0, 0, 0)
        for s in (nvfp4.tensor_scale(nvfp4.abs_max(xf)), nvfp4.tensor_scale(nvfp4.abs_max(xf), "amax")):
            po, bo, oo = old.quantize([x], [s], emit_operand=True)[0]
            pn, bn, on = new.quantize([x], [s], emit_operand=True)[0]
            pq, bq, _ = new.quantize([x], [s])[0]
            fin = torch.isfinite(x.float()).reshape(x.shape[0], -1, 16).all(-1)
            f8, f16 = fin.repeat_interleave(8, -1), fin.repeat_interleave(16, -1)
            os_ = s * 2.0 ** -9
            ps, bs, ops = new.quantize([x], [s], emit_operand=True, op_scales=[os_])[0]
            dq = old.dequantize([(po, bo, os_)], torch.bfloat16)[0]
            checks = dict(codes=torch.equal(po[f8], pn[f8]), q_only=torch.equal(pq[f8], pn[f8]),
                          scales=torch.equal(bo.view(torch.uint8), bn.view(torch.uint8)),
                          op=torch.equal(oo[f16].view(torch.int16), on[f16].view(torch.int16)),
                          op_nan=bool(on[~f16].isnan().all()) and bool(ops[~f16].isnan().all()),
                          scaled_op=torch.equal(ops[f16].view(torch.int16), dq[f16].view(torch.int16)),
                          same_codes_scaled=torch.equal(ps, pn))
            if not all(checks.values()):
                bad += 1
                print("MISMATCH", dtype, mult, s.item(), checks, flush=True)
print("bitwise old vs new: mismatching cases", bad, flush=True)

# 2. bandwidth side by side
print("| MiB bf16 | copy GB/s | quantize old | new | new/old | new/copy | q+op old | new | new/old | q+op scaled new |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for mib in (64, 256, 1024):
    x = torch.randn(mib * 2**19 // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    s = nvfp4.tensor_scale(nvfp4.abs_max(x))
    y = torch.empty_like(x); n = x.numel()
    copy = 4 * n / timed(lambda: y.copy_(x), gpu_only=True) / 1e6
    t = [timed(f, gpu_only=True) for f in (lambda: old.quantize([x], [s]), lambda: new.quantize([x], [s]),
         lambda: old.quantize([x], [s], emit_operand=True), lambda: new.quantize([x], [s], emit_operand=True),
         lambda: new.quantize([x], [s], emit_operand=True, op_scales=[s]))]
    qb, qob = n * (2.5 + 1 / 16), n * (4.5 + 1 / 16)
    gb = lambda b, ms: b / ms / 1e6
    print(f"| {mib} | {copy:.0f} | {gb(qb, t[0]):.0f} | {gb(qb, t[1]):.0f} | {t[0] / t[1]:.2f} | {gb(qb, t[1]) / copy:.2f} "
          f"| {gb(qob, t[2]):.0f} | {gb(qob, t[3]):.0f} | {t[2] / t[3]:.2f} | {gb(qob, t[4]):.0f} |", flush=True)

if not args.gemm:
    raise SystemExit
# 3. prescaled weight GEMM (bf16 out) vs the fp32 accumulator path vs the old bf16-GEMM-then-multiply
print("\nprescaled GEMM == fp32 accumulator * scale -> bf16 (bitwise), and == old bf16 GEMM * scale:")
for (m, k, n) in ((8192, 3072, 3072), (8192, 3072, 1024), (4096, 4096, 14336), (8192, 8192, 3072), (333, 96, 48), (16384, 4096, 4096)):
    x = torch.randn(m, k, device="cuda", generator=g) * 3
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    sx, sw = (nvfp4.tensor_scale(nvfp4.abs_max(t)) for t in (x, w))
    (xq, a), (wq, b) = nvfp4.format.quantize_operands([(x, sx), (w, sw)])
    scale = sx * sw
    (_, bs), = nvfp4.format.quantize_operands([(w, sw)], op_scales=[scale])
    y_pre = scaled_matmul(a, bs, None, None, torch.bfloat16)
    y_fp32 = scaled_matmul(a, b, scale, None, torch.bfloat16)
    y_old = torch.mm(a, b.t()) * scale
    print(f"  {m}x{k}x{n}: prescaled==fp32 {torch.equal(y_pre, y_fp32)} ({(y_pre != y_fp32).sum().item()} differ), "
          f"old==fp32 {torch.equal(y_old, y_fp32)} ({(y_old != y_fp32).sum().item()}), prescaled==old {torch.equal(y_pre, y_old)}", flush=True)
