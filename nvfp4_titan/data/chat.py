"""Chat and instruction data: rows -> messages -> the model's chat template -> text with the
character spans of the assistant turns (what the loss counts).

Row formats (``dataset.format``), from local jsonl/json/parquet files:

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, the Hugging Face / OpenAI form.
- ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...]}``; ``from`` is mapped as
  axolotl's ShareGPT loader maps it (``human`` -> user, ``gpt`` -> assistant).
- ``alpaca``: ``{"instruction", "input", "output"}``; the user turn is the Stanford Alpaca prompt
  (``ALPACA_PROMPT``, with or without input, as torchtune's ``AlpacaToMessages`` builds it) and the
  assistant turn is ``output``.

Templates render as ``transformers``' ``apply_chat_template`` renders them (transformers 5.24,
``utils/chat_template_utils.py``: a jinja2 ``ImmutableSandboxedEnvironment`` with ``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, its ``tojson`` filter, ``raise_exception``,
``strftime_now``, and the tokenizer's special tokens as variables); the rendered text is then
tokenized whole, as ``apply_chat_template(tokenize=True)`` does, so the token ids are the same.

Loss mask (axolotl's ``chat_template`` datasets with ``roles_to_train: [assistant]`` and
``train_on_eos: turn``): an assistant turn's counted text starts where the generation prompt of
the conversation before it ends (``render(messages[:i], add_generation_prompt=True)``) and ends
after the first end-of-sequence token the template writes for that turn (the whole turn's text
when it writes none). Templates that do not render a conversation turn by turn (a turn's text
changes once later turns follow) are refused: their prompt cannot be told from the answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from nvfp4_titan.data.tokenizer import Tokenizer

ROW_FORMATS = ("chat", "sharegpt", "alpaca")  # dataset.format besides "text"
ROLES = ("system", "user", "assistant", "tool")
# axolotl prompt_strategies/sharegpt.py (its default role map), plus the chat names themselves.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
# Stanford Alpaca's train.py PROMPT_DICT (torchtune's AlpacaToMessages uses the same two prompts).
ALPACA_PROMPT = {
    "input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
# dataset.chat_template = "plain": for base models without a template. The turns' text as it is,
# BOS first and EOS after each answer (axolotl's alpaca prompt for a base model renders the same).
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class RowError(ValueError):
    """A row that cannot be trained on; the caller names its file and row number."""


def row_fields(fmt: str) -> list[str]:
    """The fields a row of format ``fmt`` is read from (``alpaca``'s ``input`` may be missing)."""
    return {"chat": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "input", "output"]}[fmt]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__} {value!r:.60}, not text")
    return value


def to_messages(fmt: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Row of format ``fmt`` (a dict of ``row_fields(fmt)``) -> messages ``[{"role", "content"}]``,
    checked: known roles, text content, no empty assistant turn, at least one assistant turn.
    Keys whose value is None are dropped (``datasets`` fills missing keys with None; transformers'
    ``_normalize_chat_messages`` drops them too).

    Raises:
        RowError: the reason, without the row's location.
    """
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT["input" if extra else "no_input"].format(
            instruction=instruction, input=_text(extra, "input")
        )
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get("output")}]
    else:
        field = row_fields(fmt)[0]
        turns = row.get(field)
        if not isinstance(turns, list) or not turns:
            raise RowError(f"no {field!r} list of turns (got {type(turns).__name__})")
        if fmt == "chat":
            messages = [{k: v for k, v in t.items() if v is not None} if isinstance(t, dict) else t for t in turns]
        else:
            messages = []
            for t in turns:
                if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
                    got = t.get("from") if isinstance(t, dict) else t
                    raise RowError(f"unknown ShareGPT speaker {got!r:.40}; use one of {sorted(SHAREGPT_ROLES)}")
                messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise RowError(f"turn {i + 1} has unknown role {got!r:.40}; roles are {list(ROLES)}")
        content = _text(m.get("content"), f"turn {i + 1}'s content")
        if m["role"] == "assistant" and not content.strip():
            raise RowError(f"turn {i + 1} is an empty assistant turn (nothing to learn); remove the row or fill it")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn: nothing in it would count in the loss")
    return messages


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile(template: str):
    """The jinja2 template, in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it to mark
        assistant text; here the turn-by-turn rendering finds it)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatTemplate:
    """A chat template with the special tokens it is rendered with.

    ``template``: jinja2 source; ``special_tokens``: ``bos_token``, ``eos_token``, ... -> their text
    (the tokenizer's ``special_tokens_map``, which transformers passes to the template);
    ``source``: where it came from, for messages. Picklable (the token cache's workers render).
    """

    def __init__(self, template: str, special_tokens: dict[str, str], source: str) -> None:
        self.template, self.special_tokens, self.source = template, dict(special_tokens), source
        self._compiled = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    @property
    def sha256(self) -> str:
        """Identifies what it renders (template and special tokens): part of the token cache's key."""
        blob = json.dumps([self.template, self.special_tokens], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation's text. Raises RowError when the template refuses it (its
        ``raise_exception``) or fails to render."""
        import jinja2

        if self._compiled is None:
            self._compiled = _compile(self.template)
        try:
            return self._compiled.render(
                messages=list(messages),
                tools=None,  # transformers passes both, so `tools is not none` reads the same
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise RowError(f"the chat template ({self.source}) does not render it: {e}") from None
        except Exception as e:  # a template reading a key or type the row lacks
            raise RowError(f"the chat template ({self.source}) failed on it ({type(e).__name__}: {e})") from None

    def render_with_spans(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """(the conversation's text, the [start, end) character spans of its assistant turns: see
        the module docstring). Raises RowError when the template cannot be split turn by turn."""
        text = self.render(messages)
        eos = self.special_tokens.get("eos_token")
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(prompt := self.render(messages[:i], add_generation_prompt=True))
            turn = self.render(messages[: i + 1])
            if not (text.startswith(prompt) and text.startswith(turn) and len(turn) > start):
                raise RowError(
                    f"the chat template ({self.source}) does not render the conversation turn by turn (turn "
                    f"{i + 1}'s text changes once later turns follow), so its prompt cannot be told from its answer; "
                    "use a template that renders each turn the same whatever follows (dataset.chat_template)"
                )
            end = len(turn)
            if eos and (k := text.find(eos, start, end)) != -1:
                end = k + len(eos)
            spans.append((start, end))
        return text, spans


def load_chat_template(
    tokenizer_path: str | Path, chat_template: str = "", eos_token: str | None = None
) -> ChatTemplate:
    """The chat template a run renders with (``dataset.chat_template``): "" takes the tokenizer's
    own, from the folder of ``tokenizer_path`` (``chat_template.jinja``, else ``chat_template.json``,
    else ``tokenizer_config.json``'s ``chat_template``, as transformers looks for it; a list of named
    templates gives its ``default``); ``"plain"`` is ``PLAIN_TEMPLATE``; anything else is a path to a
    jinja2 file. The special tokens come from ``tokenizer_config.json`` beside the tokenizer;
    ``eos_token`` (the tokenizer's EOS text) stands in when it names none.

    Raises:
        RowError: no template where one was asked for, or an unreadable template file (the
            message names the setting that fixes it).
    """
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    special: dict[str, str] = {}
    config_file = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RowError(f"{config_file} is not JSON ({e})") from None
        special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
    if eos_token is not None:
        special.setdefault("eos_token", eos_token)
    if chat_template == "plain":
        return ChatTemplate(PLAIN_TEMPLATE, special, 'dataset.chat_template = "plain"')
    if chat_template:
        path = Path(chat_template)
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), special, str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise RowError(
                f"dataset.chat_template = {chat_template!r}: cannot read it ({type(e).__name__}); name a jinja2 "
                'file, "plain" (base models), or "" for the tokenizer\'s own template'
            ) from None
    if (folder / "chat_template.jinja").is_file():
        return ChatTemplate(
            (folder / "chat_template.jinja").read_text(encoding="utf-8"), special, "chat_template.jinja"
        )
    found = None
    if (folder / "chat_template.json").is_file():
        found = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    found = found or config.get("chat_template")
    if isinstance(found, list):  # [{"name": ..., "template": ...}]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(found, str) and found:
        return ChatTemplate(found, special, f"{folder.name}'s chat template")
    raise RowError(
        f"the tokenizer in {folder} has no chat template ({', '.join(TEMPLATE_FILES)}): chat data needs one. "
        'Set dataset.chat_template to a jinja2 file, or to "plain" for a base model (turns as they are, EOS '
        "after each answer)"
    )


@dataclass(frozen=True)
class ChatFormat:
    """How the rows of a chat-type corpus become training tokens: their format (``chat``,
    ``sharegpt``, ``alpaca``) and the template that renders them. Picklable (cache workers)."""

    name: str
    template: ChatTemplate

    def encode(self, row: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], np.ndarray, int]:
        """One row -> (token ids of the rendered conversation, their assistant mask uint8 [n]:
        1 where a token starts inside an assistant span, the words of its assistant turns).

        Raises:
            RowError: the row or its rendering cannot be trained on (the reason).
        """
        messages = to_messages(self.name, row)
        text, spans = self.template.render_with_spans(messages)
        ids, starts = tokenizer.encode_with_offsets(text)
        starts_a = np.asarray(starts, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask[(starts_a >= a) & (starts_a < b)] = 1
        if not mask.any():
            raise RowError("its assistant turns hold no token once tokenized")
        words = sum(len(m["content"].split()) for m in messages if m["role"] == "assistant")
        return ids, mask, words
