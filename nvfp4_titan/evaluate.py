"""Perplexity of a model on held-out text: any model path the project reads (a training run or
DCP step, a float Hugging Face folder, a converted NVFP4 folder), scored over strided windows so
that every target token is scored exactly once. Used by ``scripts/eval_ppl.py`` and the QAT
experiment (``scripts/qat_experiment.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from nvfp4_titan.convert import ConvertError, Source, build_model, load_nvfp4_model, resolve_source
from nvfp4_titan.data.dataset import validation_ids
from nvfp4_titan.data.tokenizer import Tokenizer
from nvfp4_titan.data.tokens import dataset_tokens
from nvfp4_titan.models.llama3 import Transformer, from_hf
from nvfp4_titan.training.config import Config
from nvfp4_titan.training.loss import cross_entropy


def load_model(path: Path) -> tuple[Transformer, Source | None]:
    """(model, source) for any supported MODEL path."""
    cfg_json = path / "config.json"
    if cfg_json.is_file() and "quantization_config" in cfg_json.read_text():
        return load_nvfp4_model(path), None
    src = resolve_source(path)
    if src.config is None:
        return from_hf(path), src
    return build_model(src, src.qat if src.config.qat.enable else None), src


def strided_windows(ids: torch.Tensor, seq_len: int, stride: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, first scored position): each target token is scored exactly once."""
    out, prev_end = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        out.append((ids[begin:end], ids[begin + 1 : end + 1], max(0, prev_end - begin)))
        prev_end = end
        if end == len(ids) - 1:
            break
    return out


@torch.no_grad()
def perplexity(
    model: Transformer,
    ids: torch.Tensor,
    n_words: int,
    seq_len: int,
    stride: int,
    batch_size: int,
    progress: bool = True,
) -> dict[str, float]:
    windows = strided_windows(ids, seq_len, stride)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        for group in _same_length(windows[i : i + batch_size]):
            x = torch.stack([w[0] for w in group])
            y = torch.stack([w[1] for w in group])
            mask = torch.stack([torch.arange(len(w[1])) >= w[2] for w in group])
            losses = cross_entropy(model(x), y, reduction="none")
            nll += losses[mask.flatten()].double().sum().item()
            count += int(mask.sum())
        if progress:
            print(
                f"\r[{min(i + batch_size, len(windows))}/{len(windows)}] token ppl {math.exp(nll / count):.4f}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    return {
        "tokens": count,
        "words": n_words,
        "nll": nll,
        "token_ppl": math.exp(nll / count),
        "word_ppl": math.exp(nll / n_words),
    }


def _same_length(group):
    lengths = {len(w[0]) for w in group}
    return [[w for w in group if len(w[0]) == n] for n in sorted(lengths)]


def held_out_tokens(
    cfg: Config | None, data: Path | None, text_field: str, tokenizer: Tokenizer
) -> tuple[torch.Tensor, int]:
    """The token ids (int64, every document followed by EOS) and word count of the documents of
    ``data``, else of the recipe ``cfg``'s validation split (its seed and fraction), read from the
    token cache (``cfg``'s ``dataset.cache_dir`` or the default), which is built if needed: the
    same tokens and split that training and the converter's calibration read.

    Raises:
        ConvertError: neither ``data`` nor a recipe. DataError: as the corpus loaders.
    """
    if data is None and cfg is None:
        raise ConvertError("give --data: this model carries no recipe naming its held-out split")
    path, field = (data, text_field) if data is not None else (cfg.dataset.path, cfg.dataset.text_field)
    tf = dataset_tokens(path, field, tokenizer, cfg.dataset if cfg else None)
    if data is not None:
        return tf.documents(np.arange(tf.n_docs))
    held_out = sorted(validation_ids(tf.n_docs, cfg.dataset.validation_fraction, cfg.training.seed))
    return tf.documents(np.asarray(held_out, dtype=np.int64))
