"""Input amaxes for checkpoints trained with dynamic activation scales: the model in memory with
static QAT linears, run over held-out windows of the recipe's (or a given) corpus."""

from __future__ import annotations

from pathlib import Path

import torch

import nvfp4
from nvfp4_titan.convert.source import ConvertError, Source, build_model, tokenizer_dir
from nvfp4_titan.data.packing import Batch


def _calibration_windows(src: Source, data: Path | None, seq_len: int | None, count: int) -> Batch:
    """The first ``count`` held-out windows of the recipe's corpus (or ``data``), read from the
    token cache that training reads, packed as training packs them (chat examples with their
    segments)."""
    from nvfp4_titan.data.dataset import DataError
    from nvfp4_titan.data.tokenizer import TokenizerError, load_tokenizer
    from nvfp4_titan.data.tokens import dataset_tokens, windows_from_tokens

    cfg = src.config
    if data is None and cfg is None:
        raise ConvertError("a Hugging Face source has no recipe: give --calibration-data (or --calibration-batches 0)")
    try:  # the loaders' messages name recipe keys; the converter's options are the fix here
        tok = load_tokenizer(tokenizer_dir(src) if src.config is None else src.tokenizer)
        field = cfg.dataset.text_field if cfg else "text"
        tokens = dataset_tokens(data or cfg.dataset.path, field, tok, cfg.dataset if cfg else None)
    except TokenizerError as e:
        raise ConvertError(
            f"calibration: {str(e).removesuffix('; set model.tokenizer_path')}; pass --tokenizer PATH "
            "(relative paths in the run's config are taken from the current directory)"
        ) from None
    except DataError as e:
        raise ConvertError(
            f"calibration: {str(e).split('; set dataset.path')[0]}; pass --calibration-data PATH, "
            "or --calibration-batches 0 to export no input_scale"
        ) from None
    if tok.vocab_size > src.args.vocab_size:  # its ids would index past the embedding
        raise ConvertError(
            f"calibration: the tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model's vocab_size "
            f"{src.args.vocab_size}: pass the model's own with --tokenizer"
        )
    seq = seq_len or (cfg.training.seq_len if cfg else 2048)
    split, seed = (cfg.dataset.validation_fraction, cfg.training.seed) if cfg else (0.05, 0)
    d = cfg.dataset if cfg else None
    w = windows_from_tokens(tokens, seq, split, seed, tok.vocab_size, long_examples=d.long_examples if d else "drop")
    windows = w.validation if len(w.validation) else w.train
    return windows.batch(torch.arange(min(count, len(windows))))


def calibrated_input_amax(
    src: Source, n_batches: int, batch_size: int, data: Path | None, seq_len: int | None
) -> dict[str, torch.Tensor]:
    """Input amaxes of every QAT linear over ``n_batches`` held-out batches (the model in memory)."""
    model = build_model(src, nvfp4.QATConfig(**{**src.qat.__dict__, "activation_scale": "static"}))
    windows = _calibration_windows(src, data, seq_len, n_batches * batch_size)
    nvfp4.calibrate(model, [(mb.inputs, mb.segments) for mb in windows.split(batch_size)])
    return {n: m.input_amax for n, m in model.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}
