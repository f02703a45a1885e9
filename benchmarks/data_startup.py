"""Corpus start-up and tokenization throughput: the token cache's parallel build against the
tokenizer's own ``encode_batch``, a later start that maps the cache (the cache function path and
train.py's ranks), and the old in-memory path, on synthetic corpora of the bundled plays.

    python benchmarks/data_startup.py --mb 100 1000 [--out benchmarks/results/data_startup_cpu_<date>.md]

Each measurement runs in a fresh process (peak RSS is its ru_maxrss):

- encode_batch: the documents streamed as the cache build reads them, 128 per call, with the
  tokenizer's own threads; only the calls are timed (the tokenizer's speed, no reading or writing).
- cache build: ``cached_tokens`` into an empty cache with ``num_proc`` 1 (in-process, the
  tokenizer's threads) and every core (spawned workers, one thread each): reading, tokenizing,
  part files, concatenation and hashing, end to end.
- later start: ``cached_tokens`` + ``windows_from_tokens`` + one batch read (what the trainer runs),
  and train.py under ``torchrun --nproc_per_node 2`` (gloo, CPU, one step), each rank's
  ``data ready in X s, peak RSS of this process Y GiB`` line.
- old: ``load_documents`` + ``build_windows`` (tokenize in memory at every start); only where the
  corpus is at most ``--old-max-mb`` (its RSS grows ~50x the corpus).

MB: 2**20 bytes of the documents' UTF-8 text. Prints a markdown record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "data/assets/tokenizer.json"
RANKS = 2  # train.py ranks of the later start


def _peak_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux


def _machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _child(mode: str, corpus: str, cache: str, seq_len: int, num_proc: int) -> dict:
    """One measurement in this (fresh) process, timed after the imports; see the module docstring."""
    from nvfp4_titan.data.dataset import build_windows, iter_documents, load_documents
    from nvfp4_titan.data.tokenizer import load_tokenizer
    from nvfp4_titan.data.tokens import cached_tokens, windows_from_tokens

    t0 = time.perf_counter()
    tok = load_tokenizer(TOKENIZER)
    if mode == "encode":
        size, busy = 0, 0.0
        for docs in iter_documents(corpus, "text", 128):
            size += sum(len(d.encode()) for d in docs)
            t = time.perf_counter()
            tok.encode_batch(docs)
            busy += time.perf_counter() - t
        return {"text_mb": size / 2**20, "seconds": busy}
    if mode == "build":
        cached_tokens(corpus, "text", tok, cache, progress=False, num_proc=num_proc)
        return {
            "seconds": time.perf_counter() - t0,
            "peak_rss_gib": _peak_gib(),
            "worker_peak_rss_gib": _peak_gib(resource.RUSAGE_CHILDREN),
        }
    if mode == "old":
        w = build_windows(load_documents(corpus), tok, seq_len, 0.05, 0)
    else:
        tf = cached_tokens(corpus, "text", tok, cache, build=False)
        w = windows_from_tokens(tf, seq_len, 0.05, 0, tok.vocab_size)
    w.train[list(range(8))]  # one batch read
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": _peak_gib(), "windows": len(w.train)}


def _run_child(mode: str, corpus: Path, cache: Path, seq_len: int, num_proc: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--seq-len", str(seq_len), "--child", mode, str(corpus), str(cache), str(num_proc)]
    r = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def _train_ranks(corpus: Path, cache: Path, run: Path, seq_len: int) -> list[dict]:
    """train.py on RANKS gloo ranks, one step, over the built cache: each rank's data start-up."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"),
        *("train.py", "--recipe", "recipes/debug_cpu.toml", f"--job.dump_folder={run}"),
        *(f"--dataset.path={corpus}", f"--dataset.cache_dir={cache}", "--training.steps=1"),
        *(f"--training.seq_len={seq_len}", "--training.local_batch_size=2", "--validation.freq=0"),
        *("--checkpoint.enable=false", "--metrics.enable_tensorboard=false", "--lr_scheduler.warmup_steps=0"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = []
    for rank in range(RANKS):
        m = re.search(
            r"data ready in ([\d.]+) s, peak RSS of this process ([\d.]+) GiB",
            (run / "logs" / f"rank{rank}.log").read_text(),
        )
        rows.append({"seconds": float(m[1]), "peak_rss_gib": float(m[2])})
    return rows


def _measure(mb: int, tmp: Path, seq_len: int, old_max_mb: int, cores: int) -> dict:
    """Every measurement on a corpus of ``mb`` MB of jsonl under ``tmp`` (removed after)."""
    plays = (ROOT / "data/assets/shakespeare.jsonl").read_bytes()
    corpus, cache = tmp / "corpus.jsonl", tmp / "cache"
    with open(corpus, "wb") as f:
        for _ in range(max(1, mb * 2**20 // len(plays))):
            f.write(plays)
    out = {"file_mb": corpus.stat().st_size / 2**20, "encode": _run_child("encode", corpus, cache, seq_len)}
    for n in (1, cores):
        shutil.rmtree(cache, ignore_errors=True)
        out[f"build_{n}"] = _run_child("build", corpus, cache, seq_len, n)
    out["later"] = _run_child("cache", corpus, cache, seq_len)
    out["ranks"] = _train_ranks(corpus, cache, tmp / "run", seq_len)
    out["old"] = _run_child("old", corpus, cache, seq_len) if mb <= old_max_mb else None
    return out


def _record(args: argparse.Namespace, results: list[dict], cores: int, load: tuple[float, float]) -> str:
    import tokenizers
    import torch

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=False).stdout.strip()

    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + (
        " + uncommitted changes" if git("status", "--porcelain") else ""
    )
    lines = [
        f"# Corpus tokenization throughput and start-up ({datetime.date.today()})",
        "",
        f"`python benchmarks/data_startup.py --mb {' '.join(map(str, args.mb))} --seq-len {args.seq_len}`: jsonl of "
        f"the bundled plays repeated, bundled 8k BPE tokenizer, {cores} CPU cores (affinity), "
        f"{os.cpu_count()} in the machine; commit {commit}, torch {torch.__version__}, tokenizers "
        f"{tokenizers.__version__}, Python {sys.version.split()[0]}. Load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end. MB = 2**20 bytes of document text.",
        "",
        "## Tokenization throughput (MB/s of text)",
        "",
        f"| corpus | encode_batch (its own threads) | cache build, num_proc=1 | cache build, num_proc={cores} "
        f"| build ({cores}) / encode_batch | build ({cores}): peak RSS GiB, main / largest worker |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        text = r["encode"]["text_mb"]
        enc, b1, bn = (text / r[k]["seconds"] for k in ("encode", "build_1", f"build_{cores}"))
        bnr = r[f"build_{cores}"]
        lines.append(
            f"| {r['file_mb']:.0f} MB jsonl ({text:.0f} MB text) | {enc:.2f} | {b1:.2f} | {bn:.2f} | {bn / enc:.2f} "
            f"| {bnr['peak_rss_gib']:.2f} / {bnr['worker_peak_rss_gib']:.2f} |"
        )
    lines += [
        "",
        f"## Start-up: seconds and peak RSS per process (seq_len {args.seq_len})",
        "",
        "| corpus | start-up | seconds | peak RSS GiB | train windows |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        name = f"{r['file_mb']:.0f} MB"
        lines.append(
            f"| {name} | later start, `cached_tokens` + `windows_from_tokens` + one batch "
            f"| {r['later']['seconds']:.2f} | {r['later']['peak_rss_gib']:.2f} | {r['later']['windows']} |"
        )
        lines += [
            f"| {name} | later start, train.py rank {i} of {RANKS} (data ready) | {x['seconds']:.2f} "
            f"| {x['peak_rss_gib']:.2f} | |"
            for i, x in enumerate(r["ranks"])
        ]
        if r["old"]:
            old = r["old"]
            lines.append(
                f"| {name} | old: tokenize in memory at every start | {old['seconds']:.2f} | {old['peak_rss_gib']:.2f} "
                f"| {old['windows']} |"
            )
        else:
            lines.append(
                f"| {name} | old: tokenize in memory at every start | not run: its RSS grows with the corpus "
                f"(above), this machine has {_machine_gib():.0f} GiB | | |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, nargs="+", default=[100], help="corpus sizes in MB (copies of the bundled plays)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--old-max-mb", type=int, default=100, help="largest corpus the old in-memory path runs on")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        mode, corpus, cache, num_proc = a.child
        print(json.dumps(_child(mode, corpus, cache, a.seq_len, int(num_proc))))
        return
    from nvfp4_titan.data.tokens import available_cpus

    cores, load = available_cpus(), os.getloadavg()[0]
    results = []
    for mb in a.mb:
        with tempfile.TemporaryDirectory(prefix="nvfp4-data-bench-") as tmp:
            results.append(_measure(mb, Path(tmp), a.seq_len, a.old_max_mb, cores))
        print(json.dumps(results[-1]), flush=True)
    text = _record(a, results, cores, (load, os.getloadavg()[0]))
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
