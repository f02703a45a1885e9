"""QAT vs bf16 in the recipes as users run them: train.py under torchrun, side by side in one call.

    python benchmarks/recipes.py --recipes llama3_1b_qat llama3_3b_qat --layouts fsdp tp \
        [--activation-checkpoint recipe none selective full] [--steps 12] [--kind nvidia-h200-x2]

For every recipe x layout x activation-checkpointing mode, train.py runs the recipe once per
``--modes``: ``qat`` and ``bf16`` (``qat.enable`` true and false), and ``qad`` (QAT with
``qat.loss = "kl"``: the distillation teacher is a DCP step of the same shape saved by a 1-step
bf16 run first) (everything else as the recipe says: compile, mixed precision,
seq_len, local batch), from a random init on the bundled tokenizer and corpus, without
checkpoints or validation, one micro-batch per data-parallel rank per step. Each run's figures
are its last logging window (``--steps`` / 3 steps, after compilation and autotuning) from its
metrics.jsonl: tokens/s over all GPUs, peak memory per GPU (rank 0), MFU.

Writes ``benchmarks/results/recipes_<kind>_<date>.json`` (a list of rows ``{"recipe", "layout",
"gpus", "mode", "compile", "activation_checkpoint", "tokens_per_s", "peak_mem_gib", "mfu"}``
and the run's metadata) and the markdown table beside it, row by row as runs finish.
Layouts on the visible GPUs: ``fsdp`` (FSDP over all), ``tp`` (tensor parallel over all),
``1gpu``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvfp4_titan.training.config import load_config  # noqa: E402  (after the sys.path insert)

LAYOUTS = ("fsdp", "tp", "1gpu")
AC_MODES = ("recipe", "none", "selective", "full")
# Every GPU process of this machine kind needs these (NVLink SHARP/multicast off).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _ratio(row: dict, base: dict, key: str) -> float | None:
    """row[key] / base[key], None where either is missing."""
    return row[key] / base[key] if row.get(key) and base.get(key) else None


def layout_overrides(layout: str, gpus: int) -> tuple[int, list[str]]:
    """(processes, train.py overrides) of a layout on ``gpus`` GPUs."""
    if layout == "1gpu":
        return 1, ["--parallelism.data_parallel_shard_degree=1", "--parallelism.tensor_parallel_degree=1"]
    if layout == "fsdp":
        return gpus, ["--parallelism.data_parallel_shard_degree=-1", "--parallelism.tensor_parallel_degree=1"]
    return gpus, ["--parallelism.data_parallel_shard_degree=1", f"--parallelism.tensor_parallel_degree={gpus}"]


def run_recipe(
    recipe: str,
    layout: str,
    gpus: int,
    qat: bool,
    ac: str,
    steps: int,
    folder: Path,
    timeout: float,
    extra: tuple[str, ...] = (),
) -> dict | None:
    """One train.py run (``extra``: more overrides); its last logging window's figures, or None
    (the log says why)."""
    procs, overrides = layout_overrides(layout, gpus)
    window = max(1, steps // 3)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(ROOT / "train.py"),
        "--recipe",
        str(ROOT / "recipes" / f"{recipe}.toml"),
        *overrides,
        "--training.device=cuda",
        f"--training.steps={steps}",
        "--lr_scheduler.warmup_steps=0",
        "--training.global_batch_size=-1",
        f"--qat.enable={str(qat).lower()}",
        "--qat.start_step=0",
        "--checkpoint.enable=false",
        "--checkpoint.initial_load_path=",
        "--checkpoint.initial_load_in_hf=false",
        f"--model.tokenizer_path={ROOT / 'data/assets/tokenizer.json'}",
        "--validation.freq=0",
        "--metrics.enable_tensorboard=false",
        "--metrics.enable_wandb=false",
        f"--metrics.log_freq={window}",
        f"--job.dump_folder={folder}",
    ]
    if ac != "recipe":
        cmd.append(f"--training.activation_checkpoint={ac}")
    cmd += extra
    log = folder.with_suffix(".log")
    with open(log, "w") as out:
        try:
            rc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **NCCL_ENV}, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    metrics = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "tokens_per_s" in r]
    if rc != 0 or not rows:
        tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"  {recipe} {layout} qat={qat} ac={ac}: failed (rc {rc}); the log ends:\n    {tail}", flush=True)
        return None
    last = rows[-1]
    return {"tokens_per_s": last["tokens_per_s"], "peak_mem_gib": last.get("mem_peak_gib"), "mfu": last.get("mfu")}


def markdown(rows: list[dict], meta: dict) -> str:
    """The QAT and bf16 rows of each configuration side by side, with QAT/bf16 ratios."""
    intro = (
        f"{meta['gpus']} x {meta['card']} (kind `{meta['kind']}`), commit {meta['commit']}, torch "
        f"{meta['torch']}, Triton {meta['triton']}. `python benchmarks/recipes.py {meta['args']}`: each "
        f"recipe's own settings (compile, bf16 mixed precision, seq_len, local batch) but one micro-batch "
        f"per data-parallel rank, random init, {meta['steps']} steps; figures of the last "
        f"{max(1, meta['steps'] // 3)}-step window. Peak memory per GPU."
    )
    out = [
        f"# Recipes: NVFP4 QAT vs bf16 ({meta['card']}, {meta['date']})",
        "",
        intro,
        "",
        (
            "| recipe | layout | GPUs | compile | activation checkpointing | QAT tokens/s | bf16 tokens/s | "
            "QAT/bf16 | QAT peak GiB | bf16 peak GiB | memory QAT/bf16 | QAT MFU | bf16 MFU |"
        ),
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    keys, qad = [], []
    for r in rows:
        k = (r["recipe"], r["layout"], r["gpus"], r["compile"], r["activation_checkpoint"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        q, b, d = (
            {
                r["mode"]: r
                for r in rows
                if (r["recipe"], r["layout"], r["gpus"], r["compile"], r["activation_checkpoint"]) == k
            }.get(m, {})
            for m in ("qat", "bf16", "qad")
        )
        ratio = {
            key: q[key] / b[key] if q.get(key) and b.get(key) else None for key in ("tokens_per_s", "peak_mem_gib")
        }
        out.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {fmt(q.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(b.get('tokens_per_s'), ',.0f')} | {fmt(ratio['tokens_per_s'], '.3f')} | "
            f"{fmt(q.get('peak_mem_gib'), '.2f')} | {fmt(b.get('peak_mem_gib'), '.2f')} | "
            f"{fmt(ratio['peak_mem_gib'], '.3f')} | {fmt(q.get('mfu'), '.3f')} | {fmt(b.get('mfu'), '.3f')} |"
        )
        if d:
            qad.append(
                f"| {k[0]} | {k[1]} | {k[4]} | {fmt(d.get('tokens_per_s'), ',.0f')} | "
                f"{fmt(_ratio(d, q, 'tokens_per_s'), '.3f')} | {fmt(d.get('peak_mem_gib'), '.2f')} | "
                f"{fmt(_ratio(d, q, 'peak_mem_gib'), '.3f')} |"
            )
    if qad:
        out += [
            "",
            'Distillation (QAD: QAT with `qat.loss = "kl"`, the frozen teacher sharded like the student) '
            "against plain QAT:",
            "",
            "| recipe | layout | activation checkpointing | QAD tokens/s | QAD/QAT | QAD peak GiB | memory QAD/QAT |",
            "|---|---|---|---:|---:|---:|---:|",
            *qad,
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["llama3_1b_qat", "llama3_3b_qat"])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["fsdp", "tp"])
    p.add_argument("--activation-checkpoint", nargs="+", choices=AC_MODES, default=["recipe"])
    p.add_argument("--modes", nargs="+", choices=("qat", "bf16", "qad"), default=["qat", "bf16"])
    p.add_argument("--steps", type=int, default=12, help="steps per run (>= 3); the last third is measured")
    p.add_argument("--timeout", type=float, default=600, help="seconds per train.py run")
    p.add_argument("--kind", default=None, help="machine kind for the file name (default: the card's name)")
    p.add_argument("--commit", default=os.environ.get("NVFP4_COMMIT"), help="commit measured (default: git)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be >= 3: the last third of the run is measured")
    if not torch.cuda.is_available():
        p.error("no CUDA GPU visible: this benchmark runs train.py on GPUs")
    import triton

    for r in args.recipes:
        if not (ROOT / "recipes" / f"{r}.toml").is_file():
            p.error(f"no recipe recipes/{r}.toml")
    gpus = torch.cuda.device_count()
    card = torch.cuda.get_device_name()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    date = datetime.date.today().isoformat()
    kind = args.kind or card.lower().replace(" ", "-")
    meta = {
        "card": card,
        "kind": kind,
        "gpus": gpus,
        "date": date,
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "steps": args.steps,
        "args": " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recipes_{kind}_{date}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nvfp4-recipes-") as tmp:
        for recipe in args.recipes:
            cfg = load_config(ROOT / "recipes" / f"{recipe}.toml")
            for layout in args.layouts:
                for ac in args.activation_checkpoint:
                    ac_used = cfg.training.activation_checkpoint if ac == "recipe" else ac
                    for mode in args.modes:
                        folder = Path(tmp) / f"{recipe}-{layout}-{ac_used}-{mode}"
                        extra = ()
                        if mode == "qad":
                            teacher = Path(tmp) / f"{recipe}-{layout}-teacher"
                            if not (teacher / "checkpoint" / "step-1").is_dir():
                                run_recipe(
                                    recipe,
                                    layout,
                                    gpus,
                                    False,
                                    ac,
                                    1,
                                    teacher,
                                    args.timeout,
                                    ("--checkpoint.enable=true", "--training.compile=false"),
                                )
                            extra = ("--qat.loss=kl", f"--qat.teacher_path={teacher / 'checkpoint' / 'step-1'}")
                        result = run_recipe(
                            recipe, layout, gpus, mode != "bf16", ac, args.steps, folder, args.timeout, extra
                        )
                        row = {
                            "recipe": recipe,
                            "layout": layout,
                            "gpus": 1 if layout == "1gpu" else gpus,
                            "mode": mode,
                            "compile": cfg.training.compile,
                            "activation_checkpoint": ac_used,
                            **(result or {"tokens_per_s": None, "peak_mem_gib": None, "mfu": None}),
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
                        stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
