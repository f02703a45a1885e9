"""Static SASS of the NVFP4 quantize/dequantize kernels for Hopper (sm_90), without a GPU.

    pip install triton==3.6.0   # its bundled ptxas and cuobjdump do the work
    python benchmarks/kernel_sass.py [--dtype bf16] [--tile 128 2]

Compiles each kernel as the runtime does for one tensor per launch (N=1; 16-byte aligned
pointers) and prints its instruction count per element and the most frequent opcodes. The
quantize kernel was issue-bound on H200 at 22 per element (0.70 of copy bandwidth,
benchmarks/results/quantize_v3_h200_2026-11-29.md); at 18 it reaches 0.81-0.88
(quantize_v4_h200_2026-11-29.md). Those records halved a two-tensor kernel, whose halves share
code; the same kernel counts 20 for one tensor here. Counts are static: the divisions' rarely
taken slow paths are included.
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
    """Opcodes of ``kernel`` for one tensor (N=1: slot a, whose arguments have the ``per_tensor``
    types; slots b to d None, then the slot ends, then constexprs) compiled for sm_90, pointers
    16-byte aligned as at run time."""
    names, n = kernel.arg_names, len(per_tensor)
    constexprs = {**constexprs, "N": 1, **{name: None for name in names[n : kernels.SLOTS * n]}}
    types = per_tensor + ["constexpr"] * (kernels.SLOTS - 1) * n + ["i32"] * (kernels.SLOTS - 1)
    sig = {name: "constexpr" if name in constexprs else types[i] for i, name in enumerate(names)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if sig[name].startswith("*")}
    compiled = triton.compile(
        ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [
        re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", ln)
        for ln in text.splitlines()
        if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)
    ]
    return [ln.split()[0].split(".")[0].rstrip(";") for ln in lines if ln.strip()]


def _slotted(name: str) -> list[str]:
    """A per-tensor constexpr's names for slots a to d."""
    return [f"{name}_{slot}" for slot in "ABCD"[: kernels.SLOTS]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=KINDS, default="bf16", help="input element type")
    p.add_argument(
        "--tile",
        type=int,
        nargs=2,
        default=[kernels.TILE["R"], kernels.TILE["num_warps"]],
        metavar=("R", "WARPS"),
        help="16-element blocks per program, warps",
    )
    a = p.parse_args()
    r, warps = a.tile
    kind = KINDS[a.dtype]
    pair = "*i64" if a.dtype == "fp32" else "*i32"  # two elements per integer
    elements = r * 16 // (warps * 32)  # per thread
    quantize = kernels._quantize_kernel, ["pair", "*fp32", "*u8", "*u8", "*i32", "*fp32", "i32"]
    dequantize = kernels._dequantize_kernel, ["*u8", "*u8", "*fp32", "pair", "i32"]

    def flags(operand: bool, scaled: bool, four_over_six: bool = False) -> dict:
        return dict(
            WITH_OPERAND=operand,
            **dict.fromkeys(_slotted("OPERAND_SCALED"), scaled),
            **dict.fromkeys(_slotted("FOUR_OVER_SIX"), four_over_six),
        )

    variants = {
        "quantize": (*quantize, flags(False, False)),
        "quantize + operand": (*quantize, flags(True, False)),
        "quantize + scaled operand": (*quantize, flags(True, True)),
        "quantize, four_over_six": (*quantize, flags(False, False, True)),
        "quantize + scaled operand, four_over_six": (*quantize, flags(True, True, True)),
        "dequantize (tensor scale)": (*dequantize, dict(SCALED=True)),
    }
    print(f"sm_90, {a.dtype}, R={r}, {warps} warps: {elements} elements per thread")
    print("| kernel | SASS | per element | most frequent |\n|---|---:|---:|---|")
    for name, (kernel, types, flags) in variants.items():
        types = [pair if t == "pair" else t for t in types]
        ops = sass(kernel, types, dict(R=r, **dict.fromkeys(_slotted("KIND"), kind), **flags), warps)
        common = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(8))
        print(f"| {name} | {len(ops)} | {len(ops) / elements:.1f} | {common} |")


if __name__ == "__main__":
    main()
