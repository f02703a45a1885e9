"""Static SASS of the NVFP4 quantize/dequantize kernels for Hopper (sm_90), without a GPU.

    pip install triton==3.6.0   # its bundled ptxas and cuobjdump do the work
    python scripts/kernel_sass.py [--dtype bf16] [--tile 128 2]

Compiles each kernel as the runtime does (16-byte aligned pointers) and prints, per variant,
the instruction count of one branch per element and the most frequent opcodes. The quantize
kernel was issue-bound on H200 at 22 per element (0.70 of copy bandwidth,
benchmarks/results/quantize_v3_h200_2026-11-29.md); at 18 it reaches 0.81-0.88 (quantize_v4_h200_2026-11-29.md).
Counts are static: the divisions' rarely taken slow paths are included.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4 import kernels  # noqa: E402

if not kernels.HAVE_TRITON:
    raise SystemExit("needs Triton: pip install triton==3.6.0 (no GPU needed)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KINDS = {"bf16": 0, "fp16": 1, "fp32": 2}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def sass(kernel, per_tensor: list[str], constexprs: dict[str, int], num_warps: int) -> list[str]:
    """Opcodes of ``kernel`` (arguments: ``per_tensor`` types for tensor a, the same for b, the
    program split, then constexprs) compiled for sm_90, pointers 16-byte aligned as at run time."""
    names = kernel.arg_names
    types = per_tensor * 2 + ["i32"]
    sig = {n: "constexpr" if n in constexprs else types[i] for i, n in enumerate(names)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", ln) for ln in text.splitlines()
             if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    return [ln.split()[0].split(".")[0].rstrip(";") for ln in lines if ln.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=KINDS, default="bf16", help="input element type")
    p.add_argument("--tile", type=int, nargs=2, default=[kernels.TILE["R"], kernels.TILE["num_warps"]],
                   metavar=("R", "WARPS"), help="16-element blocks per program, warps")
    a = p.parse_args()
    r, warps = a.tile
    kind = KINDS[a.dtype]
    pair = "*i64" if a.dtype == "fp32" else "*i32"  # two elements per integer
    elements = r * 16 // (warps * 32)  # per thread, one branch
    quantize = kernels._quantize_kernel, ["pair", "*fp32", "*u8", "*u8", "*i32", "*fp32", "i32"]
    dequantize = kernels._dequantize_kernel, ["*u8", "*u8", "*fp32", "pair", "i32"]
    variants = {
        "quantize": (*quantize, dict(EMIT_OP=False, OP_SCALED_A=False, OP_SCALED_B=False)),
        "quantize + operand": (*quantize, dict(EMIT_OP=True, OP_SCALED_A=False, OP_SCALED_B=False)),
        "quantize + scaled operand": (*quantize, dict(EMIT_OP=True, OP_SCALED_A=True, OP_SCALED_B=True)),
        "dequantize (tensor scale)": (*dequantize, dict(USE_S=True)),
    }
    print(f"sm_90, {a.dtype}, R={r}, {warps} warps: {elements} elements per thread and branch")
    print("| kernel | SASS per branch | per element | most frequent |\n|---|---:|---:|---|")
    for name, (kernel, types, flags) in variants.items():
        types = [pair if t == "pair" else t for t in types]
        ops = sass(kernel, types, dict(R=r, KIND_A=kind, KIND_B=kind, **flags), warps)
        common = ", ".join(f"{op} {n // 2}" for op, n in collections.Counter(ops).most_common(8))
        print(f"| {name} | {len(ops) // 2} | {len(ops) / 2 / elements:.1f} | {common} |")


if __name__ == "__main__":
    main()
