"""Tokenize a corpus once into a memory-mapped token file; read training windows from it.

On disk (a folder, written whole or not at all): ``tokens.bin`` (uint32, every document's tokens
followed by EOS, documents in corpus order), ``offsets.npy`` (int64 [n_docs + 1]: where each
document starts in ``tokens.bin``), ``words.npy`` (int64 [n_docs]: each document's
whitespace-separated words, for word perplexity) and ``manifest.json`` (format, tokenizer hash, corpus files
with sizes and mtimes, counts, the sha256 of each data file). ``verified.json`` records the data
files' (size, mtime, ctime) when their content last matched: any write to a file changes them, and
the next start hashes it again, so bytes changed on disk are never trained on.
``token_cache`` keys the folder by (corpus files, text field, tokenizer), so a changed corpus or
tokenizer gets a new one and a stale one is never read; building it removes the earlier
versions' caches of the same corpus.

``PackedWindows`` gives the windows that ``nvfp4_titan.data.dataset.build_windows`` packs (the same tokens,
bit for bit) without holding the corpus in memory: a batch reads its windows from the map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nvfp4_titan.data.dataset import DataError, TokenWindows, _files, iter_documents, validation_ids
from nvfp4_titan.data.tokenizer import Tokenizer

log = logging.getLogger("nvfp4_titan")
FORMAT = 3  # 2: sha256 of tokens.bin in the manifest; 3: words.npy, sha256 of every data file
_BATCH = 128  # documents per encode_batch call (the tokenizer runs its own threads); bounds memory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


DATA_FILES = ("tokens.bin", "offsets.npy", "words.npy")


def _stat_key(folder: Path) -> list[list[int]]:
    return [[(st := (folder / f).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns] for f in DATA_FILES]


def corpus_key(path: str | Path, text_field: str, tokenizer: Tokenizer) -> dict:
    """What a token cache is built from: the corpus files (path, size, mtime, ctime: any write or
    copy of a file changes its ctime, which no tool sets back), the text field, the tokenizer
    file's sha256 and the format. Raises DataError as ``nvfp4_titan.data.dataset`` does."""
    _, files = _files(Path(path))
    stats = [(str(Path(f).resolve()), (st := os.stat(f)).st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files]
    return {
        "format": FORMAT,
        "files": stats,
        "text_field": text_field,
        "tokenizer_sha256": _sha256(Path(tokenizer.path)),
        "eos_id": tokenizer.eos_id,
    }


def resolve_cache_dir(configured: str | Path = "") -> Path:
    """``configured`` (a recipe's ``dataset.cache_dir``) when set, else ``$XDG_CACHE_HOME/nvfp4-titan``,
    or ``~/.cache/nvfp4-titan``. A relative XDG_CACHE_HOME is ignored, as the XDG base directory
    specification says."""
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "nvfp4-titan"


def token_cache(cache_dir: str | Path, key: dict) -> Path:
    """The folder of ``key``'s tokens under ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"tokens-{digest}"


def tokenize_corpus(
    path: str | Path, text_field: str, tokenizer: Tokenizer, out: Path, key: dict, progress: bool = True
) -> Path:
    """Tokenize the corpus at ``path`` into the folder ``out`` (see the module docstring), recording
    ``key`` (``corpus_key``, taken once by the caller that named ``out`` after it); returns ``out``.
    Written into a temporary folder beside ``out`` and renamed when whole: an interrupted
    run leaves no folder that looks complete (``open_tokens`` rejects partial ones), and a
    concurrent run that finished first is kept. Raises DataError for unreadable corpora."""
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as any folder the user makes: a team can share the cache
    try:
        offsets, words, n, digest = [0], [], 0, hashlib.sha256()
        with (
            open(tmp / "tokens.bin", "wb") as f,
            tqdm(desc=f"tokenizing {path}", unit=" docs", disable=not progress) as bar,
        ):
            for docs in iter_documents(path, text_field, _BATCH):
                words += [len(d.split()) for d in docs]
                for ids in tokenizer.encode_batch(docs):
                    data = np.asarray([*ids, tokenizer.eos_id], dtype=np.uint32).tobytes()
                    f.write(data)
                    digest.update(data)  # hashed as written: tokens.bin is not read again
                    n += len(data) // 4
                    offsets.append(n)
                bar.update(len(docs))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "words.npy", np.asarray(words, dtype=np.int64))
        manifest = {
            **key,
            "n_docs": len(offsets) - 1,
            "n_tokens": n,
            "sha256": {"tokens.bin": digest.hexdigest(), **{f: _sha256(tmp / f) for f in DATA_FILES[1:]}},
            "created": time.time(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (tmp / "verified.json").write_text(json.dumps(_stat_key(tmp)))  # the inodes move with tmp
        try:
            tmp.rename(out)
        except OSError:
            if open_tokens(out, key) is None:  # not a finished twin: refuse to guess
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class TokenFile:
    """A tokenized corpus, memory-mapped: ``tokens`` uint32 [n_tokens], ``offsets`` int64
    [n_docs + 1] (document d is ``tokens[offsets[d]:offsets[d + 1]]``, its EOS last), ``words``
    int64 [n_docs] (each document's whitespace-separated words)."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.offsets = np.load(folder / "offsets.npy")
        self.words = np.load(folder / "words.npy")
        self.tokens = (
            np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r")
            if self.offsets[-1]
            else np.zeros(0, dtype=np.uint32)
        )

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def documents(self, doc_ids: np.ndarray) -> tuple[torch.Tensor, int]:
        """Documents ``doc_ids``' tokens (each with its EOS) in that order, int64, and their words."""
        parts = [self.tokens[self.offsets[d] : self.offsets[d + 1]] for d in doc_ids]
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(ids), int(self.words[doc_ids].sum())


def open_tokens(folder: Path, key: dict) -> TokenFile | None:
    """The token file in ``folder`` if it is whole and was built from ``key``, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if {k: manifest.get(k) for k in key} != json.loads(json.dumps(key)):
            return None
        tf = TokenFile(folder, manifest)
        whole = (
            (folder / "tokens.bin").stat().st_size == 4 * manifest["n_tokens"]
            and tf.n_docs == manifest["n_docs"]
            and tf.words.shape == (tf.n_docs,)
            and int(tf.offsets[-1]) == manifest["n_tokens"]
            and bool(np.all(np.diff(tf.offsets) > 0))
        )
        return tf if whole and _content_matches(folder, manifest) else None
    except Exception:  # any unreadable or inconsistent file: not a cache to trust
        return None


def _content_matches(folder: Path, manifest: dict) -> bool:
    """Whether the data files hold the bytes the build hashed: trusted while their (size, mtime,
    ctime) are those ``verified.json`` recorded, else hashed again (and recorded where the cache
    is writable)."""
    stamp = folder / "verified.json"
    now = _stat_key(folder)
    try:
        if json.loads(stamp.read_text()) == now:
            return True
    except (OSError, ValueError):
        pass
    if any(_sha256(folder / f) != manifest["sha256"][f] for f in DATA_FILES):
        return False
    try:
        stamp.write_text(json.dumps(now))
    except OSError:  # a read-only shared cache: hashed again at the next start
        pass
    return True


class PackedWindows:
    """Windows of ``seq_len + 1`` tokens over the concatenation of documents ``doc_ids`` (in that
    order) of a ``TokenFile``, the tail that does not fill a window dropped: ``nvfp4_titan.data.dataset``'s
    ``_pack``, read from the map on demand. ``windows[idx]`` -> int64 [len(idx), seq_len + 1]."""

    def __init__(self, tf: TokenFile, doc_ids: np.ndarray, seq_len: int, vocab_size: int) -> None:
        self.tf, self.width, self.vocab_size = tf, seq_len + 1, vocab_size
        self.starts = tf.offsets[doc_ids]
        self.cum = np.concatenate([[0], np.cumsum(tf.offsets[doc_ids + 1] - self.starts)])
        self.n = int(self.cum[-1]) // self.width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"window index out of range [0, {self.n})")
        pos = idx[:, None] * self.width + np.arange(self.width)  # positions in the packed stream
        doc = np.searchsorted(self.cum, pos, side="right") - 1
        w = self.tf.tokens[self.starts[doc] + (pos - self.cum[doc])].astype(np.int64)
        if w.size and int(w.max()) >= self.vocab_size:  # bytes changed on disk since the build
            raise DataError(
                f"the token cache {self.tf.folder} holds ids outside the tokenizer's "
                f"{self.vocab_size} tokens: it is damaged; delete it and it is rebuilt"
            )
        return torch.from_numpy(w)


def windows_from_tokens(
    tf: TokenFile, seq_len: int, validation_fraction: float, seed: int, vocab_size: int
) -> TokenWindows:
    """``build_windows``'s train and validation windows (same split, same tokens) over ``tf``."""
    val = validation_ids(tf.n_docs, validation_fraction, seed)
    is_val = np.zeros(tf.n_docs, dtype=bool)
    is_val[list(val)] = True
    ids = np.arange(tf.n_docs)
    return TokenWindows(
        PackedWindows(tf, ids[~is_val], seq_len, vocab_size), PackedWindows(tf, ids[is_val], seq_len, vocab_size)
    )


_ABANDONED_S = 24 * 3600  # a build's temporary folder untouched this long was killed, not running


def _remove_abandoned_builds(folder: Path) -> None:
    """Remove temporary folders of killed builds of ``folder`` (``.tokens-<key>.*``, nothing else)."""
    now = time.time()
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        try:
            touched = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except OSError:  # not a folder, or finished meanwhile
            continue
        if now - touched > _ABANDONED_S:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_versions(folder: Path, key: dict) -> None:
    """After ``folder`` was built for ``key``: remove the caches of earlier versions of the same
    corpus (same files, text field and tokenizer; other sizes, times or format), which no run can
    read again, and damaged caches set aside more than a day ago. Derived data only: the corpus
    is untouched, and a running job keeps reading a removed cache through its open map."""
    paths = [f[0] for f in key["files"]]
    now = time.time()
    for other in folder.parent.glob("tokens-*"):
        if other == folder or not other.is_dir():
            continue
        if ".damaged-" in other.name:
            if now - other.stat().st_mtime > _ABANDONED_S:
                shutil.rmtree(other, ignore_errors=True)
            continue
        try:
            m = json.loads((other / "manifest.json").read_text())
            same_corpus = [f[0] for f in m["files"]] == paths and all(
                m.get(k) == key[k] for k in ("text_field", "tokenizer_sha256")
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # not one of ours, or unreadable: left alone
        if same_corpus:
            shutil.rmtree(other, ignore_errors=True)


def cached_tokens(
    path: str | Path,
    text_field: str,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    build: bool = True,
    progress: bool = True,
) -> TokenFile:
    """The corpus's token file from ``cache_dir``, built first when missing, stale or damaged
    (``build``; else DataError). Never reads a cache of another corpus or tokenizer."""
    key = corpus_key(path, text_field, tokenizer)
    folder = token_cache(cache_dir, key)
    tf = open_tokens(folder, key)
    if tf is None and build:
        try:
            _remove_abandoned_builds(folder)
            if folder.exists():  # damaged (a copy cut short, a disk error): rebuilt, kept aside
                aside = tempfile.mkdtemp(prefix=f"{folder.name}.damaged-", dir=folder.parent)
                folder.rename(aside)
                log.warning(
                    f"the token cache {folder} does not match its manifest (a file missing, cut short or changed "
                    f"on disk): set aside as {Path(aside).name} (removed after a day) and rebuilt"
                )
            tokenize_corpus(path, text_field, tokenizer, folder, key, progress)
            _remove_stale_versions(folder, key)
        except OSError as e:
            if blocker := next((p for p in (Path(cache_dir), *Path(cache_dir).parents) if p.is_file()), None):
                raise DataError(
                    f"dataset.cache_dir {cache_dir}: {blocker} is a file, not a folder; set dataset.cache_dir "
                    "to a folder"
                ) from None
            raise DataError(
                f"cannot write the token cache in {cache_dir} ({type(e).__name__}: {e.strerror or e}); "
                "set dataset.cache_dir to a writable folder with free space"
            ) from None
        tf = open_tokens(folder, key)
    if tf is None:
        raise DataError(f"no whole token cache of {path} in {folder}")
    if tf.n_docs == 0:
        raise DataError(f"{path}: no documents with text")
    return tf
