"""The token cache: windows read from the memory map equal build_windows' bit for bit; a stale,
damaged or interrupted cache is never read."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nvfp4_titan.data.dataset import DataError, build_windows, load_documents, validation_ids
from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.data.tokens import (
    cached_tokens,
    corpus_key,
    open_tokens,
    resolve_cache_dir,
    token_cache,
    windows_from_tokens,
)

CORPUS = "data/assets/shakespeare.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/assets/tokenizer.json")


@pytest.mark.parametrize("seq_len,fraction,seed", [(64, 0.05, 0), (2048, 0.2, 3), (7, 0.0, 1)])
def test_mapped_windows_equal_packed_windows(tmp_path, tokenizer, seq_len, fraction, seed):
    old = build_windows(load_documents(CORPUS), tokenizer, seq_len, fraction, seed)
    new = windows_from_tokens(
        cached_tokens(CORPUS, "text", tokenizer, tmp_path), seq_len, fraction, seed, tokenizer.vocab_size
    )
    for a, b in ((old.train, new.train), (old.validation, new.validation)):
        assert len(a) == len(b)
        assert torch.equal(a, b[torch.arange(len(b))])
    idx = torch.tensor([len(new.train) - 1, 0, 5, 5])  # any order, repeats, as a loader asks
    assert torch.equal(new.train[idx], old.train[idx])
    with pytest.raises(IndexError):
        new.train[torch.tensor([len(new.train)])]


def _corpus(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_stale_cache_is_rebuilt_when_the_corpus_or_tokenizer_changes(tmp_path, tokenizer):
    path, cache = _corpus(tmp_path, ["one two", "three"]), tmp_path / "cache"
    first = cached_tokens(path, "text", tokenizer, cache)
    assert first.n_docs == 2
    (tmp_path / "b").mkdir()
    elsewhere = cached_tokens(_corpus(tmp_path / "b", ["another corpus"]), "text", tokenizer, cache)
    path.write_text(path.read_text() + json.dumps({"text": "four"}) + "\n")  # the corpus grew
    again = cached_tokens(path, "text", tokenizer, cache)
    assert again.n_docs == 3 and again.folder != first.folder
    # the earlier version's cache can never be read again: removed; another corpus's is kept
    assert not first.folder.exists() and elsewhere.folder.is_dir()
    other = tmp_path / "tok.json"
    shutil.copy("data/assets/tokenizer.json", other)
    other.write_text(other.read_text().replace('"unk_token"', '"unk_token" ', 1))  # other bytes
    assert token_cache(cache, corpus_key(path, "text", load_tokenizer(other))) != again.folder


@pytest.mark.parametrize("damage", ["truncated_tokens", "no_manifest", "bad_offsets"])
def test_damaged_cache_is_never_read_and_is_rebuilt(tmp_path, tokenizer, damage):
    path, cache = _corpus(tmp_path, ["alpha beta gamma", "delta"]), tmp_path / "cache"
    tf = cached_tokens(path, "text", tokenizer, cache)
    want = tf.tokens.copy()
    folder, key = tf.folder, corpus_key(path, "text", tokenizer)
    del tf
    if damage == "truncated_tokens":
        b = (folder / "tokens.bin").read_bytes()
        (folder / "tokens.bin").write_bytes(b[:-4])
    elif damage == "no_manifest":  # what a tokenization killed before its end would leave
        (folder / "manifest.json").unlink()
    else:
        np.save(folder / "offsets.npy", np.array([0, 5, 3], dtype=np.int64))
    assert open_tokens(folder, key) is None
    with pytest.raises(DataError, match="no whole token cache"):
        cached_tokens(path, "text", tokenizer, cache, build=False)
    rebuilt = cached_tokens(path, "text", tokenizer, cache)
    assert np.array_equal(rebuilt.tokens, want)
    assert [p.name.startswith(f"{folder.name}.damaged-") for p in cache.iterdir()].count(True) == 1


def test_same_size_and_mtime_rewrite_is_still_a_new_cache(tmp_path, tokenizer):
    """`sed -i` + `touch -r` (or a copy keeping times) leaves size and mtime; the ctime moves."""
    path, cache = _corpus(tmp_path, ["abc abc", "def"]), tmp_path / "cache"
    st = path.stat()
    first = cached_tokens(path, "text", tokenizer, cache)
    path.write_text(path.read_text().replace("abc", "xyz"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert cached_tokens(path, "text", tokenizer, cache).folder != first.folder


def test_tokens_changed_on_disk_are_detected_and_rebuilt(tmp_path, tokenizer):
    """Other ids in range, same size and mtime (only the ctime moves): the content no longer
    matches the build's sha256, so the cache is set aside and rebuilt, never trained on."""
    path, cache = _corpus(tmp_path, ["one two three", "four"]), tmp_path / "cache"
    tf = cached_tokens(path, "text", tokenizer, cache)
    folder, want = tf.folder, tf.tokens.copy()
    st = (folder / "tokens.bin").stat()
    stamps = json.loads((folder / "verified.json").read_text())
    assert stamps[0] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns] and len(stamps) == 3
    del tf
    raw = bytearray((folder / "tokens.bin").read_bytes())
    raw[0:4] = np.uint32((int(want[0]) + 1) % tokenizer.vocab_size).tobytes()
    (folder / "tokens.bin").write_bytes(bytes(raw))
    os.utime(folder / "tokens.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_tokens(folder, corpus_key(path, "text", tokenizer)) is None
    rebuilt = cached_tokens(path, "text", tokenizer, cache)
    assert np.array_equal(rebuilt.tokens, want)
    assert [p.name.startswith(f"{folder.name}.damaged-") for p in cache.iterdir()].count(True) == 1


@pytest.mark.parametrize("name", ["offsets.npy", "words.npy"])
def test_plausible_edits_of_the_index_files_are_detected(tmp_path, tokenizer, name):
    """A document boundary moved by one token (still increasing, so structurally whole) or a word
    count changed: the files' sha256 no longer match the manifest, and the cache is rebuilt."""
    path, cache = _corpus(tmp_path, ["one two three", "four five", "six"]), tmp_path / "cache"
    tf = cached_tokens(path, "text", tokenizer, cache)
    folder, want = tf.folder, np.load(tf.folder / name)
    del tf
    edited = want.copy()
    edited[1] += 1
    np.save(folder / name, edited)
    assert open_tokens(folder, corpus_key(path, "text", tokenizer)) is None
    assert np.array_equal(np.load(cached_tokens(path, "text", tokenizer, cache).folder / name), want)


def test_ids_outside_the_vocabulary_while_mapped_are_damage(tmp_path, tokenizer):
    """Bytes changed under a running job's map: the windows it reads are checked against the
    vocabulary (the content hash is taken at start-up)."""
    path, cache = _corpus(tmp_path, ["one two three", "four"]), tmp_path / "cache"
    tf = cached_tokens(path, "text", tokenizer, cache)
    w = windows_from_tokens(tf, 2, 0.0, 0, tokenizer.vocab_size)
    raw = bytearray((tf.folder / "tokens.bin").read_bytes())
    raw[0:4] = np.uint32(tokenizer.vocab_size + 7).tobytes()  # same size, another id
    with open(tf.folder / "tokens.bin", "r+b") as f:  # in place: the map sees it
        f.write(bytes(raw))
    with pytest.raises(DataError, match="holds ids outside the tokenizer's .* it is damaged"):
        w.train[torch.tensor([0])]


@pytest.mark.parametrize("manifest", ["[]", "null", '{"n_tokens": null}'])
def test_malformed_manifest_is_damage(tmp_path, tokenizer, manifest):
    path, cache = _corpus(tmp_path, ["alpha", "beta"]), tmp_path / "cache"
    tf = cached_tokens(path, "text", tokenizer, cache)
    (tf.folder / "manifest.json").write_text(manifest)
    assert open_tokens(tf.folder, corpus_key(path, "text", tokenizer)) is None
    assert cached_tokens(path, "text", tokenizer, cache).n_docs == 2


def test_unwritable_cache_dir_is_one_error(tmp_path, tokenizer):
    path = _corpus(tmp_path, ["alpha"])
    (tmp_path / "afile").write_text("x")
    for cache in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(DataError, match=r"dataset.cache_dir .*: .*afile is a file, not a folder"):
            cached_tokens(path, "text", tokenizer, cache)
    with pytest.raises(
        DataError, match=r"cannot write the token cache in /proc/.* \(\w+Error: .*set dataset.cache_dir"
    ):
        cached_tokens(path, "text", tokenizer, "/proc/nvfp4-titan-test-cache")  # unwritable, even for root


def test_abandoned_builds_are_removed_running_ones_kept(tmp_path, tokenizer):
    path, cache = _corpus(tmp_path, ["alpha", "beta"]), tmp_path / "cache"
    folder = token_cache(cache, corpus_key(path, "text", tokenizer))
    old, fresh, other = (cache / f".{folder.name}.killed"), (cache / f".{folder.name}.running"), cache / "keep"
    for d in (old, fresh, other):
        d.mkdir(parents=True)
        (d / "tokens.bin").write_bytes(b"\0" * 8)
    day_ago = time.time() - 2 * 24 * 3600
    for p in (old / "tokens.bin", old, other / "tokens.bin", other):
        os.utime(p, (day_ago, day_ago))
    cached_tokens(path, "text", tokenizer, cache)
    assert not old.exists() and fresh.exists() and other.exists()


def test_relative_xdg_cache_home_is_ignored(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert resolve_cache_dir() == Path.home() / ".cache" / "nvfp4-titan"
    monkeypatch.setenv("XDG_CACHE_HOME", "/abs/cache")
    assert resolve_cache_dir() == Path("/abs/cache/nvfp4-titan")


def test_bad_corpus_errors_come_through(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        cached_tokens(tmp_path / "nope.jsonl", "text", tokenizer, tmp_path / "cache")
    (tmp_path / "n.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="holds int values"):
        cached_tokens(tmp_path / "n.jsonl", "text", tokenizer, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # the interrupted build left nothing behind


def test_held_out_tokens_are_the_recipes_validation_documents(tmp_path, tokenizer):
    """eval_ppl's and the QAT experiment's held-out ids and word counts, read from the token
    cache, equal the held-out documents tokenized afresh (each followed by EOS)."""
    from nvfp4_titan.evaluate import held_out_tokens
    from nvfp4_titan.training.config import load_config

    cfg = load_config(Path("recipes/debug_cpu.toml"), [f"--dataset.cache_dir={tmp_path}", "--training.seed=3"])
    docs = load_documents(CORPUS)
    for data, chosen in (
        (None, sorted(validation_ids(len(docs), cfg.dataset.validation_fraction, 3))),
        (Path(CORPUS), range(len(docs))),
    ):
        ids, words = held_out_tokens(cfg, data, "text", tokenizer)
        texts = [docs[i] for i in chosen]
        want = torch.tensor([t for d in tokenizer.encode_batch(texts) for t in (*d, tokenizer.eos_id)])
        assert torch.equal(ids, want) and words == sum(len(d.split()) for d in texts)
