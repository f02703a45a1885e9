"""QAT vs bf16 in the recipes as users run them: train.py under torchrun, side by side in one call.

    python benchmarks/recipes.py --recipes llama3_1b_qat llama3_3b_qat --layouts fsdp tp \
        [--activation-checkpoint recipe none selective full] [--rounds 2] [--windows 3] [--window 8] \
        [--local-batch 1] [--kind nvidia-h200-x2]

For every recipe x layout x activation-checkpointing mode, train.py runs the recipe once per
``--modes`` in each of ``--rounds`` rounds, interleaved (round 1: qat, bf16; round 2: bf16, qat;
...), so that drift of the machine falls on both modes alike: ``qat`` and ``bf16`` (``qat.enable``
true and false), and ``qad`` (QAT with ``qat.loss = "kl"``: the distillation teacher is a DCP step
of the same shape saved by a 1-step bf16 run first). Everything else is as the recipe says
(compile, mixed precision, seq_len, local batch unless ``--local-batch``), from a random init on
the bundled tokenizer and plain-text corpus, without checkpoints or validation, one micro-batch
per data-parallel rank per step. Each run logs ``--windows`` + 1 windows of ``--window`` steps;
the first (compilation, autotuning) is dropped, the others are measurements.

Per configuration: each mode's median tokens/s over all its windows; the QAT/bf16 ratio of each
round (median of its QAT windows over the median of its bf16 windows), their median and min-max;
a ratio whose spread across rounds is wider than its distance from 1 is flagged. Peak memory per
GPU (rank 0, the largest window's), MFU.

Writes ``benchmarks/results/recipes_<kind>_<date>.json`` (every run's windows and the metadata)
and the markdown table beside it, as runs finish. Layouts on the visible GPUs: ``fsdp`` (FSDP over
all), ``tp`` (tensor parallel over all), ``1gpu``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
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
    window: int,
    folder: Path,
    timeout: float,
    extra: tuple[str, ...] = (),
) -> dict | None:
    """One train.py run of ``steps`` steps logged every ``window`` (``extra``: more overrides):
    {"windows": tokens/s of every window but the first, "peak_mem_gib", "mfu"}, or None (the log
    says why)."""
    procs, overrides = layout_overrides(layout, gpus)
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
        "--training.epochs=0",
        # throughput on the bundled plain text, whatever data the recipe trains on (the 3B recipes:
        # a user's alpaca file): every recipe is measured on the same tokens and the same path
        f"--dataset.path={ROOT / 'data/assets/shakespeare.jsonl'}",
        "--dataset.format=text",
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
    if rc != 0 or len(rows) < 2:
        tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"  {recipe} {layout} qat={qat} ac={ac}: failed (rc {rc}); the log ends:\n    {tail}", flush=True)
        return None
    measured = rows[1:]  # the first window holds compilation and autotuning
    mems = [r["mem_peak_gib"] for r in measured if r.get("mem_peak_gib") is not None]
    mfus = [r["mfu"] for r in measured if r.get("mfu") is not None]
    return {
        "windows": [r["tokens_per_s"] for r in measured],
        "peak_mem_gib": max(mems) if mems else None,
        "mfu": statistics.median(mfus) if mfus else None,
    }


def summarize(runs: list[dict]) -> dict:
    """One configuration's runs ({"mode", "round", "windows", ...}) -> per-mode medians and the
    QAT/bf16 (and QAD/QAT) ratios of each round with their median and min-max."""
    out: dict = {}
    by_mode: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("windows"):
            by_mode.setdefault(r["mode"], []).append(r)
    for mode, rs in by_mode.items():
        out[mode] = {
            "tokens_per_s": statistics.median(w for r in rs for w in r["windows"]),
            "peak_mem_gib": max((r["peak_mem_gib"] for r in rs if r.get("peak_mem_gib") is not None), default=None),
            "mfu": statistics.median([r["mfu"] for r in rs if r.get("mfu") is not None] or [float("nan")]),
        }
    for num, den in (("qat", "bf16"), ("qad", "qat")):
        rounds = sorted({r["round"] for r in by_mode.get(num, [])} & {r["round"] for r in by_mode.get(den, [])})
        ratios = []
        for k in rounds:
            a = next(r for r in by_mode[num] if r["round"] == k)
            b = next(r for r in by_mode[den] if r["round"] == k)
            ratios.append(statistics.median(a["windows"]) / statistics.median(b["windows"]))
        if ratios:
            med = statistics.median(ratios)
            out[f"{num}/{den}"] = {
                "median": med,
                "min": min(ratios),
                "max": max(ratios),
                "rounds": ratios,
                "spread_wider_than_gap": len(ratios) > 1 and max(ratios) - min(ratios) > abs(1 - med),
            }
    return out


def markdown(configs: list[dict], meta: dict) -> str:
    """Each configuration's QAT and bf16 figures side by side, with the ratios' spread."""
    intro = (
        f"{meta['gpus']} x {meta['card']} (kind `{meta['kind']}`), commit {meta['commit']}, torch "
        f"{meta['torch']}, Triton {meta['triton']}. `python benchmarks/recipes.py {meta['args']}`: each "
        f"recipe's own settings (compile, bf16 mixed precision, seq_len, local batch"
        f"{', but local batch ' + str(meta['local_batch']) if meta['local_batch'] else ''}), one micro-batch per "
        f"data-parallel rank, random init, the bundled plain text; {meta['rounds']} interleaved rounds per "
        f"configuration, each run {meta['windows']} measured windows of {meta['window']} steps after one "
        f"dropped for compilation. tokens/s: median over all windows; QAT/bf16: median of the rounds' ratios "
        f"[min-max]. Peak memory per GPU."
    )
    out = [
        f"# Recipes: NVFP4 QAT vs bf16 ({meta['card']}, {meta['date']})",
        "",
        intro,
        "",
        (
            "| recipe | layout | GPUs | compile | activation checkpointing | QAT tokens/s | bf16 tokens/s | "
            "QAT/bf16 [min-max] | QAT peak GiB | bf16 peak GiB | memory QAT/bf16 | QAT MFU | bf16 MFU |"
        ),
        "|---|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    def ratio(r: dict | None) -> str:
        if not r:
            return "-"
        flag = " (spread > gap)" if r["spread_wider_than_gap"] else ""
        return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]{flag}"

    qad = []
    for c in configs:
        s = c["summary"]
        q, b = s.get("qat", {}), s.get("bf16", {})
        mem = q["peak_mem_gib"] / b["peak_mem_gib"] if q.get("peak_mem_gib") and b.get("peak_mem_gib") else None
        out.append(
            f"| {c['recipe']} | {c['layout']} | {c['gpus']} | {c['compile']} | {c['activation_checkpoint']} | "
            f"{fmt(q.get('tokens_per_s'), ',.0f')} | {fmt(b.get('tokens_per_s'), ',.0f')} | "
            f"{ratio(s.get('qat/bf16'))} | "
            f"{fmt(q.get('peak_mem_gib'), '.2f')} | {fmt(b.get('peak_mem_gib'), '.2f')} | {fmt(mem, '.3f')} | "
            f"{fmt(q.get('mfu'), '.3f')} | {fmt(b.get('mfu'), '.3f')} |"
        )
        if "qad" in s:
            d = s["qad"]
            qad.append(
                f"| {c['recipe']} | {c['layout']} | {c['activation_checkpoint']} | "
                f"{fmt(d.get('tokens_per_s'), ',.0f')} | "
                f"{ratio(s.get('qad/qat'))} | {fmt(d.get('peak_mem_gib'), '.2f')} |"
            )
    if qad:
        out += [
            "",
            'Distillation (QAD: QAT with `qat.loss = "kl"`, the frozen teacher sharded like the student) '
            "against plain QAT:",
            "",
            "| recipe | layout | activation checkpointing | QAD tokens/s | QAD/QAT [min-max] | QAD peak GiB |",
            "|---|---|---|---:|---|---:|",
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
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each mode per configuration")
    p.add_argument("--windows", type=int, default=3, help="measured logging windows per run (after one dropped)")
    p.add_argument("--window", type=int, default=8, help="steps per logging window")
    p.add_argument("--local-batch", type=int, default=0, help="override the recipes' local batch (0: theirs)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per train.py run")
    p.add_argument("--kind", default=None, help="machine kind for the file name (default: the card's name)")
    p.add_argument("--commit", default=os.environ.get("NVFP4_COMMIT"), help="commit measured (default: git)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if min(args.rounds, args.windows, args.window) < 1:
        p.error("--rounds, --windows and --window must be >= 1")
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
        "rounds": args.rounds,
        "windows": args.windows,
        "window": args.window,
        "local_batch": args.local_batch,
        "args": " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recipes_{kind}_{date}"
    configs: list[dict] = []
    steps = args.window * (args.windows + 1)
    extra_all = (f"--training.local_batch_size={args.local_batch}",) if args.local_batch else ()
    with tempfile.TemporaryDirectory(prefix="nvfp4-recipes-") as tmp:
        for recipe in args.recipes:
            cfg = load_config(ROOT / "recipes" / f"{recipe}.toml")
            for layout in args.layouts:
                for ac in args.activation_checkpoint:
                    ac_used = cfg.training.activation_checkpoint if ac == "recipe" else ac
                    config = {
                        "recipe": recipe,
                        "layout": layout,
                        "gpus": 1 if layout == "1gpu" else gpus,
                        "compile": cfg.training.compile,
                        "activation_checkpoint": ac_used,
                        "runs": [],
                    }
                    configs.append(config)
                    for k in range(args.rounds):
                        for mode in args.modes if k % 2 == 0 else args.modes[::-1]:  # interleaved
                            folder = Path(tmp) / f"{recipe}-{layout}-{ac_used}-{mode}-{k}"
                            extra = extra_all
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
                                        1,
                                        teacher,
                                        args.timeout,
                                        ("--checkpoint.enable=true", "--training.compile=false", *extra_all),
                                    )
                                extra += ("--qat.loss=kl", f"--qat.teacher_path={teacher / 'checkpoint' / 'step-1'}")
                            result = run_recipe(
                                recipe,
                                layout,
                                gpus,
                                mode != "bf16",
                                ac,
                                steps,
                                args.window,
                                folder,
                                args.timeout,
                                extra,
                            )
                            config["runs"].append({"mode": mode, "round": k, **(result or {})})
                            config["summary"] = summarize(config["runs"])
                            print(
                                json.dumps(
                                    {
                                        "recipe": recipe,
                                        "layout": layout,
                                        "ac": ac_used,
                                        "mode": mode,
                                        "round": k,
                                        **(result or {}),
                                    }
                                ),
                                flush=True,
                            )
                            stem.with_suffix(".json").write_text(
                                json.dumps({"meta": meta, "configs": configs}, indent=1) + "\n"
                            )
                            stem.with_suffix(".md").write_text(markdown(configs, meta))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
