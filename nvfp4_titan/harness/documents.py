"""The documents of the offline tasks (``tasks/*.yaml`` name these functions) and how the
perplexity tasks score them.

lm-eval calls a task's ``custom_dataset`` with the run's metadata: ``--model_args`` merged with
``--metadata`` (``lm_eval/config/evaluate_config.py``; ``simple_evaluate`` merges them too when it
builds the task manager), so the loaders see the model's ``path`` (``pretrained`` for ``--model
hf``), its ``tokenizer``/``prefix_token_id`` if given, and the tasks' own keys:

- ``data``: a local corpus (jsonl/json/parquet/txt, a file or a folder; ``text_field``, default
  "text"), read as training reads it (``nvfp4_titan.data.dataset.load_documents``);
- ``held_out_of``: a training run or step: its recipe's validation split (default for a run's own
  ``path`` when ``data`` is not given).

The perplexity tasks refuse a key that is neither theirs, nor an ``nvfp4-titan`` model argument,
nor lm-eval's own (a mistyped ``data`` would silently score the run's held-out split); with
another lm-eval model (``pretrained``, ``model``) its arguments cannot be told from mistakes, so
only the tasks' own keys are read.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import datasets

from nvfp4_titan.convert import ConvertError, resolve_source
from nvfp4_titan.data.dataset import DataError, load_documents
from nvfp4_titan.data.tokenizer import TokenizerError
from nvfp4_titan.evaluate import held_out_documents
from nvfp4_titan.harness.encoding import Encoder, model_encoder
from nvfp4_titan.harness.errors import DATA, HarnessError, in_harness_terms, recipe_path
from nvfp4_titan.harness.model import NVFP4TitanLM
from nvfp4_titan.training.config import Config

log = logging.getLogger("nvfp4_titan")
PLAYS = Path(__file__).resolve().parents[2] / "data" / "assets" / "shakespeare.jsonl"
NEXT_LINE = Path(__file__).parent / "tasks" / "shakespeare_next_line.jsonl"
# A speaker's tag alone on its line ("Ham.", "First Clown.", "Lady M.", "PUCK"): a speech follows.
_SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z'. ]{0,30}\.|[A-Z][A-Z' ]{1,30})$")
TASK_KEYS = ("data", "text_field", "held_out_of")
# what lm-eval adds to every task's metadata: the YAML's own metadata, config_source (tasks/_factory.py)
_LM_EVAL_KEYS = ("version", "config_source")
_MODEL_KEYS = tuple(p for p in inspect.signature(NVFP4TitanLM.__init__).parameters if p not in ("self", "unknown"))


def _split(docs: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _check_keys(metadata: dict[str, Any]) -> None:
    """Refuse what the perplexity tasks cannot mean (module docstring).

    Raises:
        HarnessError: an unknown key (nvfp4-titan's metadata), or both ``data`` and ``held_out_of``.
    """
    if not {"pretrained", "model"} & metadata.keys():
        if unknown := sorted(metadata.keys() - {*TASK_KEYS, *_LM_EVAL_KEYS, *_MODEL_KEYS}):
            raise HarnessError(
                f"unknown metadata key {', '.join(map(repr, unknown))}: the perplexity tasks take "
                f"{', '.join(TASK_KEYS)} (--metadata), besides nvfp4-titan's --model_args ({', '.join(_MODEL_KEYS)})"
            )
    if metadata.get("data") and metadata.get("held_out_of"):
        raise HarnessError("give data or held_out_of, not both")


def _encoder(metadata: dict[str, Any]) -> Encoder | None:
    """How the evaluated model tokenizes (for token perplexity), from its model arguments; None
    when they name no local model folder or run, or (another lm-eval model's) a tokenizer this
    project cannot read: token perplexity is then left out."""
    model = metadata.get("path") or metadata.get("pretrained")
    if not (metadata.get("tokenizer") or (model and Path(model).exists())):
        return None
    try:
        return model_encoder(Path(model or "."), metadata.get("tokenizer"), metadata.get("prefix_token_id"))
    except TokenizerError as e:
        if "path" in metadata:  # nvfp4-titan reads its tokenizer the same way: its own error comes first
            raise
        log.warning("token_perplexity left out: %s", e)
        return None


def _perplexity_docs(texts: list[str], metadata: dict[str, Any]) -> datasets.DatasetDict:
    """Documents with the number of tokens the model scores in each (``loglikelihood_rolling``
    scores every token of ``tok_encode(text)`` once, after the prefix token)."""
    enc = _encoder(metadata)
    return _split([{"text": t, "n_tokens": len(enc.encode(t)) if enc else None} for t in texts])


def plays(**metadata: Any) -> datasets.DatasetDict:
    """The bundled plays (``data/assets/shakespeare.jsonl``: 278 scenes), one document per scene."""
    _check_keys(metadata)
    if not PLAYS.is_file():
        raise DataError(f"{PLAYS} is missing: shakespeare_ppl reads the repository's data/assets (pip install -e)")
    return _perplexity_docs(load_documents(PLAYS), metadata)


def corpus(**metadata: Any) -> datasets.DatasetDict:
    """The documents of ``data``, else of the validation split of ``held_out_of`` (or of the
    evaluated run itself).

    Raises:
        HarnessError: as ``_check_keys``. ConvertError: neither is given, or ``held_out_of`` is not
            a training run. DataError: as the corpus loaders (worded with ``data``/``text_field``);
            a run's relative ``dataset.path`` not found from here.
    """
    _check_keys(metadata)
    if metadata.get("data"):
        with in_harness_terms():
            docs = load_documents(metadata["data"], metadata.get("text_field", "text"))
        return _perplexity_docs(docs, metadata)
    if run := metadata.get("held_out_of"):
        if (Path(run) / "config.json").is_file():
            raise ConvertError(
                f"held_out_of={run}: a Hugging Face folder (float or converted), not a training run: name the "
                "run (or step-N folder) whose held-out split to score"
            )
        try:
            recipe = resolve_source(Path(run)).config
        except ConvertError as e:
            raise ConvertError(f"held_out_of={run}: not a training run ({e})") from None
    else:
        run = metadata.get("path")
        is_run = run and Path(run).exists() and not (Path(run) / "config.json").is_file()
        recipe = resolve_source(Path(run)).config if is_run else None
        if recipe is None:
            raise ConvertError(
                f"corpus_ppl needs its documents: {run or 'the model'} is not a training run, so pass "
                '--metadata \'{"data": "corpus.jsonl"}\' (a local corpus) or \'{"held_out_of": "RUN"}\' (a '
                "training run's held-out split)"
            )
    return _perplexity_docs(_held_out(Path(run), recipe), metadata)


def _held_out(run: Path, recipe: Config) -> list[str]:
    """``held_out_documents`` of the recipe of ``run``, its relative ``dataset.path`` checked first."""
    if recipe.dataset.format == "text":  # (chat rows are refused by held_out_documents, naming them)
        recipe_path(run, "dataset.path", recipe.dataset.path, DATA, DataError)
    with in_harness_terms():
        return held_out_documents(recipe)


def perplexity_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's rolling-loglikelihood metrics of one document, counted as its wikitext task and
    ``Task.count_words``/``count_bytes`` count them (words: ``re.split(r"\\s+", text)``), and
    token perplexity over the tokens scored. Each is (log-likelihood, count), aggregated as
    ``weighted_perplexity`` = exp(-sum ll / sum count) (``bits_per_byte``: -sum ll / sum bytes / ln 2)."""
    (ll,) = results
    n_bytes = len(doc["text"].encode("utf-8"))
    out = {
        "word_perplexity": (ll, len(re.split(r"\s+", doc["text"]))),
        "byte_perplexity": (ll, n_bytes),
        "bits_per_byte": (ll, n_bytes),
    }
    if doc["n_tokens"] is not None:
        out["token_perplexity"] = (ll, doc["n_tokens"])
    return out


def next_line(**metadata: Any) -> datasets.DatasetDict:
    """The bundled next-line items (``tasks/shakespeare_next_line.jsonl``, ``next_line_items``)."""
    return _split([json.loads(line) for line in NEXT_LINE.read_text(encoding="utf-8").splitlines()])


def _speeches(scene: str) -> list[list[str]]:
    """A scene's speeches: the speaker's tag, then its lines, stripped (stage directions in
    brackets left out)."""
    out = []
    for block in scene.split("\n\n"):
        lines = [line.strip() for line in block.split("\n") if line.strip() and not line.lstrip().startswith("[")]
        if len(lines) > 1 and _SPEAKER.match(lines[0]):
            out.append(lines)
    return out


def next_line_items(scenes: list[dict[str, str]], n: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` four-way next-line questions from the plays (rows with ``text`` and ``source``): a
    speech's tag and its first k >= 2 lines, then its line k+1 (at least 20 characters) among
    three lines of 20 characters or more from other speeches of the same play; speeches, k, the
    wrong lines and the answer's place drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    plays: dict[str, list[list[str]]] = {}
    for row in scenes:
        plays.setdefault(row["source"], []).extend(_speeches(row["text"]))
    lines = {
        play: sorted({line for sp in speeches for line in sp[1:] if len(line) >= 20})
        for play, speeches in plays.items()
    }
    names = sorted(plays)
    items = []
    while len(items) < n:
        play = rng.choice(names)
        speech = rng.choice(plays[play])
        if len(speech) < 4:  # the tag and at least three lines
            continue
        k = rng.randrange(3, len(speech))  # speech[k] is the answer; speech[1:k] the lines before it
        others = [line for line in lines[play] if line not in speech]
        if len(speech[k]) < 20 or len(others) < 3:
            continue
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, speech[k])
        items.append({"play": play, "context": "\n".join(speech[:k]) + "\n", "choices": choices, "label": label})
    return items
