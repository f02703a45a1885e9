"""prepare_chat_data: conversations from a miniature wordnet-base package tree, in the three row
formats; seeded determinism; duplicates dropped; the bundled data/assets/chat.jsonl."""

import json
from pathlib import Path

import pytest

from scripts.prepare_chat_data import build

ASSET = Path(__file__).resolve().parents[2] / "data/assets/chat.jsonl"
HEADER = "  1 This software and database is being provided to you\n"
# wndb(5WN) lines: offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (ptr offset pos src/tgt)* [frames] | gloss
DATA = {
    "noun": [
        "00000100 17 n 02 bank 0 riverbank 0 001 @ 00000200 n 0000 | sloping land beside a body of water; "
        '"they pulled the canoe up on the bank"',
        "00000200 17 n 01 slope 0 000 | an elevated geological formation",
    ],
    "verb": [
        '00000500 29 v 01 bank 0 001 @ 00000600 v 0000 01 + 02 00 | do business with a bank; "Where do you bank?"',
        "00000600 29 v 01 transact 0 000 | conduct business",
    ],
    "adj": [
        '00000300 00 a 01 happy 0 001 ! 00000400 a 0101 | enjoying well-being; "a happy smile"',
        "00000400 00 a 01 unhappy 0 001 ! 00000300 a 0101 | not happy",
    ],
    "adv": [],
}
# lemma pos synset_cnt p_cnt (ptr)* sense_cnt tagsense_cnt (offset)*; riverbank is untagged (left out),
# happy is listed twice: the same conversation twice, an exact duplicate
INDEX = {
    "noun": ["bank n 1 1 @ 1 1 00000100", "riverbank n 1 1 @ 1 0 00000100", "slope n 1 0 1 1 00000200"],
    "verb": ["bank v 1 1 @ 1 1 00000500", "transact v 1 0 1 1 00000600"],
    "adj": ["happy a 1 1 ! 1 1 00000300", "happy a 1 1 ! 1 1 00000300", "unhappy a 1 1 ! 1 1 00000400"],
    "adv": [],
}
WORDS = 6  # bank (noun), slope, bank (verb), transact, happy, unhappy
NOTICE = "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved."


def _wordnet(tmp: Path) -> tuple[Path, str]:
    w = tmp / "wordnet/usr/share/wordnet"
    w.mkdir(parents=True)
    for name in DATA:
        (w / f"data.{name}").write_text(HEADER + "".join(line + "  \n" for line in DATA[name]))
        (w / f"index.{name}").write_text(HEADER + "".join(line + "  \n" for line in INDEX[name]))
    d = tmp / "wordnet/usr/share/doc/wordnet-base"
    d.mkdir(parents=True)
    (d / "copyright").write_text(
        "Files: *\nLicense: WordNet3.0\n This software and database is provided.\n .\n"
        f" {NOTICE}\n\nFiles: debian/*\nLicense: GPL-2+\n"
    )
    return tmp / "wordnet", "wordnet-base_3.0.deb"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_turns(turns: list[dict], role: str, text: str, names: tuple[str, str, str]) -> None:
    """An optional system turn, then user/assistant pairs (at least one), every text non-empty."""
    system, user, assistant = names
    assert all(set(t) == {role, text} and isinstance(t[text], str) and t[text].strip() for t in turns), turns
    roles = [t[role] for t in turns]
    if roles[0] == system:
        roles = roles[1:]
    assert roles and roles == [user, assistant] * (len(roles) // 2), roles


def check_row(row: dict, fmt: str) -> None:
    """The row shape the trainer reads for ``fmt`` (issue 39: HF messages, ShareGPT, alpaca)."""
    assert row["source"] == "wordnet"
    if fmt == "chat":
        assert set(row) == {"messages", "source"}
        _check_turns(row["messages"], "role", "content", ("system", "user", "assistant"))
    elif fmt == "sharegpt":
        assert set(row) == {"conversations", "source"}
        _check_turns(row["conversations"], "from", "value", ("system", "human", "gpt"))
    else:
        assert set(row) == {"instruction", "input", "output", "source"}
        assert row["instruction"].strip() and row["output"].strip() and isinstance(row["input"], str)


@pytest.mark.parametrize("fmt", ["chat", "sharegpt", "alpaca"])
def test_row_formats(tmp_path, fmt):
    wordnet = _wordnet(tmp_path)
    assert build(wordnet, tmp_path / "out", fmt) == WORDS
    rows = _rows(tmp_path / "out" / f"{fmt}.jsonl")
    assert len(rows) == WORDS
    for row in rows:
        check_row(row, fmt)
    sources = (tmp_path / "out" / "SOURCES.md").read_text()
    assert f"| wordnet | wordnet-base_3.0.deb | {WORDS} |" in sources and NOTICE in sources


def _texts(row: dict) -> tuple[str, list[str]]:
    """(the first question, every answer) of a chat row."""
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    return users[0], [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def test_answers_come_from_the_words_own_synsets(tmp_path):
    """Over 30 seeds, every fact of the fixture is asked about and answered from its own synset:
    the noun and the verb "bank" are named as such and never get each other's answers."""
    wordnet = _wordnet(tmp_path)
    words = [("bank", "noun"), ("bank", "verb"), ("slope",), ("transact",), ("unhappy",), ("happy",)]
    answers: dict[tuple[str, ...], str] = {}
    for seed in range(30):
        build(wordnet, tmp_path / str(seed), "chat", seed)
        for row in _rows(tmp_path / str(seed) / "chat.jsonl"):
            question, said = _texts(row)
            word = next(w for w in words if all(part in question for part in w))
            answers[word] = answers.get(word, "") + "\n".join(said)
    noun, verb = answers[("bank", "noun")], answers[("bank", "verb")]
    for fact in ("sloping land beside a body of water", '"riverbank"', "a kind of slope", "they pulled the canoe"):
        assert fact in noun and fact not in verb
    for fact in ("do business with a bank", "o bank is a way to transact", "Where do you bank?"):
        assert fact in verb and fact not in noun
    assert '"unhappy"' in answers[("happy",)] and '"a happy smile"' in answers[("happy",)]
    assert '"happy"' in answers[("unhappy",)] and "conduct business" in answers[("transact",)]


def test_seeded_determinism(tmp_path):
    wordnet = _wordnet(tmp_path)
    build(wordnet, tmp_path / "a", seed=3)
    build(wordnet, tmp_path / "b", seed=3)
    build(wordnet, tmp_path / "c", seed=4)
    build(wordnet, tmp_path / "d", seed=3, max_conversations=2)
    a = (tmp_path / "a" / "chat.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "chat.jsonl").read_bytes()
    assert a != (tmp_path / "c" / "chat.jsonl").read_bytes()
    assert _rows(tmp_path / "d" / "chat.jsonl") == _rows(tmp_path / "a" / "chat.jsonl")[:2]


def test_exact_duplicates_dropped(tmp_path):
    """ "happy" is listed twice in index.adj: its conversation is written once."""
    build(_wordnet(tmp_path), tmp_path / "out")
    rows = _rows(tmp_path / "out" / "chat.jsonl")
    assert sum('"happy"' in _texts(r)[0] or "\nhappy" in _texts(r)[0] for r in rows) == 1
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows) == WORDS


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"fmt": "xml"}, "not one of"), ({"max_conversations": 0}, "at least 1")]
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(_wordnet(tmp_path), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bundled_chat_asset_is_valid():
    """data/assets/chat.jsonl (what CPU defaults and tests train on): every row a valid chat row,
    no duplicates, a few thousand conversations in about a megabyte."""
    rows = _rows(ASSET)
    for row in rows:
        check_row(row, "chat")
    assert 2000 <= len(rows) <= 5000 and 0.5e6 <= ASSET.stat().st_size <= 1.5e6
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    assert any(len(r["messages"]) > 3 for r in rows) and any(r["messages"][0]["role"] == "system" for r in rows)
