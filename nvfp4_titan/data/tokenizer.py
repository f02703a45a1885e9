"""Tokenizers: a Hugging Face ``tokenizer.json`` or a Llama 3 tiktoken ``tokenizer.model``."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Protocol

import numpy as np

EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|eot_id|>")

# Llama 3's pre-tokenizer split (llama-models, llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256


class Tokenizer(Protocol):
    path: Path  # the tokenizer file (its bytes identify token caches)
    vocab_size: int
    eos_id: int
    eos_token: str  # its text, as chat templates write it

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names it."""


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        self.path = path
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        eos = next((i for i in ids if i is not None), None)
        if eos is None:
            raise TokenizerError(f"{path}: none of the EOS tokens {EOS_CANDIDATES} is in the vocabulary")
        self.eos_id = eos
        self.eos_token = self._tok.id_to_token(eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character index where each token starts) of a rendered chat: special tokens
        written in the text are recognized, as transformers tokenizes ``apply_chat_template``'s
        text (``add_special_tokens=False``)."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, [start for start, _ in e.offsets]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """``text``'s ids as transformers' ``tokenizer.encode(text, add_special_tokens=...)`` gives
        them: special tokens written in it recognized; with ``add_special_tokens`` also those the
        tokenizer.json's post-processor adds (Llama 3's ``<|begin_of_text|>``)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class TiktokenTokenizer:
    """Llama 3 ``tokenizer.model``: base64 BPE ranks plus 256 special tokens after them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(f"{path}: reading a tiktoken tokenizer.model needs `pip install tiktoken`") from None
        ranks = {}
        try:
            for line in path.read_text().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}: not a tiktoken BPE file ({e})") from None
        n = len(ranks)
        special = ["<|begin_of_text|>", "<|end_of_text|>"] + [
            f"<|reserved_special_token_{i}|>" for i in range(LLAMA3_NUM_SPECIAL - 2)
        ]
        self._enc = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={t: n + i for i, t in enumerate(special)},
        )
        self.vocab_size = n + LLAMA3_NUM_SPECIAL
        self.eos_id = n + 1
        self.eos_token = special[1]
        self._bos_id = n

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # TOKENIZERS_PARALLELISM is the Hugging Face tokenizers' switch (token cache workers set it
        # false, one thread each); tiktoken would start 8 threads per call regardless
        off = os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() in ("", "0", "false", "f", "no", "n", "off")
        return self._enc.encode_ordinary_batch(texts, num_threads=1 if off else 8)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character index where each token starts) of a rendered chat, its special
        tokens (``<|begin_of_text|>``, ``<|eot_id|>``...) recognized as transformers does."""
        ids = self._enc.encode(text, allowed_special="all")
        byte_starts = np.cumsum([0] + [len(self._enc.decode_single_token_bytes(i)) for i in ids[:-1]])
        char_ends = np.cumsum([len(c.encode()) for c in text])  # byte offset after each character
        return ids, np.searchsorted(char_ends, byte_starts, side="right").tolist()

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """As ``HFTokenizer.encode``; the special token added is ``<|begin_of_text|>``, as the
        post-processor of Llama 3's tokenizer.json (transformers' conversion of this file) adds it."""
        ids = self._enc.encode(text, allowed_special="all")
        return [self._bos_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self.vocab_size - LLAMA3_NUM_SPECIAL]
        return self._enc.decode(ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """``tokenizer.json`` (HF) or ``tokenizer.model`` (tiktoken), or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).is_file()]
        if not found:
            raise TokenizerError(f"{p}: holds neither tokenizer.json nor tokenizer.model")
        p = found[0]
    if not p.is_file():
        raise TokenizerError(f"tokenizer {p} does not exist; set model.tokenizer_path")
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".model":
        return TiktokenTokenizer(p)
    raise TokenizerError(f"{p}: unknown tokenizer format; use tokenizer.json or a tiktoken tokenizer.model")
