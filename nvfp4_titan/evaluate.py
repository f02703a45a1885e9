"""What an evaluation reads: any model path the project reads (a training run or DCP step, a
float Hugging Face folder and its NVFP4 PTQ, a converted NVFP4 folder), its tokenizer, and a
run's held-out documents. The scoring itself is lm-evaluation-harness's, through
``nvfp4_titan.harness`` (the ``nvfp4-titan`` model and the project's offline tasks)."""

from __future__ import annotations

from pathlib import Path

import nvfp4
from nvfp4_titan.convert import ConvertError, Source, build_model, load_nvfp4_model, resolve_source
from nvfp4_titan.data.dataset import DataError, load_documents, validation_ids
from nvfp4_titan.models.llama3 import Transformer, from_hf
from nvfp4_titan.parallel.parallelize import DTYPES
from nvfp4_titan.training.config import Config

QUANT = ("none", "nvfp4-ptq")


def load_model(
    path: Path, quant: str | nvfp4.QATConfig = "none", dtype: str = "auto"
) -> tuple[Transformer, Source | None]:
    """(model on the CPU, its source) for any supported model ``path``:

    - a run or ``step-N`` folder: the model as trained (QAT included, any world size), its float
      weights cast to the run's ``training.mixed_precision_param`` as the training forward saw them;
    - a converted NVFP4 folder (``quantization_config`` in config.json): ``NVFP4Linear`` layers,
      the other tensors as stored (source None);
    - a float Hugging Face folder: in float32.

    ``quant="nvfp4-ptq"`` fake-quantizes a float model's linears (weights and inputs, dynamic
    activation scales: ``nvfp4.QATConfig()``), a ``QATConfig`` as it says (PTQ of another kind);
    ``dtype`` ("auto" as above, or a key of ``DTYPES``: "float32", "bfloat16", "float16") casts a
    run's or a float folder's weights.

    Raises:
        ConvertError: not a model, an unknown ``quant`` or ``dtype``, PTQ of a quantized model, a
            dtype asked of a converted folder (its tensors are what engines read).
    """
    if not isinstance(quant, nvfp4.QATConfig) and quant not in QUANT:
        raise ConvertError(f"quant={quant!r}: use one of {list(QUANT)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConvertError(f"dtype={dtype!r}: use auto or one of {list(DTYPES)}")
    cfg_json = path / "config.json"
    if cfg_json.is_file() and "quantization_config" in cfg_json.read_text():
        if quant != "none" or dtype != "auto":
            raise ConvertError(
                f"{path} is a converted NVFP4 checkpoint: it is evaluated as stored (quant=none, dtype=auto)"
            )
        return load_nvfp4_model(path), None
    src = resolve_source(path)
    if dtype != "auto":
        src.cast = DTYPES[dtype]
    if src.config is None:
        model = from_hf(path, src.cast or DTYPES["float32"])
    else:
        model = build_model(src, src.qat if src.config.qat.enable else None)
    if quant != "none":
        if nvfp4.qat_linears(model):
            raise ConvertError(f"{path} is already quantized (a QAT run); quant=nvfp4-ptq takes a float model")
        nvfp4.prepare(model, nvfp4.QATConfig() if quant == "nvfp4-ptq" else quant)
    return model, src


def tokenizer_path(path: Path, tokenizer: str | Path | None = None) -> Path:
    """The tokenizer file or folder of the model at ``path``: ``tokenizer`` if given, else a Hugging
    Face folder's own (float or converted), else the run's ``model.tokenizer_path`` (relative
    paths from the current directory, as training read it).

    Raises:
        ConvertError: ``path`` is neither a Hugging Face folder nor a run.
    """
    if tokenizer:
        return Path(tokenizer)
    if (path / "config.json").is_file():
        return path
    return Path(resolve_source(path).config.model.tokenizer_path)


def held_out_documents(cfg: Config) -> list[str]:
    """The documents of the recipe ``cfg``'s validation split (its ``dataset.path``,
    ``text_field``, ``validation_fraction`` and ``training.seed``), in corpus order: the
    documents training held out, as ``nvfp4_titan.data.tokens.dataset_tokens`` counts them.

    Raises:
        DataError: a run of chat, ShareGPT or alpaca rows (their held-out split is conversations,
            not documents), or as the corpus loaders.
    """
    if cfg.dataset.format != "text":
        raise DataError(
            f"the run trained on {cfg.dataset.format} rows ({cfg.dataset.path}): its held-out split is "
            "conversations, which a perplexity task does not score; give the documents to score as "
            '--metadata \'{"data": "FILE.jsonl"}\', or score the run with a chat task (--apply_chat_template)'
        )
    docs = load_documents(cfg.dataset.path, cfg.dataset.text_field)
    held_out = sorted(validation_ids(len(docs), cfg.dataset.validation_fraction, cfg.training.seed))
    return [docs[i] for i in held_out]
