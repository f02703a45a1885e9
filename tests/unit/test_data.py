"""Data: offline loading, document split, packing, seed-only global batches, resumable state."""

import json
import re

import pytest
import torch

from nvfp4_titan.data.dataset import DataError, build_windows, load_documents
from nvfp4_titan.data.loader import GlobalBatchLoader
from nvfp4_titan.data.tokenizer import TokenizerError, load_tokenizer

TOKENIZER = "data/assets/tokenizer.json"
CORPUS = "data/assets/shakespeare.jsonl"


def test_bundled_corpus_and_tokenizer():
    docs = load_documents(CORPUS)
    tok = load_tokenizer(TOKENIZER)
    assert len(docs) == 278 and tok.vocab_size == 8192 and tok.eos_id == 1
    w = build_windows(docs, tok, 64, 0.05, seed=0)
    assert w.train.shape[1] == 65 and len(w.validation) > 0
    assert (w.train == tok.eos_id).any()  # documents are separated by EOS


def test_text_parquet_and_folder_inputs(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first line\nsecond line")
    (tmp_path / "txt" / "b.txt").write_text("another document")
    assert load_documents(tmp_path / "txt") == ["first line\nsecond line", "another document"]
    import datasets

    datasets.Dataset.from_dict({"body": ["x y", "z"]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_documents(tmp_path / "d.parquet", text_field="body") == ["x y", "z"]


def test_validation_split_is_by_whole_documents():
    tok = load_tokenizer(TOKENIZER)
    docs = [f"document number {i} " * 20 for i in range(40)]
    w = build_windows(docs, tok, 16, 0.25, seed=3)
    ids = lambda t: set(re.findall(r"number (\d+)", tok._tok.decode(t.flatten().tolist())))  # noqa: E731
    val, train = ids(w.validation), ids(w.train)
    assert len(val) >= 8 and len(train) >= 25
    assert not val & train


def _global_batches(dp_size: int, steps: int, local: int) -> list[torch.Tensor]:
    windows = torch.arange(64 * 9).reshape(64, 9)
    loaders = [GlobalBatchLoader(windows, 8, local, r, dp_size, seed=5) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        parts = [torch.cat([mb.inputs for mb in ld.next()]) for ld in loaders]
        out.append(torch.cat(parts))
    return out


def test_global_batches_depend_on_seed_only_not_dp_degree():
    one = _global_batches(1, 20, 8)  # 20 batches: more than 2 epochs of 8
    for dp, local in ((2, 4), (4, 1), (8, 1)):
        assert all(torch.equal(a, b) for a, b in zip(one, _global_batches(dp, 20, local)))


def test_loader_resumes_exactly_and_checks_state():
    windows = torch.arange(40 * 5).reshape(40, 5)
    a = GlobalBatchLoader(windows, 4, 2, seed=1)
    for _ in range(7):
        a.next()
    b = GlobalBatchLoader(windows, 4, 2, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a.next(), b.next()))
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchLoader(windows, 4, 2, seed=2).load_state_dict(a.state_dict())


def test_loader_errors():
    w = torch.zeros(10, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchLoader(w, 6, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchLoader(w, 16, 4)


def test_bad_data_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nope")
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'text'.*\['body'\]"):
        load_documents(tmp_path / "x.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files"):
        load_documents(tmp_path / "empty")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin1.jsonl is not UTF-8 text.*re-encode it as UTF-8"):
        load_documents(tmp_path / "latin1.jsonl")
    (tmp_path / "txts").mkdir()  # datasets wraps the decoding error of a .txt: still named as such
    (tmp_path / "txts" / "a.txt").write_text("fine\n")
    (tmp_path / "txts" / "b.txt").write_bytes(b"bad \xff here\n")
    with pytest.raises(DataError, match="txts is not UTF-8 text"):
        load_documents(tmp_path / "txts")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(
        DataError, match=r"broken.jsonl: datasets could not read it as json \(JSON parse error: .* row 1\)"
    ):
        load_documents(tmp_path / "broken.jsonl")
    (tmp_path / "withdir").mkdir()  # a folder named like a data file is not read as one
    (tmp_path / "withdir" / "a.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "withdir" / "z.jsonl").mkdir()
    assert load_documents(tmp_path / "withdir") == ["kept"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty: no documents"):
        load_documents(tmp_path / "empty.jsonl")
    (tmp_path / "numbers.jsonl").write_text('{"text": 12345}\n{"text": 7}\n')
    with pytest.raises(DataError, match=r"field 'text' holds int values such as 12345, not text"):
        load_documents(tmp_path / "numbers.jsonl")


def test_a_folder_of_files_with_other_fields_is_one_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a b", "x": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "c d", "y": 2}\n')
    with pytest.raises(DataError, match=r"its 2 json files do not all hold the same fields .*give files of one layout"):
        load_documents(tmp_path)


def test_whitespace_only_documents_are_dropped(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": " \\n\\t "}\n{"text": ""}\n{"text": "kept"}\n')
    assert load_documents(tmp_path / "d.jsonl") == ["kept"]


def test_bad_tokenizers(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tiktoken_tokenizer_model(tmp_path):
    import base64

    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (tmp_path / "tokenizer.model").write_text(ranks)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.vocab_size == 256 + 256 and tok.eos_id == 257
    assert tok.encode_batch(["hi"]) == [[ord("h"), ord("i")]]


def test_tiktoken_runs_one_thread_where_tokenizers_parallelism_is_off(tmp_path, monkeypatch):
    """The token cache's workers set TOKENIZERS_PARALLELISM=false: one thread each, tiktoken too."""
    import base64

    (tmp_path / "tokenizer.model").write_text(f"{base64.b64encode(b'a').decode()} 0\n")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    encode, threads = tok._enc.encode_ordinary_batch, []
    monkeypatch.setattr(
        tok._enc, "encode_ordinary_batch", lambda t, num_threads: threads.append(num_threads) or encode(t)
    )
    for value in ("false", "0", "", "true"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
        assert tok.encode_batch(["aa"]) == [[0, 0]]
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    tok.encode_batch(["a"])
    assert threads == [1, 1, 1, 8, 8]


def test_plain_reader_gives_the_same_documents_without_datasets(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one\ntwo")
    with_datasets = load_documents(CORPUS), load_documents(tmp_path / "t")
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert (load_documents(CORPUS), load_documents(tmp_path / "t")) == with_datasets
