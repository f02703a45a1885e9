"""Build an offline chat / instruction dataset (jsonl) from WordNet, as a Debian package ships it; no hub.

    python scripts/prepare_chat_data.py OUT_DIR [--format chat|sharegpt|alpaca]
        [--max-conversations N] [--seed S] [--from DIR]

Fetches and unpacks ``wordnet-base`` with ``scripts.prepare_corpus.fetch`` (``apt-get download``
into a temporary folder unless ``--from DIR`` holds the .deb; ``dpkg -x``, nothing installed).
Every word of WordNet's index that occurs in its sense-tagged corpus (``tagsense_cnt > 0``: about
23,600 word / part-of-speech pairs; the untagged rest is mostly taxonomic and proper names) becomes
one conversation about it: its meanings (the glosses of its first three senses, WordNet's most
frequent first), an example sentence that uses it (the quoted examples of those glosses), synonyms
(the other words of a sense's synset), a broader term (the hypernym of its first noun or verb
sense) and an antonym (a lexical ``!`` pointer). A conversation has one to five question/answer
turns (the first names the word, follow-ups may say "it"), a system prompt in about a third of
them, and phrasings drawn from a few templates by a generator seeded with ``--seed`` and the word,
so one word's conversation does not depend on the others. Exact duplicates are dropped, the order
is shuffled with ``--seed``, and ``--max-conversations`` keeps the first N.

Writes ``OUT_DIR/<format>.jsonl`` and ``OUT_DIR/SOURCES.md`` (package, conversations, license and
the WordNet 3.0 notice, which its license asks every copy to carry). Row formats, as
LLaMA-Factory's ``AlpacaDatasetConverter`` / ``SharegptDatasetConverter`` read them
(src/llamafactory/data/converter.py; the ShareGPT keys and roles are the ``DatasetAttr`` defaults
of src/llamafactory/data/parser.py), each with a ``source`` field:

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}`` (HF / OpenAI);
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``;
- ``alpaca``: ``{"instruction", "input", "output"}``, single-turn and without system prompts; a
  chat user turn is ``instruction`` alone, or ``instruction + "\\n" + input`` when the question
  gives the word as its input, as LLaMA-Factory joins them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.prepare_corpus import fetch, write_sources  # noqa: E402

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
ARTICLES = {"n": "a", "v": "a", "a": "an", "r": "an"}
SENSES = 3  # meanings given per word: WordNet lists a word's senses most frequent first
SYNONYMS = 4
FORMATS = ("chat", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a dictionary assistant. Answer questions about English words accurately and briefly.",
    "You are an English tutor. Explain words clearly to a language learner.",
    "Answer concisely.",
)
SYSTEM_SHARE = 0.3

# (instruction, input) of a question that names the word: {tw} is the word in the sentence, {w} the
# word given as input (with its part of speech when the word has several).
ASK = {
    "define": [
        ("What does {tw} mean?", ""),
        ("Define {tw}.", ""),
        ("What is the meaning of {tw}?", ""),
        ("Define the following word.", "{w}"),
        ("Explain what this word means.", "{w}"),
    ],
    "example": [
        ("Use {tw} in a sentence.", ""),
        ("Give me an example sentence with {tw}.", ""),
        ("Write a sentence that uses this word.", "{w}"),
    ],
    "synonym": [
        ("Give me a synonym for {tw}.", ""),
        ("What is another word for {tw}?", ""),
        ("Give a synonym of the following word.", "{w}"),
    ],
    "hypernym": [("What is a more general term for {tw}?", ""), ("Name a broader term for this word.", "{w}")],
    "antonym": [("What is the opposite of {tw}?", ""), ("Give an antonym of the following word.", "{w}")],
}
FOLLOW_UP = {
    "define": ["What does it mean?", "And what does it mean exactly?"],
    "example": ["Use it in a sentence.", "Can you give me an example sentence?", "How would I use it in a sentence?"],
    "synonym": ["Give me a synonym.", "What is another word for it?", "Any synonyms?"],
    "hypernym": ["What is a more general term for it?", "What broader category does it belong to?"],
    "antonym": ["What is its opposite?", "And an antonym?"],
}
FOLLOW_UP_SHARE = 0.7  # the rest of the follow-ups name the word again


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet ``data.<pos>`` file (format: wndb(5WN), shipped in the package)."""

    words: tuple[str, ...]  # display forms: "_" -> " ", adjective markers such as "(p)" removed
    definition: str  # the gloss before its first quoted example, "" if it has none
    examples: tuple[str, ...]
    hypernyms: tuple[tuple[str, int, bool], ...]  # (pos, offset, instance hypernym "@i")
    antonyms: tuple[tuple[int, str, int, int], ...]  # (source word 1.., pos, offset, target word 1..)


@dataclass(frozen=True)
class Word:
    """A word / part of speech pair of an ``index.<pos>`` file, its synsets most frequent first."""

    lemma: str
    pos: str
    senses: tuple[int, ...]


def _word_form(raw: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", raw).replace("_", " ")


def _pointer_pos(pos: str) -> str:
    return "a" if pos == "s" else pos  # adjective satellites live in data.adj


def parse_synset(line: str) -> tuple[int, Synset]:
    """Offset and content of one ``data.<pos>`` line:
    ``offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (symbol offset pos source/target)* [frames] | gloss``
    (w_cnt and source/target are hexadecimal)."""
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    n_words = int(parts[3], 16)
    words = tuple(_word_form(parts[4 + 2 * i]) for i in range(n_words))
    at = 4 + 2 * n_words
    hypernyms, antonyms = [], []
    for i in range(int(parts[at])):
        symbol, offset, pos, source_target = parts[at + 1 + 4 * i : at + 5 + 4 * i]
        if symbol in ("@", "@i"):
            hypernyms.append((_pointer_pos(pos), int(offset), symbol == "@i"))
        elif symbol == "!":
            antonyms.append((int(source_target[:2], 16), _pointer_pos(pos), int(offset), int(source_target[2:], 16)))
    gloss = gloss.strip()
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return int(parts[0]), Synset(
        words, definition, tuple(re.findall(r'"([^"]+)"', gloss)), tuple(hypernyms), tuple(antonyms)
    )


def read_wordnet(root: Path) -> tuple[list[Word], dict[tuple[str, int], Synset]]:
    """The sense-tagged words of the four index files (in file order: nouns, verbs, adjectives,
    adverbs, each alphabetical) and every synset by (pos, byte offset)."""
    base = root / "usr/share/wordnet"
    synsets: dict[tuple[str, int], Synset] = {}
    words: list[Word] = []
    for pos, name in POS_FILES.items():
        for line in (base / f"data.{name}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  "):  # the license header lines start with two spaces
                offset, synset = parse_synset(line)
                synsets[(pos, offset)] = synset
        for line in (base / f"index.{name}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):
                continue
            # lemma pos synset_cnt p_cnt (ptr_symbol)* sense_cnt tagsense_cnt (synset_offset)*
            parts = line.split()
            tagged_at = 5 + int(parts[3])
            if int(parts[tagged_at]) > 0:
                words.append(Word(parts[0], pos, tuple(int(o) for o in parts[tagged_at + 1 :])))
    return words, synsets


def _quoted(words: list[str], conjunction: str) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {conjunction} " + q[-1]


def _sentence(text: str) -> str:
    text = text.rstrip(" ;,:")
    return text if text.endswith((".", "!", "?")) else text + "."


def _answers(word: Word, synsets: dict[tuple[str, int], Synset]) -> tuple[str, dict[str, list[str]]]:
    """The word as its first sense writes it (case kept: "Einstein") and the answers (each a list
    of phrasings) that WordNet supports for it, by turn kind; no answers without a definition."""
    senses = [synsets[(word.pos, o)] for o in word.senses]
    senses = [s for s in senses if s.definition]
    if not senses:
        return word.lemma, {}
    top = senses[:SENSES]
    lemma = word.lemma.replace("_", " ")
    w = next((f for f in top[0].words if f.lower() == lemma), lemma)
    pos = POS_NAMES[word.pos]
    if len(top) == 1:
        d = _sentence(top[0].definition)
        answers = {
            "define": [f"{w[0].upper()}{w[1:]} ({pos}): {d}", f'As {ARTICLES[word.pos]} {pos}, "{w}" means: {d}']
        }
    else:
        listed = "\n".join(f"{i}. {_sentence(s.definition)}" for i, s in enumerate(top, 1))
        some = "; the most common are" if len(senses) > len(top) else ""
        head = "The most common meanings" if some else "The meanings"
        answers = {
            "define": [
                f'As {ARTICLES[word.pos]} {pos}, "{w}" has {len(senses)} meanings{some}:\n{listed}',
                f'{head} of the {pos} "{w}" are:\n{listed}',
            ]
        }
    uses = re.compile(r"(?<![\w-])" + re.escape(w), re.IGNORECASE)
    example = next((e for s in top for e in s.examples if uses.search(e)), None)
    if example:
        answers["example"] = [f'For example: "{example}"', f'Here is a sentence that uses it: "{example}"']
    for s in top:
        others = [f for f in s.words if f.lower() != w.lower()][:SYNONYMS]
        if others:
            d = s.definition.rstrip(" ;,:.")
            is_are = "a synonym is" if len(others) == 1 else "synonyms are"
            answers["synonym"] = [
                f'In the sense "{d}", {is_are} {_quoted(others, "and")}.',
                f'When it means "{d}", you can also say {_quoted(others, "or")}.',
            ]
            break
    if top[0].hypernyms and word.pos in "nv":
        h_pos, h_offset, instance = top[0].hypernyms[0]
        h = synsets[(h_pos, h_offset)].words[0]
        if word.pos == "v":
            fact = f"to {w} is a way to {h}"
        else:
            fact = f'"{w}" is {"an instance" if instance else "a kind"} of {h}'
        answers["hypernym"] = [_sentence(fact[0].upper() + fact[1:]), f'A more general term is "{h}": {fact}.']
    for s in top:
        if w in s.words:
            source = s.words.index(w) + 1
            target = next(((p, o, t) for src, p, o, t in s.antonyms if src == source), None)
            if target:
                a = synsets[target[:2]].words[target[2] - 1]
                answers["antonym"] = [f'The opposite of "{w}" is "{a}".', f'An antonym is "{a}".']
                break
    return w, answers


def conversation(
    word: Word, synsets: dict[tuple[str, int], Synset], seed: int, ambiguous: bool, single_turn: bool
) -> dict | None:
    """One conversation about ``word``: ``{"system": str | None, "turns": [(instruction, input,
    answer)]}``, or None when WordNet gives no definition. Drawn from ``Random(f"{seed}:{pos}:{lemma}")``
    (a string seed is hashed with SHA-512: the same on every run and machine). ``ambiguous``: the word
    has several parts of speech, which the question then names."""
    lemma, answers = _answers(word, synsets)
    if not answers:
        return None
    rng = random.Random(f"{seed}:{word.pos}:{word.lemma}")
    pos = POS_NAMES[word.pos]
    tw = f'the {pos} "{lemma}"' if ambiguous else f'"{lemma}"'
    w = f"{lemma} ({pos})" if ambiguous else lemma
    kinds = list(answers)
    first = "define" if rng.random() < 0.6 or len(kinds) == 1 else rng.choice(kinds[1:])
    rest = [k for k in kinds if k != first]
    rng.shuffle(rest)
    order = [first] + rest[: 0 if single_turn else rng.randrange(len(kinds))]
    turns = []
    for i, kind in enumerate(order):
        if i and rng.random() < FOLLOW_UP_SHARE:
            instruction, given = rng.choice(FOLLOW_UP[kind]), ""
        else:
            instruction, given = rng.choice(ASK[kind])
            instruction, given = instruction.format(tw=tw), given.format(w=w)
        turns.append((instruction, given, rng.choice(answers[kind])))
    system = rng.choice(SYSTEM_PROMPTS) if not single_turn and rng.random() < SYSTEM_SHARE else None
    return {"system": system, "turns": turns}


def to_row(conv: dict, fmt: str, source: str) -> dict:
    """A conversation as a row of ``fmt`` (see the module docstring)."""
    if fmt == "alpaca":
        ((instruction, given, answer),) = conv["turns"]
        return {"instruction": instruction, "input": given, "output": answer, "source": source}
    messages = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
    for instruction, given, answer in conv["turns"]:
        messages.append({"role": "user", "content": f"{instruction}\n{given}" if given else instruction})
        messages.append({"role": "assistant", "content": answer})
    if fmt == "sharegpt":
        turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]
        return {"conversations": turns, "source": source}
    return {"messages": messages, "source": source}


def wordnet_notice(root: Path) -> str:
    """The WordNet 3.0 license text of the package's Debian copyright file (its ``License:
    WordNet3.0`` paragraph), which the license asks every copy of the data to carry."""
    text = (root / "usr/share/doc/wordnet-base/copyright").read_text(encoding="utf-8")
    body = text.split("License: WordNet3.0\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join("" if line == " ." else line.strip() for line in body.splitlines())


def build(
    wordnet: tuple[Path, str], out: Path, fmt: str = "chat", seed: int = 0, max_conversations: int | None = None
) -> int:
    """Write ``out/<fmt>.jsonl`` and ``out/SOURCES.md`` from an unpacked ``wordnet-base`` (its root
    and the package file it came from); returns the number of rows written.

    Raises ValueError for an unknown ``fmt`` or a ``max_conversations`` below 1, before writing."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if max_conversations is not None and max_conversations < 1:
        raise ValueError(f"max_conversations is {max_conversations}; give at least 1, or none for every word")
    root, origin = wordnet
    words, synsets = read_wordnet(root)
    pos_count: dict[str, int] = {}
    for word in words:
        pos_count[word.lemma] = pos_count.get(word.lemma, 0) + 1
    rows, seen = [], set()
    for word in words:
        conv = conversation(word, synsets, seed, pos_count[word.lemma] > 1, single_turn=fmt == "alpaca")
        if conv is None:
            continue
        row = to_row(conv, fmt, "wordnet")
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    random.Random(seed).shuffle(rows)
    rows = rows[:max_conversations]
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{fmt}.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    note = (
        f"Format {fmt}. One conversation per sense-tagged WordNet word and part of speech, phrased "
        f"from templates with seed {seed}; exact duplicates dropped; order shuffled with seed {seed}"
        + (f", the first {max_conversations} kept" if max_conversations else "")
        + ".\n\nThe WordNet license asks every copy to carry its notice:\n\n"
        + wordnet_notice(root)
    )
    write_sources(out, {"wordnet": wordnet}, {"wordnet": len(rows)}, "conversations", note)
    return len(rows)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} conversations: give at least 1")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=FORMATS, default="chat")
    p.add_argument("--max-conversations", type=_positive, help="keep the first N after the seeded shuffle")
    p.add_argument("--from", dest="cache", type=Path, help="folder holding the wordnet-base .deb already")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = build(fetch("wordnet", a.cache or Path(tmp), Path(tmp)), a.out, a.format, a.seed, a.max_conversations)
    path = a.out / f"{a.format}.jsonl"
    print(f"wrote {path}: {n} conversations, {path.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
