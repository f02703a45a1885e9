"""Bad input to the harness, named in the harness's own terms.

The loaders the harness shares with training (corpus, tokenizer, chat template) name the recipe
key that fixes their errors (``set dataset.path``); in the harness the fix is one of its
arguments: the model's ``--model_args`` or the tasks' ``--metadata`` keys. ``scripts/eval_ppl.py``
words these again as its flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nvfp4_titan.convert import ConvertError
from nvfp4_titan.data.chat import RowError
from nvfp4_titan.data.dataset import DataError
from nvfp4_titan.data.tokenizer import TokenizerError
from nvfp4_titan.models.llama3.hf import CheckpointError

DATA = '--metadata \'{"data": "PATH"}\''
TEXT_FIELD = '--metadata \'{"text_field": "NAME"}\''
TOKENIZER = "--model_args tokenizer=PATH"
CHAT_TEMPLATE = "--model_args chat_template=PATH"

# What the loaders advise (their recipe keys) -> the harness argument that does it.
_ARGUMENT_FOR_KEY = {
    "set dataset.path to a local file or folder": f"name a local file or folder with {DATA}",
    "set dataset.text_field to the field that holds the text": f"name the field that holds the text with {TEXT_FIELD}",
    "(set dataset.text_field)": f"(name the field with {TEXT_FIELD})",
    "set model.tokenizer_path": f"pass {TOKENIZER}",
}


class HarnessError(ValueError):
    """Input the harness does not take: a model argument, a task's metadata key or a generation
    setting; the message names it and the fix."""


# The project's errors for bad input that the harness raises: nvfp4-lm-eval prints them as one line.
BAD_INPUT = (HarnessError, ConvertError, DataError, TokenizerError, RowError, CheckpointError)


@contextmanager
def in_harness_terms() -> Iterator[None]:
    """Re-raise a loader's DataError or TokenizerError (same type) with the recipe keys it names
    replaced by the harness's arguments."""
    try:
        yield
    except (DataError, TokenizerError) as e:
        message = str(e)
        for key, argument in _ARGUMENT_FOR_KEY.items():
            message = message.replace(key, argument)
        raise type(e)(message) from None


def recipe_path(run: Path, key: str, value: str, argument: str, error: type[ValueError]) -> Path:
    """The path ``value`` that the recipe of ``run`` sets as ``key``, as training read it (a
    relative one from the directory the run was trained in).

    Raises:
        error: a relative path that does not exist from the current directory: the message says
            so and names ``argument`` (the harness argument that gives the path instead).
    """
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        raise error(
            f"{run}'s recipe sets {key} = {value!r}, relative to the directory the run was trained in, and "
            f"there is no {path} in {Path.cwd()}: run from that directory, or pass {argument}"
        )
    return path
