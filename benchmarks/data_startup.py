"""Corpus start-up: tokenizing in memory at every start (the old path) vs tokenizing once into the
token cache and memory-mapping it (train.py now), on a synthetic corpus of the bundled plays.

    python benchmarks/data_startup.py --mb 100 [--out benchmarks/results/data_startup_cpu_<date>.md]

Each measurement runs in a fresh process (peak RSS is the process's ru_maxrss): the old path
(load_documents + build_windows), the first start (tokenize into an empty cache + map) and a
later start (map the cache). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "data/assets/tokenizer.json"


def _measure(mode: str, corpus: str, cache: str, seq_len: int) -> None:
    """Child process: one start-up, printed as JSON (seconds, peak RSS GiB, windows)."""
    from nvfp4_titan.data.dataset import build_windows, load_documents
    from nvfp4_titan.data.tokenizer import load_tokenizer
    from nvfp4_titan.data.tokens import cached_tokens, windows_from_tokens

    t0 = time.perf_counter()
    tok = load_tokenizer(TOKENIZER)
    if mode == "old":
        w = build_windows(load_documents(corpus), tok, seq_len, 0.05, 0)
    else:
        w = windows_from_tokens(
            cached_tokens(corpus, "text", tok, cache, progress=False), seq_len, 0.05, 0, tok.vocab_size
        )
    w.train[list(range(8))]  # one batch read
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_gib": rss, "windows": len(w.train)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="corpus size in MB (copies of the bundled plays)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _measure(a.child[0], a.child[1], a.child[2], a.seq_len)
    plays = (ROOT / "data/assets/shakespeare.jsonl").read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nvfp4-data-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "wb") as f:
            for _ in range(max(1, a.mb * 2**20 // len(plays))):
                f.write(plays)
        size = corpus.stat().st_size / 2**20
        for mode, label in (
            ("old", "old: tokenize in memory at every start"),
            ("cache", "first start: tokenize into the cache, map it"),
            ("cache", "later start: map the cache"),
        ):
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--seq-len",
                    str(a.seq_len),
                    "--child",
                    mode,
                    str(corpus),
                    str(Path(tmp) / "cache"),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
            )
            rows.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    import tokenizers
    import torch

    commit = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    table = [
        f"# Corpus start-up: in-memory tokenization vs the token cache ({datetime.date.today()})",
        "",
        f"`python benchmarks/data_startup.py --mb {a.mb} --seq-len {a.seq_len}`: {size:.0f} MB jsonl "
        f"(the bundled plays repeated), bundled 8k BPE tokenizer, {os.cpu_count()} CPU cores, one process; "
        f"commit {commit}, torch {torch.__version__}, tokenizers {tokenizers.__version__}.",
        "",
        "| start-up | seconds | peak RSS GiB | train windows |",
        "|---|---:|---:|---:|",
    ]
    table += [f"| {label} | {r['seconds']:.2f} | {r['peak_rss_gib']:.2f} | {r['windows']} |" for label, r in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
