"""Text <-> token ids as lm-evaluation-harness's ``HFLM`` (``lm_eval/models/huggingface.py``,
0.4.13) makes them for a causal model, so that the ``nvfp4-titan`` model and ``--model hf`` on
the same tokenizer score the same tokens; the perplexity tasks count tokens with it too."""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval.models.utils import has_bos_prefix

from nvfp4_titan.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from nvfp4_titan.evaluate import tokenizer_path
from nvfp4_titan.harness.errors import TOKENIZER, in_harness_terms, recipe_path


def _bos_text(folder: Path) -> str | None:
    """The ``bos_token`` that ``tokenizer_config.json`` beside the tokenizer names (transformers'
    ``bos_token_id`` comes from there), or None."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    bos = json.loads(config.read_text(encoding="utf-8")).get("bos_token")
    return bos.get("content") if isinstance(bos, dict) else bos


class Encoder:
    """A tokenizer file or folder with lm-eval's conventions around it:

    - ``prefix_id``, the token a document or an empty context is scored after (``HFLM.prefix_token_id``):
      ``prefix_token_id`` if given, else the BOS that ``tokenizer_config.json`` names, else EOS;
    - ``encode(text)`` (``HFLM.tok_encode``): with the tokenizer's own special tokens (Llama 3's
      BOS) unless ``add_special_tokens`` says otherwise or the text starts with the prefix token's text.

    Raises:
        TokenizerError: no readable tokenizer at ``path``; a prefix token outside its vocabulary.
    """

    def __init__(self, path: str | Path, prefix_token_id: int | None = None) -> None:
        self.path = Path(path)
        self.tokenizer: Tokenizer = load_tokenizer(self.path)
        self.eot_id = self.tokenizer.eos_id
        if prefix_token_id is None:
            bos = _bos_text(self.path if self.path.is_dir() else self.path.parent)
            ids = self.tokenizer.encode(bos, add_special_tokens=False) if bos else []
            prefix_token_id = ids[0] if len(ids) == 1 else self.eot_id
        if not 0 <= prefix_token_id < self.tokenizer.vocab_size:
            raise TokenizerError(
                f"prefix_token_id={prefix_token_id} is not a token of {self.path} ({self.tokenizer.vocab_size} tokens)"
            )
        self.prefix_id = prefix_token_id
        self.prefix_text = self.tokenizer.decode([prefix_token_id], skip_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not has_bos_prefix(text, self.prefix_text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def model_encoder(path: Path, tokenizer: str | Path | None = None, prefix_token_id: int | None = None) -> Encoder:
    """The ``Encoder`` of the model at ``path`` (``nvfp4_titan.evaluate.tokenizer_path``: ``tokenizer``
    if given, else the model's own).

    Raises:
        TokenizerError: as ``Encoder``, worded with the harness's ``tokenizer`` argument; a run's
            relative ``model.tokenizer_path`` not found from here (it is relative to where the run trained).
    """
    found = tokenizer_path(path, tokenizer)
    if not tokenizer and not (path / "config.json").is_file():  # a run: its recipe names the tokenizer
        found = recipe_path(path, "model.tokenizer_path", str(found), TOKENIZER, TokenizerError)
    with in_harness_terms():
        return Encoder(found, prefix_token_id)
