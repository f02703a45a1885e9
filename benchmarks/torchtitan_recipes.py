"""NVFP4 QAT vs bf16 in torchtitan (0.3.0, ``nvfp4_titan.torchtitan_qat``), beside this project's
trainer on the same recipe, side by side in one call:

    python benchmarks/torchtitan_recipes.py --flavors 1B 3B [--steps 12] [--kind nvidia-h200]

For each flavor, torchtitan's trainer (``nvfp4_titan.torchtitan_qat.launch``) runs the config
``llama3_<flavor>_qat`` and its float twin ``llama3_<flavor>_bf16`` (compile, selective AC, bf16
params, seq 2048, local batch 4, FSDP over the visible GPUs, no TP, from a random init on the bundled
tokenizer and corpus, no checkpoints), then ``benchmarks/recipes.py`` runs this project's
``recipes/llama3_<flavor>_qat.toml`` with ``qat.enable`` true and false in the same layout. Figures
are each run's last logging window (``--steps`` / 3 steps, after compilation): tokens/s per GPU,
peak memory per GPU (torchtitan: its logged max reserved; this project: its ``mem_peak_gib``).

Writes ``benchmarks/results/torchtitan_recipes_<kind>_<date>.{json,md}`` row by row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recipes import NCCL_ENV, run_recipe  # noqa: E402  (after the sys.path insert)

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.naninf]+).*?memory:\s*(-?[0-9.]+)GiB.*?tps:\s*([0-9,]+)")


def run_torchtitan(config: str, gpus: int, steps: int, folder: Path, timeout: float) -> dict | None:
    """One torchtitan run of ``config``; its last logged window's figures, or None (the log says why)."""
    window = max(1, steps // 3)
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"),
        *("-m", "nvfp4_titan.torchtitan_qat.launch", "--module", "nvfp4_titan.torchtitan_qat.configs"),
        *("--config", config, "--dump_folder", str(folder), "--training.steps", str(steps)),
        *("--metrics.log_freq", str(window), "--metrics.no-enable-wandb", "--checkpoint.no-enable"),
        *("--parallelism.tensor_parallel_degree", "1", "--training.global_batch_size", "-1"),
        *("--hf_assets_path", str(ROOT / "data" / "assets"), "--lr_scheduler.warmup_steps", "0"),
    ]
    log = folder.with_suffix(".log")
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **NCCL_ENV}
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    steps_seen = _STEP.findall(text)
    if rc != 0 or not steps_seen:
        tail = "\n    ".join(text.splitlines()[-15:])
        print(f"  torchtitan {config}: failed (rc {rc}); the log ends:\n    {tail}", flush=True)
        return None
    step, loss, mem, tps = steps_seen[-1]
    return {"tokens_per_s": float(tps.replace(",", "")), "peak_mem_gib": float(mem), "loss": float(loss)}


def markdown(rows: list[dict], meta: dict) -> str:
    """QAT and bf16 of each trainer and flavor side by side, with QAT/bf16 ratios."""
    out = [
        f"# NVFP4 QAT vs bf16: torchtitan and this project's trainer ({meta['card']}, {meta['date']})",
        "",
        f"{meta['gpus']} x {meta['card']} (kind `{meta['kind']}`), commit {meta['commit']}, torch {meta['torch']}, "
        f"Triton {meta['triton']}, torchtitan {meta['torchtitan']}. `python benchmarks/torchtitan_recipes.py "
        f"{meta['args']}`: compile, selective AC, bf16 params, seq 2048, local batch 4, FSDP over the GPUs, "
        f"random init, {meta['steps']} steps; the last {max(1, meta['steps'] // 3)}-step window. Tokens/s and "
        "peak memory per GPU (torchtitan: max reserved; this project: peak allocated).",
        "",
        "| trainer | model | QAT tokens/s | bf16 tokens/s | QAT/bf16 | QAT peak GiB | bf16 peak GiB "
        "| memory QAT/bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    for trainer, flavor in dict.fromkeys((r["trainer"], r["flavor"]) for r in rows):
        q, b = (
            {r["mode"]: r for r in rows if (r["trainer"], r["flavor"]) == (trainer, flavor)}.get(m, {})
            for m in ("qat", "bf16")
        )
        ratio = {k: q[k] / b[k] if q.get(k) and b.get(k) else None for k in ("tokens_per_s", "peak_mem_gib")}
        out.append(
            f"| {trainer} | {flavor} | {fmt(q.get('tokens_per_s'), ',.0f')} | {fmt(b.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(ratio['tokens_per_s'], '.3f')} | {fmt(q.get('peak_mem_gib'), '.2f')} | "
            f"{fmt(b.get('peak_mem_gib'), '.2f')} | {fmt(ratio['peak_mem_gib'], '.3f')} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavors", nargs="+", choices=("1B", "3B"), default=["1B", "3B"])
    p.add_argument("--steps", type=int, default=12, help="steps per run (>= 3); the last third is measured")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--no-ours", action="store_true", help="skip this project's trainer")
    p.add_argument("--kind", default=None, help="machine kind for the file name (default: the card's name)")
    p.add_argument("--commit", default=os.environ.get("NVFP4_COMMIT"), help="commit measured (default: git)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be >= 3: the last third of the run is measured")
    if not torch.cuda.is_available():
        p.error("no CUDA GPU visible: this benchmark trains on GPUs")
    import torchtitan
    import triton

    gpus, card = torch.cuda.device_count(), torch.cuda.get_device_name()
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
    commit = args.commit or subprocess.run(git, capture_output=True, text=True).stdout.strip() or "unknown"
    date = datetime.date.today().isoformat()
    kind = args.kind or card.lower().replace(" ", "-")
    meta = {
        **{"card": card, "kind": kind, "gpus": gpus, "date": date, "commit": commit, "steps": args.steps},
        **{"torch": torch.__version__, "triton": triton.__version__, "torchtitan": torchtitan.__version__},
        "args": " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"torchtitan_recipes_{kind}_{date}"
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(rows, meta))

    empty = {"tokens_per_s": None, "peak_mem_gib": None}
    with tempfile.TemporaryDirectory(prefix="nvfp4-torchtitan-") as tmp:
        for flavor in args.flavors:
            name = f"llama3_{flavor.lower()}"
            for mode in ("qat", "bf16"):
                folder = Path(tmp) / f"torchtitan-{name}-{mode}"
                result = run_torchtitan(f"{name}_{mode}", gpus, args.steps, folder, args.timeout)
                record({"trainer": "torchtitan", "flavor": flavor, "mode": mode, **(result or empty)})
            if args.no_ours:
                continue
            for mode in ("qat", "bf16"):
                folder = Path(tmp) / f"ours-{name}-{mode}"
                result = run_recipe(
                    f"{name}_qat", "fsdp", gpus, mode == "qat", "recipe", args.steps, folder, args.timeout
                )
                record({"trainer": "nvfp4-titan", "flavor": flavor, "mode": mode, **(result or empty)})
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
