"""The token cache: windows read from the memory map equal build_windows' bit for bit; a stale,
damaged or interrupted cache is never read; any number of processes and part size build the same
bytes, and a killed build resumes from its finished, undamaged parts."""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nvfp4_titan.data import tokens
from nvfp4_titan.data.dataset import DataError, build_windows, load_documents
from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.data.tokens import (
    DATA_FILES,
    PART_BYTES,
    cached_tokens,
    corpus_key,
    open_tokens,
    resolve_cache_dir,
    token_cache,
    tokenize_corpus,
    windows_from_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
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
    with pytest.raises(DataError, match=r"dataset.cache_dir /dev/null: /dev/null is a file, not a folder"):
        cached_tokens(path, "text", tokenizer, "/dev/null")  # a device, not a regular file
    with pytest.raises(
        DataError, match=r"cannot write the token cache in /proc/.* \(\w+Error: .*set dataset.cache_dir"
    ):
        cached_tokens(path, "text", tokenizer, "/proc/nvfp4-titan-test-cache")  # unwritable, even for root


def test_abandoned_builds_are_removed_running_ones_kept(tmp_path, tokenizer):
    """Killed builds untouched for a day are removed, those of an edited corpus (another key) too."""
    path, cache = _corpus(tmp_path, ["alpha", "beta"]), tmp_path / "cache"
    folder = token_cache(cache, corpus_key(path, "text", tokenizer))
    old, fresh, other = (cache / f".{folder.name}.killed"), (cache / f".tokens-{'0' * 24}.build"), cache / "keep"
    old_of_another_key = cache / f".tokens-{'1' * 24}.build"
    for d in (old, fresh, other, old_of_another_key):
        d.mkdir(parents=True)
        (d / "part-000000.npz").write_bytes(b"\0" * 8)
    day_ago = time.time() - 2 * 24 * 3600
    for d in (old, other, old_of_another_key):
        for p in (d / "part-000000.npz", d):
            os.utime(p, (day_ago, day_ago))
    cached_tokens(path, "text", tokenizer, cache)
    assert not old.exists() and not old_of_another_key.exists() and fresh.exists() and other.exists()


def test_a_build_resumed_days_later_keeps_its_parts(tmp_path, plays, tokenizer, monkeypatch):
    """The one-day rule removes other keys' killed builds, never the build about to resume."""
    cache = tmp_path / "cache"
    build = _interrupted(monkeypatch, plays, tokenizer, cache)
    three_days_ago = time.time() - 3 * 24 * 3600
    for p in [*build.iterdir(), build]:
        os.utime(p, (three_days_ago, three_days_ago))
    tokens._remove_abandoned_builds(token_cache(cache, corpus_key(plays, "text", tokenizer)))  # as cached_tokens
    seen = _tokenized(monkeypatch)
    assert _files_of(_build(plays, tokenizer, cache)) == _reference(plays, tokenizer) and seen[0] == 2


def test_a_cache_dir_inside_the_corpus_folder_is_refused(tmp_path, tokenizer):
    """Its manifest.json would be read as a corpus file by the next run."""
    path = _corpus(tmp_path, ["alpha", "beta"])
    with pytest.raises(DataError, match="lies inside the corpus folder .* set dataset.cache_dir outside"):
        cached_tokens(path.parent, "text", tokenizer, path.parent / "cache")


def test_a_damaged_cache_set_aside_first_by_another_process_is_rebuilt(tmp_path, tokenizer, monkeypatch):
    """Two nodes sharing a cache find it damaged at once: the one whose set-aside comes second
    rebuilds without an error and leaves no empty folder."""
    path, cache = _corpus(tmp_path, ["alpha beta", "gamma"]), tmp_path / "cache"
    folder = cached_tokens(path, "text", tokenizer, cache).folder
    with open(folder / "tokens.bin", "r+b") as f:
        f.truncate(4)
    rename, taken = Path.rename, tmp_path / "set-aside-by-the-other-node"

    def the_other_node_first(self, target):
        if self == folder and not taken.exists():
            rename(self, taken)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", the_other_node_first)
    tf = cached_tokens(path, "text", tokenizer, cache)
    assert tf.n_docs == 2 and [p.name for p in cache.iterdir()] == [folder.name]


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


def test_held_out_documents_are_the_documents_training_validates_on(tmp_path, tokenizer):
    """What lm-eval's corpus_ppl scores for a run (nvfp4_titan.evaluate.held_out_documents), each
    document followed by EOS, is the stream the trainer's validation windows are cut from."""
    from nvfp4_titan.data.tokens import dataset_tokens
    from nvfp4_titan.evaluate import held_out_documents
    from nvfp4_titan.training.config import load_config

    cfg = load_config(Path("recipes/debug_cpu.toml"), [f"--dataset.cache_dir={tmp_path}", "--training.seed=3"])
    docs = held_out_documents(cfg)
    stream = torch.tensor([t for d in tokenizer.encode_batch(docs) for t in (*d, tokenizer.eos_id)])
    tf = dataset_tokens(CORPUS, "text", tokenizer, cfg.dataset)
    val = windows_from_tokens(tf, 128, cfg.dataset.validation_fraction, 3, tokenizer.vocab_size).validation
    windows = val[torch.arange(len(val))].flatten()
    assert 0 < len(docs) < len(load_documents(CORPUS)) and len(stream) - len(windows) < 129
    assert torch.equal(stream[: len(windows)], windows)


def test_held_out_documents_of_a_chat_run_are_refused_with_the_way_out():
    """A chat run's held-out split is conversations: corpus_ppl says so instead of scoring the
    rows' missing text field (a DataError naming the 'text' field would point at the wrong fix)."""
    from nvfp4_titan.evaluate import held_out_documents
    from nvfp4_titan.training.config import load_config

    cfg = load_config(
        Path("recipes/debug_cpu.toml"), ["--dataset.format=chat", "--dataset.path=data/assets/chat.jsonl"]
    )
    with pytest.raises(DataError, match=r"trained on chat rows .*--metadata '\{\"data\""):
        held_out_documents(cfg)


# ---- parallel, resumable builds: parts of PART text bytes, the first PLAYS documents of the plays
PART, PLAYS = 40_000, 50


@pytest.fixture
def plays(tmp_path):
    """A jsonl of the first PLAYS bundled documents: several parts of PART bytes."""
    docs = load_documents(CORPUS)[:PLAYS]
    assert sum(len(d.encode()) for d in docs) > 5 * PART
    return _corpus(tmp_path, docs)


def _reference(path, tokenizer) -> list[bytes]:
    """The bytes of tokens.bin, offsets.npy and words.npy, computed without the cache's code: one
    encode_batch of every document, each followed by EOS."""
    docs = load_documents(path)
    ids = tokenizer.encode_batch(docs)
    arrays = (
        np.array([t for d in ids for t in (*d, tokenizer.eos_id)], dtype=np.uint32),
        np.cumsum([0] + [len(d) + 1 for d in ids], dtype=np.int64),
        np.array([len(d.split()) for d in docs], dtype=np.int64),
    )
    return [arrays[0].tobytes()] + [_npy_bytes(a) for a in arrays[1:]]


def _npy_bytes(a: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def _build(path, tokenizer, cache, num_proc=1, part_bytes=PART) -> Path:
    key = corpus_key(path, "text", tokenizer)
    out = token_cache(cache, key)
    return tokenize_corpus(path, "text", tokenizer, out, key, progress=False, num_proc=num_proc, part_bytes=part_bytes)


def _files_of(folder: Path) -> list[bytes]:
    return [(folder / f).read_bytes() for f in DATA_FILES]


@pytest.fixture(params=["tokenizer.json", "tokenizer.model"])
def any_tokenizer(request, tmp_path, tokenizer):
    """The bundled BPE, and a byte-level tiktoken tokenizer.model (the worker loads each from its file)."""
    if request.param == "tokenizer.json":
        return tokenizer
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (tmp_path / "tokenizer.model").write_text(ranks)
    return load_tokenizer(tmp_path / "tokenizer.model")


def test_every_num_proc_and_part_size_gives_the_bytes_of_one_encode_batch(tmp_path, plays, any_tokenizer):
    want = _reference(plays, any_tokenizer)
    for num_proc, part_bytes in ((1, PART), (2, PART), (2, 3 * PART), (1, PART_BYTES)):
        cache = tmp_path / f"cache-{num_proc}-{part_bytes}"
        assert _files_of(_build(plays, any_tokenizer, cache, num_proc, part_bytes)) == want, (num_proc, part_bytes)
        assert [p.name for p in cache.iterdir()] == [token_cache(cache, corpus_key(plays, "text", any_tokenizer)).name]


def _interrupted(monkeypatch, path, tokenizer, cache, part_bytes=PART) -> Path:
    """Build, killed (KeyboardInterrupt) halfway through writing the third part's file; returns
    the build folder."""
    savez, calls = np.savez, []

    def killed_at_the_third(f, **arrays):
        calls.append(f)
        if len(calls) == 3:
            f.write(b"PK\x03\x04 half a part")
            raise KeyboardInterrupt
        savez(f, **arrays)

    monkeypatch.setattr(np, "savez", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        _build(path, tokenizer, cache, part_bytes=part_bytes)
    monkeypatch.setattr(np, "savez", savez)
    folder = token_cache(cache, corpus_key(path, "text", tokenizer))
    return cache / f".{folder.name}.build"


def _tokenized(monkeypatch) -> list[int]:
    """The indices of the parts tokenized from now on (in this process: num_proc=1)."""
    write, seen = tokens._write_part, []

    def counted(build, index, *args, **kwargs):
        seen.append(index)
        write(build, index, *args, **kwargs)

    monkeypatch.setattr(tokens, "_write_part", counted)
    return seen


def test_a_killed_build_keeps_its_finished_parts_and_the_next_build_resumes_from_them(
    tmp_path, plays, tokenizer, monkeypatch
):
    cache = tmp_path / "cache"
    build = _interrupted(monkeypatch, plays, tokenizer, cache)
    assert [p.name for p in cache.iterdir()] == [build.name]  # no cache folder, whole or partial
    assert sorted(p.name for p in build.iterdir()) == ["part-000000.npz", "part-000001.npz"]
    tokens._remove_abandoned_builds(token_cache(cache, corpus_key(plays, "text", tokenizer)))  # as cached_tokens
    seen = _tokenized(monkeypatch)
    folder = _build(plays, tokenizer, cache)
    assert seen == list(range(2, seen[-1] + 1)) and len(seen) >= 3  # the parts not finished before
    assert _files_of(folder) == _reference(plays, tokenizer)
    assert [p.name for p in cache.iterdir()] == [folder.name]


@pytest.mark.parametrize("damage", ["cut_short", "byte_changed"])
def test_a_damaged_part_is_tokenized_again_not_used(tmp_path, plays, tokenizer, monkeypatch, damage):
    cache = tmp_path / "cache"
    part = _interrupted(monkeypatch, plays, tokenizer, cache) / "part-000001.npz"
    raw = bytearray(part.read_bytes())
    if damage == "cut_short":
        raw = raw[: len(raw) // 2]
    else:  # a bit flipped in the tokens: the zip CRC no longer matches
        raw[len(raw) // 2] ^= 1
    part.write_bytes(bytes(raw))
    seen = _tokenized(monkeypatch)
    folder = _build(plays, tokenizer, cache)
    assert seen[0] == 1 and 0 not in seen
    assert _files_of(folder) == _reference(plays, tokenizer)


def test_parts_of_another_part_size_are_not_used(tmp_path, tokenizer, monkeypatch):
    """A killed build cut at 100 bytes finished parts [doc 0] and [docs 1-5]; cut at 120 bytes the
    parts are [docs 0-1] and [docs 2-6]: as many documents in part 1, other ones. Nothing is reused."""
    path, cache = _corpus(tmp_path, ["a" * 100] + [f"{i:03d} " * 6 for i in range(1, 40)]), tmp_path / "cache"
    _interrupted(monkeypatch, path, tokenizer, cache, part_bytes=100)
    seen = _tokenized(monkeypatch)
    folder = _build(path, tokenizer, cache, part_bytes=120)
    assert seen == list(range(len(seen))) and len(seen) >= 3
    assert _files_of(folder) == _reference(path, tokenizer)


_BUILD_SCRIPT = """
import sys
from pathlib import Path
from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.data.tokens import corpus_key, token_cache, tokenize_corpus
if __name__ == "__main__":
    tok = load_tokenizer(sys.argv[3])
    key = corpus_key(sys.argv[1], "text", tok)
    tokenize_corpus(sys.argv[1], "text", tok, token_cache(Path(sys.argv[2]), key), key, False, 2, 32_000)
"""


def _running_build(tmp_path, tokenizer) -> tuple[subprocess.Popen, Path, list[int]]:
    """A 2-worker build in its own process group, once its first part is written: the process,
    the build folder and the processes it started (workers, multiprocessing's resource tracker)."""
    path, cache = _corpus(tmp_path, load_documents(CORPUS) * 2), tmp_path / "cache"
    (tmp_path / "build.py").write_text(_BUILD_SCRIPT)
    cmd = [sys.executable, str(tmp_path / "build.py"), str(path), str(cache), str(tokenizer.path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT at its default, as from a terminal: a suite started in the background (`cmd &` in a
    # script) hands its children SIGINT ignored, and Python then keeps ignoring it
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    build = cache / f".{token_cache(cache, corpus_key(path, 'text', tokenizer)).name}.build"
    deadline = time.time() + 60
    while not list(build.glob("part-*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = [
        int(pid) for t in Path(f"/proc/{proc.pid}/task").iterdir() for pid in (t / "children").read_text().split()
    ]
    assert proc.poll() is None and len(children) >= 2, "the build ended before it could be interrupted"
    return proc, build, children


def _kill(proc: subprocess.Popen, children: list[int]) -> None:
    """Whatever a failed test left running."""
    for pid in (proc.pid, *children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=20)


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        alive = [
            p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
        ]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_ctrl_c_twice_stops_a_parallel_build_at_once_and_keeps_its_parts(tmp_path, tokenizer):
    """Ctrl-C reaches the whole process group, twice: the build stops within seconds, no worker
    outlives it, and its finished parts stay for the next build."""
    proc, build, children = _running_build(tmp_path, tokenizer)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert _gone(children, 10), "a worker outlived the build"
        assert list(build.glob("part-*.npz"))
    finally:
        _kill(proc, children)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_workers_die_with_a_killed_build(tmp_path, tokenizer):
    """SIGKILL (the OOM killer) to the building process alone: its workers do not run on."""
    proc, _, children = _running_build(tmp_path, tokenizer)
    try:
        proc.kill()
        proc.wait(timeout=20)
        assert _gone(children, 10), "a worker outlived the build"
    finally:
        _kill(proc, children)
