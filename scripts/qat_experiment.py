"""Does QAT matter? Float vs PTQ vs QAT perplexity, end to end, for one or more seeds.

    python scripts/qat_experiment.py --recipe recipes/qat_experiment_80m.toml --out benchmarks/results/qat_80m \\
        --pretrain-steps 2000 --finetune-steps 500 --finetune-lr 1e-4 --seeds 0 1

Per seed: pre-train in float (QAT off); from that checkpoint fine-tune (a) in float and
(b) with NVFP4 QAT on identical data, steps and schedule; convert (b); evaluate word
perplexity of the base, PTQ of the base, the float fine-tune, PTQ of it, the QAT model and
its converted NVFP4 checkpoint on the recipe's held-out split. Recovery =
(PTQ_ft - QAT) / (PTQ_ft - float_ft). Writes results.md and results.json to --out.
Any train.py override can follow ``--``: it applies to every run (ablations).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nvfp4  # noqa: E402
import torch  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from training.convert import Options, convert  # noqa: E402

_spec = importlib.util.spec_from_file_location("eval_ppl", ROOT / "scripts" / "eval_ppl.py")
eval_ppl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_ppl)

ROWS = ("base", "base_ptq", "float_ft", "float_ft_ptq", "qat", "nvfp4")


def run_train(recipe: str, dump: Path, nproc: int, args: list[str]) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "train.py"), "--recipe", recipe, f"--job.dump_folder={dump}", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def evaluate(path: Path, ptq: bool, ids: torch.Tensor, words: int, a: argparse.Namespace) -> float:
    model, _ = eval_ppl.load_model(path)
    if ptq:
        nvfp4.prepare(model, nvfp4.QATConfig())
    model.to(a.device).eval()
    r = eval_ppl.perplexity(model, ids.to(a.device), words, a.eval_seq_len, a.eval_stride, a.eval_batch_size,
                            progress=False)
    return r["word_ppl"]


def one_seed(seed: int, a: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    out = a.out / f"seed{seed}"
    common = [f"--training.seed={seed}", "--checkpoint.keep_latest_k=1", *extra]
    base = out / "base"
    run_train(a.recipe, base, a.nproc, [*common, "--qat.enable=false", f"--training.steps={a.pretrain_steps}",
                                        f"--checkpoint.interval={a.pretrain_steps}"])
    start = f"--checkpoint.initial_load_path={base / 'checkpoint' / f'step-{a.pretrain_steps}'}"
    ft = [*common, start, f"--training.steps={a.finetune_steps}", f"--checkpoint.interval={a.finetune_steps}",
          f"--optimizer.lr={a.finetune_lr}", f"--lr_scheduler.warmup_steps={min(a.finetune_steps // 10, 100)}"]
    run_train(a.recipe, out / "float_ft", a.nproc, [*ft, "--qat.enable=false"])
    run_train(a.recipe, out / "qat", a.nproc, [*ft, "--qat.enable=true"])
    convert(out / "qat", out / "nvfp4", Options(calibration_batches=8), overwrite=True)

    src = eval_ppl.resolve_source(base)
    docs = eval_ppl.held_out_text(src, a.eval_data, "text")
    tok = load_tokenizer(src.config.model.tokenizer_path)
    ids = torch.tensor([t for d in tok.encode_batch(docs) for t in (*d, tok.eos_id)])
    words = sum(len(d.split()) for d in docs)
    paths = {"base": base, "base_ptq": base, "float_ft": out / "float_ft", "float_ft_ptq": out / "float_ft",
             "qat": out / "qat", "nvfp4": out / "nvfp4"}
    r = {row: evaluate(paths[row], row.endswith("_ptq"), ids, words, a) for row in ROWS}
    r["recovery"] = (r["float_ft_ptq"] - r["qat"]) / (r["float_ft_ptq"] - r["float_ft"])
    print(json.dumps({"seed": seed, **r}), flush=True)
    return r


def report(results: dict[int, dict[str, float]], a: argparse.Namespace, extra: list[str]) -> str:
    rec = [r["recovery"] for r in results.values()]
    spread = f" +- {statistics.stdev(rec):.1%}" if len(rec) > 1 else " (one seed: no error bar)"
    lines = ["# Float vs PTQ vs QAT (NVFP4), word perplexity on held-out text", "",
             f"recipe `{a.recipe}`, pre-train {a.pretrain_steps} steps, fine-tune {a.finetune_steps} steps at lr "
             f"{a.finetune_lr}, overrides `{' '.join(extra) or 'none'}`", "",
             "| seed | " + " | ".join(ROWS) + " | recovery |", "|---" * (len(ROWS) + 2) + "|"]
    for seed, r in results.items():
        lines.append(f"| {seed} | " + " | ".join(f"{r[k]:.4f}" for k in ROWS) + f" | {r['recovery']:.1%} |")
    lines += ["", f"Recovery (mean over seeds): {statistics.mean(rec):.1%}{spread}; "
              f"{'beats' if statistics.mean(rec) > 0.5 else 'does not beat'} 50%.",
              "The nvfp4 column is the converted checkpoint; it equals the qat column by construction (tested)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/qat_experiment_80m.toml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--eval-data", type=Path, help="held-out text (default: the recipe's validation split)")
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--eval-stride", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = {s: one_seed(s, a, extra) for s in a.seeds}
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results, a, extra)
    (a.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
