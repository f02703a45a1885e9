"""Tokenize a corpus once into a memory-mapped token file; read training windows from it.

On disk (a folder, written whole or not at all): ``tokens.bin`` (uint32, every document's tokens
followed by EOS, documents in corpus order), ``offsets.npy`` (int64 [n_docs + 1]: where each
document starts in ``tokens.bin``), ``words.npy`` (int64 [n_docs]: each document's
whitespace-separated words, for word perplexity) and ``manifest.json`` (format, tokenizer hash, corpus files
with sizes and mtimes, counts, the sha256 of each data file). A chat-type corpus
(``nvfp4_titan.data.chat``: one example per row, rendered with its chat template, no EOS appended)
adds ``mask.bin`` (uint8 per token: 1 inside an assistant turn) and keys the cache by its row format
and template too. ``verified.json`` records the data
files' (size, mtime, ctime) when their content last matched: any write to a file changes them, and
the next start hashes it again, so bytes changed on disk are never trained on.
``token_cache`` keys the folder by (corpus files, text field, tokenizer), so a changed corpus or
tokenizer gets a new one and a stale one is never read; building it removes the earlier
versions' caches of the same corpus. ``tokenize_corpus`` builds it in parts over several processes,
resumable: a killed build's finished parts are reused by the next one.

``PackedWindows`` gives the windows that ``nvfp4_titan.data.dataset.build_windows`` packs (the same tokens,
bit for bit) without holding the corpus in memory: a batch reads its windows from the map.
``ExampleWindows`` packs a chat-type corpus's examples whole into windows, with their loss mask and
example boundaries.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nvfp4_titan.data.chat import ChatFormat, RowError, load_chat_template, row_fields
from nvfp4_titan.data.dataset import DataError, TokenWindows, _files, iter_documents, iter_rows, validation_ids
from nvfp4_titan.data.packing import Batch, ExampleWindows, LongExamples
from nvfp4_titan.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # the recipe's section; its module imports nothing of this one
    from nvfp4_titan.training.config import Dataset

log = logging.getLogger("nvfp4_titan")
FORMAT = 3  # 2: sha256 of tokens.bin in the manifest; 3: words.npy, sha256 of every data file
_BATCH = 128  # documents per encode_batch call (the tokenizer runs its own threads); bounds memory
PART_BYTES = 16 * 2**20  # UTF-8 text per part: the unit of a worker's work and of a resumed build


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


DATA_FILES = ("tokens.bin", "offsets.npy", "words.npy")
MASK_FILE = "mask.bin"  # chat-type corpora only


def data_files(key: dict) -> tuple[str, ...]:
    """The data files of a cache built from ``key`` (a manifest holds its key)."""
    return DATA_FILES + ((MASK_FILE,) if "row_format" in key else ())


def _stat_key(folder: Path, files: tuple[str, ...]) -> list[list[int]]:
    return [[(st := (folder / f).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns] for f in files]


def corpus_key(path: str | Path, text_field: str, tokenizer: Tokenizer, chat: ChatFormat | None = None) -> dict:
    """What a token cache is built from: the corpus files (path, size, mtime, ctime: any write or
    copy of a file changes its ctime, which no tool sets back), the text field, the tokenizer
    file's sha256 and the format; for chat-type rows (``chat``) their row format and the chat
    template's sha256. Raises DataError as ``nvfp4_titan.data.dataset`` does."""
    _, files = _files(Path(path))
    stats = [(str(Path(f).resolve()), (st := os.stat(f)).st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files]
    key = {
        "format": FORMAT,
        "files": stats,
        "text_field": text_field,
        "tokenizer_sha256": _sha256(Path(tokenizer.path)),
        "eos_id": tokenizer.eos_id,
    }
    if chat is not None:
        key |= {"row_format": chat.name, "chat_template_sha256": chat.template.sha256}
    return key


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


def available_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask (what a job scheduler or
    ``taskset`` grants), not the machine's count; ``os.cpu_count()`` where there is no mask."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parts(
    path: str | Path, text_field: str, part_bytes: int, chat: ChatFormat | None = None
) -> Iterator[tuple[list, int]]:
    """The corpus's documents in corpus order (``chat``: its rows, each with its location), cut
    into parts of at least ``part_bytes`` of UTF-8 text (a row's: its JSON) (the last one may hold
    less), with their byte counts. The cut depends on the documents and ``part_bytes`` alone, so a
    resumed build cuts the same parts."""
    docs, size = [], 0
    batches = iter_documents(path, text_field, _BATCH) if chat is None else iter_rows(path, row_fields(chat.name))
    for batch in batches:
        for d in batch:
            docs.append(d)
            size += len(d.encode()) if chat is None else len(json.dumps(d[0], ensure_ascii=False).encode())
            if size >= part_bytes:
                yield docs, size
                docs, size = [], 0
    if docs:
        yield docs, size


def _part_file(build: Path, index: int) -> Path:
    return build / f"part-{index:06d}.npz"


def _load_part(build: Path, index: int, first: int, n_docs: int, chat: bool = False) -> tuple[np.ndarray, ...] | None:
    """Part ``index``'s tokens (uint32 [n], each document's tokens then EOS; a chat row's without),
    lengths (int64 [n_docs], tokens per document, summing to n), words (int64 [n_docs]) and, for
    ``chat``, the assistant mask (uint8 [n]) if its file is whole and holds documents ``first`` to
    ``first + n_docs`` (not a part of another cut); else None: missing, cut short or damaged
    (np.load checks each array's zip CRC)."""
    try:
        with np.load(_part_file(build, index)) as z:
            tokens, lengths, words, start = z["tokens"], z["lengths"], z["words"], int(z["first"])
            mask = z["mask"] if chat else None
    except Exception:  # any unreadable file: tokenized again
        return None
    whole = start == first and lengths.shape == words.shape == (n_docs,) and int(lengths.sum()) == tokens.size
    whole = whole and (mask is None or (mask.shape == tokens.shape and mask.dtype == np.uint8))
    return (tokens, lengths, words, mask) if whole and tokens.dtype == np.uint32 else None


_worker_tokenizer: Tokenizer | None = None  # a worker process's own, loaded once by _init_worker
_worker_chat: ChatFormat | None = None


def _init_worker(tokenizer_path: str, parent: int, chat: ChatFormat | None) -> None:
    global _worker_tokenizer, _worker_chat
    _worker_chat = chat
    # Ctrl-C reaches the whole process group: the main process stops the build (and its workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    # one thread per worker (the tiktoken tokenizer reads the same switch): num_proc workers fill
    # num_proc cores instead of each starting a thread per core
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _die_with(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when ``parent`` (the process that spawned it)
    dies, killed or out of memory, so that no worker outlives its build; elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def _write_part(
    build: Path,
    index: int,
    first: int,
    docs: list,
    tokenizer: Tokenizer | None = None,
    chat: ChatFormat | None = None,
    worker: bool = True,
) -> None:
    """Tokenize ``docs`` (documents ``first``...; chat-type rows with their locations when
    ``chat``) into part ``index`` of ``build`` (``_load_part`` reads it) with ``tokenizer`` and
    ``chat`` (``worker``: this worker's). Written under a temporary name and renamed when whole,
    so a killed build leaves no part file that looks finished. Raises DataError naming a row that
    cannot be trained on."""
    tok, chat = (_worker_tokenizer, _worker_chat) if worker else (tokenizer, chat)
    arrays: dict[str, np.ndarray] = {}
    if chat is None:
        tokens, lengths = [], []
        for i in range(0, len(docs), _BATCH):  # bounds the tokenizer's per-token objects in memory
            ids = tok.encode_batch(docs[i : i + _BATCH])
            counts = [len(t) + 1 for t in ids]
            flat = itertools.chain.from_iterable((*t, tok.eos_id) for t in ids)
            tokens.append(np.fromiter(flat, dtype=np.uint32, count=sum(counts)))
            lengths += counts
        words = np.asarray([len(d.split()) for d in docs], dtype=np.int64)
    else:
        tokens, lengths, masks, n_words = [], [], [], []
        for row, where in docs:
            try:
                ids, mask, w = chat.encode(row, tok)
            except RowError as e:
                raise DataError(f"{where}: {e}") from None
            tokens.append(np.asarray(ids, dtype=np.uint32))
            masks.append(mask)
            lengths.append(len(ids))
            n_words.append(w)
        words = np.asarray(n_words, dtype=np.int64)
        arrays["mask"] = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=build)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared cache's parts from the team
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.uint32),
                lengths=np.asarray(lengths, np.int64),
                words=words,
                first=first,
                **arrays,
            )
        os.replace(tmp, _part_file(build, index))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _done() -> Future:
    f: Future = Future()
    f.set_result(None)
    return f


@contextmanager
def _part_writers(tokenizer: Tokenizer, workers: int, chat: ChatFormat | None) -> Iterator[Callable[..., Future]]:
    """``submit(build, index, first, docs)`` -> a Future of ``_write_part``: run by one of
    ``workers`` spawned processes (fork is unsafe with the tokenizers' threads), or, with one
    worker, at once in this process with ``tokenizer`` and its own threads. On an error or an
    interrupt the workers are stopped at once; the parts finished serve the next build."""
    if workers == 1:

        def here(*args: object) -> Future:
            _write_part(*args, tokenizer, chat, worker=False)
            return _done()

        yield here
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tokenizer.path), os.getpid(), chat),
    )
    try:
        yield lambda *args: pool.submit(_write_part, *args)
    except BaseException:  # an error or Ctrl-C: stop now, not after the running parts
        # a part being written is left as a temporary file, never as a part; there is no public
        # way to stop a running task before Python 3.14's terminate_workers
        for process in list((pool._processes or {}).values()):
            process.kill()
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()


def _tokenized_parts(
    path: str | Path,
    text_field: str,
    build: Path,
    part_bytes: int,
    submit: Callable[..., Future],
    window: int,
    chat: ChatFormat | None,
) -> Iterator[tuple[int, int, int, int]]:
    """(index, first document, documents, text bytes) of each part of the corpus, in corpus order,
    once its file in ``build`` is whole: kept from a killed build, else tokenized by ``submit``
    with at most ``window`` parts in flight (their text is held until they are done)."""
    pending: deque[tuple[tuple[int, int, int, int], Future]] = deque()
    first = 0
    for index, (docs, size) in enumerate(_parts(path, text_field, part_bytes, chat)):
        kept = _load_part(build, index, first, len(docs), chat is not None) is not None
        pending.append(((index, first, len(docs), size), _done() if kept else submit(build, index, first, docs)))
        first += len(docs)
        while len(pending) >= window or (pending and pending[0][1].done()):
            part, future = pending.popleft()
            future.result()  # raises the worker's error
            yield part
    for part, future in pending:
        future.result()
        yield part


def tokenize_corpus(
    path: str | Path,
    text_field: str,
    tokenizer: Tokenizer,
    out: Path,
    key: dict,
    progress: bool = True,
    num_proc: int = 0,
    part_bytes: int = PART_BYTES,
    chat: ChatFormat | None = None,
) -> Path:
    """Tokenize the corpus at ``path`` into the folder ``out`` (see the module docstring), recording
    ``key`` (``corpus_key``, taken once by the caller that named ``out`` after it); returns ``out``.
    ``chat``: the corpus holds chat-type rows, rendered and masked by it (``mask.bin``).

    The documents are cut, in corpus order, into parts of about ``part_bytes`` of text, each
    tokenized by one of ``num_proc`` processes (0: ``available_cpus()``; 1: this process, with
    the tokenizer's own threads) into a part file of the build folder ``.<out name>.build``
    beside ``out``. A killed build's finished parts are kept there and reused by the next build
    of the same ``key``, however late (``cached_tokens`` removes other keys' build folders
    untouched for a day). An error or Ctrl-C stops the workers at once; a worker dies with the
    process that started it. The parts are then concatenated in order into a temporary folder
    beside ``out``, renamed when whole: an interrupted run leaves no folder that looks complete
    (``open_tokens`` rejects partial ones), a concurrent run that finished first is kept, and
    killed runs' temporary folders of ``out`` are removed. The files are the same bytes for any
    ``num_proc`` and ``part_bytes``.

    Raises DataError for unreadable corpora (and removes the build folder: fixing the corpus
    changes ``key``) or a worker that died (the folder is kept), OSError for a cache folder that
    cannot be written, ValueError for ``num_proc`` < 0."""
    from tqdm import tqdm

    if num_proc < 0:
        raise ValueError(f"num_proc={num_proc}: must be >= 0 (0: every core this process may use)")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.build"
    build.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as any folder the user makes: a team can share the cache
    corpus_bytes = sum(f[1] for f in key["files"])
    compressed = key["files"][0][0].endswith(".parquet")  # its text is larger than its files
    # no more workers than parts: a corpus of one part is tokenized here, without starting a pool
    wanted = num_proc or available_cpus()
    workers = wanted if compressed else max(1, min(wanted, -(-corpus_bytes // part_bytes)))
    try:
        digest, lengths, words = hashlib.sha256(), [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        with (
            open(tmp / "tokens.bin", "wb") as f,
            open(tmp / MASK_FILE, "wb") if chat is not None else contextlib.nullcontext() as mask_file,
            # the text of jsonl/txt files is about their size; parquet's is compressed: no total
            tqdm(
                desc=f"tokenizing {path}",
                total=None if compressed else corpus_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
            _part_writers(tokenizer, workers, chat) as submit,
        ):
            for index, first, n_docs, size in _tokenized_parts(
                path, text_field, build, part_bytes, submit, 2 * workers, chat
            ):
                part = _load_part(build, index, first, n_docs, chat is not None)
                if part is None:
                    raise FileNotFoundError(f"{_part_file(build, index)} was removed or changed during the build")
                f.write(part[0])
                if mask_file is not None:
                    mask_file.write(part[3])
                digest.update(part[0])  # hashed as written: tokens.bin is not read again
                lengths.append(part[1])
                words.append(part[2])
                bar.update(size)
            bar.total = bar.n  # the text's bytes, now known
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.concatenate(lengths))])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "words.npy", np.concatenate(words))
        manifest = {
            **key,
            "n_docs": len(offsets) - 1,
            "n_tokens": int(offsets[-1]),
            "sha256": {"tokens.bin": digest.hexdigest(), **{f: _sha256(tmp / f) for f in data_files(key)[1:]}},
            "created": time.time(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (tmp / "verified.json").write_text(json.dumps(_stat_key(tmp, data_files(key))))  # the inodes move with tmp
        tmp.rename(out)
    except BrokenProcessPool:
        raise DataError(
            f"a process tokenizing {path} died: killed (out of memory? set dataset.num_proc lower; the parts "
            "finished are kept for the next run), or it could not start (a script that builds the cache with "
            "num_proc != 1 must do it under `if __name__ == '__main__':`, as spawned processes import it)"
        ) from None
    except DataError:
        shutil.rmtree(build, ignore_errors=True)
        raise
    except Exception:
        if open_tokens(out, key) is None:  # not a concurrent build that finished first (and took the parts)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)
    # a killed build's partial copy, or a concurrent build's (which then reads this one): no run reads them
    for leftover in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return out


class TokenFile:
    """A tokenized corpus, memory-mapped: ``tokens`` uint32 [n_tokens], ``offsets`` int64
    [n_docs + 1] (document d is ``tokens[offsets[d]:offsets[d + 1]]``, its EOS last), ``words``
    int64 [n_docs] (each document's whitespace-separated words; a chat row's assistant words),
    ``mask`` uint8 [n_tokens] (chat-type corpora: 1 inside an assistant turn) or None."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.offsets = np.load(folder / "offsets.npy")
        self.words = np.load(folder / "words.npy")
        n = int(self.offsets[-1])
        self.tokens = np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r") if n else np.zeros(0, np.uint32)
        self.mask = None
        if "row_format" in manifest:
            self.mask = np.memmap(folder / MASK_FILE, dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)

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
            and (tf.mask is None or tf.mask.shape == (manifest["n_tokens"],))
        )
        return tf if whole and _content_matches(folder, manifest) else None
    except Exception:  # any unreadable or inconsistent file: not a cache to trust
        return None


def _content_matches(folder: Path, manifest: dict) -> bool:
    """Whether the data files hold the bytes the build hashed: trusted while their (size, mtime,
    ctime) are those ``verified.json`` recorded, else hashed again (and recorded where the cache
    is writable)."""
    stamp = folder / "verified.json"
    files = data_files(manifest)
    now = _stat_key(folder, files)
    try:
        if json.loads(stamp.read_text()) == now:
            return True
    except (OSError, ValueError):
        pass
    if any(_sha256(folder / f) != manifest["sha256"][f] for f in files):
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

    def batch(self, idx: torch.Tensor) -> Batch:
        """Windows ``idx`` as a ``Batch``: every next token counted, no segments."""
        return Batch.from_windows(self[idx])

    def counted(self, idx: torch.Tensor) -> int:
        return len(idx) * (self.width - 1)


def windows_from_tokens(
    tf: TokenFile,
    seq_len: int,
    validation_fraction: float,
    seed: int,
    vocab_size: int,
    train_on_prompt: bool = False,
    long_examples: LongExamples = "drop",
) -> TokenWindows:
    """``build_windows``'s train and validation windows (same split, same tokens) over ``tf``; for a
    chat-type ``tf``, its examples packed whole (``ExampleWindows``: ``train_on_prompt``,
    ``long_examples``), the held-out split being whole examples too."""
    val = validation_ids(tf.n_docs, validation_fraction, seed)
    is_val = np.zeros(tf.n_docs, dtype=bool)
    is_val[list(val)] = True
    ids = np.arange(tf.n_docs)
    if tf.mask is not None:
        return TokenWindows(
            *(
                ExampleWindows(tf, ids[part], seq_len, vocab_size, seed, train_on_prompt, long_examples)
                for part in (~is_val, is_val)
            )
        )
    return TokenWindows(
        PackedWindows(tf, ids[~is_val], seq_len, vocab_size), PackedWindows(tf, ids[is_val], seq_len, vocab_size)
    )


_ABANDONED_S = 24 * 3600  # a build's temporary folder untouched this long was killed, not running


def _remove_abandoned_builds(folder: Path) -> None:
    """Remove the temporary and build folders of killed builds (``.tokens-<key>.*``, nothing else)
    beside ``folder``, of any key (a corpus edited since will never resume them) but ``folder``'s
    own build folder, which the build about to start resumes however old it is."""
    now = time.time()
    for tmp in folder.parent.glob(".tokens-*.*"):
        if tmp.name == f".{folder.name}.build":
            continue
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
                m.get(k) == key.get(k) for k in ("text_field", "tokenizer_sha256", "row_format")
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
    num_proc: int = 0,
    chat: ChatFormat | None = None,
) -> TokenFile:
    """The corpus's token file from ``cache_dir``, built first when missing, stale or damaged
    (``build``, by ``num_proc`` processes: see ``tokenize_corpus``; else DataError). Never reads
    a cache of another corpus, tokenizer, row format or chat template (``chat``: chat-type rows)."""
    corpus = Path(path).resolve()
    if corpus.is_dir() and Path(cache_dir).resolve().is_relative_to(corpus):
        raise DataError(
            f"dataset.cache_dir {cache_dir} lies inside the corpus folder {path}: the cache's own files would be "
            "read as corpus files; set dataset.cache_dir outside the corpus folder"
        )
    key = corpus_key(path, text_field, tokenizer, chat)
    folder = token_cache(cache_dir, key)
    tf = open_tokens(folder, key)
    if tf is None and build:
        try:
            _remove_abandoned_builds(folder)
            if folder.exists():  # damaged (a copy cut short, a disk error): rebuilt, kept aside
                aside = tempfile.mkdtemp(prefix=f"{folder.name}.damaged-", dir=folder.parent)
                try:
                    folder.rename(aside)
                except FileNotFoundError:  # another process (a node of a shared cache) set it aside first
                    os.rmdir(aside)
                else:
                    log.warning(
                        f"the token cache {folder} does not match its manifest (a file missing, cut short or changed "
                        f"on disk): set aside as {Path(aside).name} (removed after a day) and rebuilt"
                    )
            tokenize_corpus(path, text_field, tokenizer, folder, key, progress, num_proc, chat=chat)
            _remove_stale_versions(folder, key)
        except OSError as e:
            candidates = (Path(cache_dir), *Path(cache_dir).parents)
            if blocker := next((p for p in candidates if p.exists() and not p.is_dir()), None):
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


def chat_format(dataset: Dataset | None, tokenizer: Tokenizer) -> ChatFormat | None:
    """The recipe's chat-type row format and template (``dataset.format``, ``dataset.chat_template``),
    or None for plain text. Raises DataError when the template cannot be had (the message names
    the setting that fixes it)."""
    if dataset is None or dataset.format == "text":
        return None
    try:
        template = load_chat_template(tokenizer.path, dataset.chat_template, tokenizer.eos_token)
    except RowError as e:
        raise DataError(str(e)) from None
    return ChatFormat(dataset.format, template)


def dataset_tokens(
    path: str | Path, text_field: str, tokenizer: Tokenizer, dataset: Dataset | None, build: bool = True
) -> TokenFile:
    """``cached_tokens`` of the corpus at ``path`` in the cache a recipe's ``[dataset]`` section
    names, built with its ``num_proc`` and read in its ``format`` (``dataset`` None: plain text,
    the default cache, every core): what train.py, ``tokenize_corpus.py``, calibration and
    evaluation read."""
    if dataset is None:
        return cached_tokens(path, text_field, tokenizer, resolve_cache_dir(), build)
    return cached_tokens(
        path,
        text_field,
        tokenizer,
        resolve_cache_dir(dataset.cache_dir),
        build,
        num_proc=dataset.num_proc,
        chat=chat_format(dataset, tokenizer),
    )
