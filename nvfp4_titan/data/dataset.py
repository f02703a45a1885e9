"""Local corpora through ``datasets`` (offline), tokenized, split by document, packed.

Documents: one per row of jsonl/json/parquet files (``text_field``), one per .txt file.
Each document's tokens get EOS appended; the stream is cut into windows of seq_len + 1.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_titan.data.tokenizer import Tokenizer

log = logging.getLogger("nvfp4_titan")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """Corpus files that cannot be used; the message names them."""


def _files(path: Path) -> tuple[str, list[str]]:
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; set dataset.path to a local file or folder")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in BUILDERS and f.is_file())
    if not files:
        raise DataError(f"{path}: no {'/'.join(BUILDERS)} files in it")
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise DataError(f"{path}: mixed or unknown file types {sorted({f.suffix for f in files})}")
    return builders.pop(), [str(f) for f in files]


def _read_plain(builder: str, files: list[str], text_field: str, path: Path) -> list[str]:
    """jsonl and txt without ``datasets`` (GPU nodes that cannot install it); same documents."""
    if builder == "text":
        return [Path(f).read_text(encoding="utf-8") for f in files]
    if builder != "json" or not all(f.endswith(".jsonl") for f in files):
        raise DataError(f"{path}: reading {builder} files needs the datasets package (pip install datasets)")
    docs = []
    for f in files:
        for i, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines()):
            if line.strip():
                row = json.loads(line)
                if text_field not in row:
                    raise DataError(f"{f}:{i + 1}: no field {text_field!r}; its fields are {sorted(row)}")
                docs.append(row[text_field])
    return docs


def load_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The corpus's documents (``iter_documents``) in one list."""
    return [d for batch in iter_documents(path, text_field) for d in batch]


def iter_documents(path: str | Path, text_field: str = "text", batch_size: int = 1024) -> Iterator[list[str]]:
    """The corpus's documents in corpus order, ``batch_size`` at a time: strings, without empty or
    whitespace-only ones. With ``datasets`` the text stays in an on-disk Arrow cache (a temporary
    folder) and only one batch is in memory.

    Raises DataError for a file that is not UTF-8, a text field that holds no strings, or any
    file ``datasets`` cannot read (named with the reason)."""
    try:
        for batch in _batches(path, text_field, batch_size):
            bad = next((d for d in batch if d is not None and not isinstance(d, str)), None)
            if bad is not None:
                raise DataError(
                    f"{path}: field {text_field!r} holds {type(bad).__name__} values such as {bad!r}, "
                    "not text; set dataset.text_field to the field that holds the text"
                )
            if docs := [d for d in batch if d is not None and d.strip()]:
                yield docs
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a line or file): re-encode it as UTF-8"
        ) from None


def _batches(path: str | Path, text_field: str, batch_size: int) -> Iterator[list]:
    """The text field's values in batches, read with ``datasets`` offline (or the plain reader)."""
    builder, files = _files(Path(path))
    datasets = _datasets()
    if datasets is None:
        log.warning("datasets is not installed: reading %s with the plain jsonl/txt reader", path)
        docs = _read_plain(builder, files, text_field, Path(path))
        for i in range(0, len(docs), batch_size):
            yield docs[i : i + batch_size]
        return
    with tempfile.TemporaryDirectory(prefix="nvfp4-titan-hf-") as cache:
        ds = _load_dataset(datasets, builder, files, path, cache)
        if text_field not in ds.column_names:
            raise DataError(
                f"{path}: no field {text_field!r}; its fields are {ds.column_names} (set dataset.text_field)"
            )
        for batch in ds.select_columns([text_field]).iter(batch_size=batch_size):
            yield batch[text_field]
        del ds  # the Arrow files are memory-mapped: unmapped before the folder goes


def iter_rows(path: str | Path, fields: list[str], batch_size: int = 1024) -> Iterator[list[tuple[dict, str]]]:
    """The rows of a jsonl/json/parquet corpus (chat, ShareGPT or alpaca data), file by file in
    corpus order, ``batch_size`` at a time: (a dict of those of ``fields`` the file has, its
    location ``"FILE row N"``, N counted from 1). A row lacking a field its file has gets None.

    Raises DataError for a .txt corpus, a file holding none of ``fields`` (naming the fields it
    has), or a file ``datasets`` cannot read."""
    try:
        yield from _rows(path, fields, batch_size)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it as UTF-8") from None


def _rows(path: str | Path, fields: list[str], batch_size: int) -> Iterator[list[tuple[dict, str]]]:
    builder, files = _files(Path(path))
    if builder == "text":
        raise DataError(f"{path}: .txt files hold plain text; rows of {fields} need jsonl, json or parquet files")
    datasets = _datasets()
    for f in files:
        if datasets is None:
            if not f.endswith(".jsonl"):
                raise DataError(f"{path}: reading {builder} files needs the datasets package (pip install datasets)")
            lines = [
                (i, line) for i, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines()) if line.strip()
            ]
            rows = [(json.loads(line), f"{f} row {n + 1}") for n, (_, line) in enumerate(lines)]
            present = {k for r, _ in rows for k in r}
            if rows and not present & set(fields):
                raise DataError(f"{f}: none of the fields {fields}; its rows hold {sorted(present)}")
            rows = [({k: r.get(k) for k in fields if k in present}, where) for r, where in rows]
            for i in range(0, len(rows), batch_size):
                yield rows[i : i + batch_size]
            continue
        with tempfile.TemporaryDirectory(prefix="nvfp4-titan-hf-") as cache:
            ds = _load_dataset(datasets, builder, [f], f, cache)
            present = [k for k in fields if k in ds.column_names]
            if not present:
                raise DataError(f"{f}: none of the fields {fields}; its fields are {ds.column_names}")
            n = 0
            for batch in ds.select_columns(present).iter(batch_size=batch_size):
                size = len(batch[present[0]])
                yield [({k: batch[k][i] for k in present}, f"{f} row {n + i + 1}") for i in range(size)]
                n += size
            del ds


def _datasets():
    """The ``datasets`` module set up offline and quiet, or None when it is not installed."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        return None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _load_dataset(datasets, builder: str, files: list[str], path: str | Path, cache: str):
    """``datasets.load_dataset`` of local ``files`` into ``cache``; its failures as one DataError."""
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **kwargs)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__  # datasets wraps the decoding error
        if cause is not None:
            raise cause from None
        if all(os.path.getsize(f) == 0 for f in files):
            raise DataError(f"{path} is empty: no documents") from None
        # "An error occurred while generating the dataset" wraps the reason (e.g. the row)
        inner = (e.__cause__ or e.__context__ or e) if type(e).__name__ == "DatasetGenerationError" else e
        why = str(inner).strip() or type(inner).__name__
        if "column names don't match" in why and len(files) > 1:
            raise DataError(
                f"{path}: its {len(files)} {builder} files do not all hold the same fields "
                f"({why.splitlines()[0][:200]}); give files of one layout (dataset.text_field names the text)"
            ) from None
        raise DataError(f"{path}: datasets could not read it as {builder} ({why})") from None


@dataclass
class TokenWindows:
    train: torch.Tensor  # [n_train, seq_len + 1] int64
    validation: torch.Tensor  # [n_val, seq_len + 1]


def _pack(docs: list[list[int]], eos: int, seq_len: int) -> torch.Tensor:
    flat = torch.tensor([t for d in docs for t in (*d, eos)], dtype=torch.int64)
    n = flat.numel() // (seq_len + 1)
    return flat[: n * (seq_len + 1)].view(n, seq_len + 1)


def validation_ids(n_docs: int, validation_fraction: float, seed: int) -> set[int]:
    """Indices of the documents held out for validation: a seeded share, at least one."""
    order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(validation_fraction * n_docs) if validation_fraction > 0 else 0
    if validation_fraction > 0 and n_docs > 1:
        n_val = max(1, n_val)
    return set(order[:n_val])


def build_windows(
    documents: list[str], tokenizer: Tokenizer, seq_len: int, validation_fraction: float, seed: int
) -> TokenWindows:
    """Tokenize, hold out a seeded share of whole documents for validation, pack both."""
    tokens = tokenizer.encode_batch(documents)
    val_ids = validation_ids(len(tokens), validation_fraction, seed)
    train = _pack([t for i, t in enumerate(tokens) if i not in val_ids], tokenizer.eos_id, seq_len)
    val = _pack([t for i, t in enumerate(tokens) if i in val_ids], tokenizer.eos_id, seq_len)
    return TokenWindows(train, val)
