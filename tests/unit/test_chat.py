"""Chat templates rendered and tokenized as transformers' apply_chat_template does; row formats;
the assistant spans the loss counts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from nvfp4_titan.data.chat import (
    ALPACA_PROMPT,
    RowError,
    load_chat_template,
    to_messages,
)
from nvfp4_titan.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "data/assets/tokenizer.json"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour, with an accent: é"},
        {"role": "assistant", "content": "Blue (bleu, in French: très bien)."},
    ],
    [
        {"role": "user", "content": "Count:\n1\n2"},
        {"role": "assistant", "content": "3\n4"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": " 5 "},
    ],
]

# Features the field's templates use (Llama 3's system extraction with |trim, header tokens,
# strftime_now, namespace and loop controls; Mistral's raise_exception on role order).
HEADER_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are helpful." %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""
ALTERNATING_TEMPLATE = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]{% else %}
{{ message['content'] + eos_token }}{% endif %}
{% endfor %}"""


def _hf_tokenizer(tokenizer_file: Path, template: str | None = None, **special: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **special)
    if template is not None:
        tok.chat_template = template
    return tok


def _hf_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _folder(tmp_path: Path, template: str, special: dict[str, str]) -> Path:
    (tmp_path / "tokenizer.json").write_bytes(BUNDLED.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": template}))
    return tmp_path


@pytest.mark.parametrize("template", ["", "plain"])  # the folder's own (HEADER_TEMPLATE), the built-in
def test_token_ids_equal_transformers_apply_chat_template(tmp_path, template):
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    folder = _folder(tmp_path, HEADER_TEMPLATE, special)
    ours = load_chat_template(folder / "tokenizer.json", template)
    ref = _hf_tokenizer(folder / "tokenizer.json", ours.template, **special)
    tok = load_tokenizer(folder)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            ids, _ = tok.encode_with_offsets(ours.render(messages, add_generation_prompt=gen))
            assert ids == _hf_ids(ref, messages, add_generation_prompt=gen)


def test_smollm2_template_and_tokenizer_give_transformers_ids(smollm2_hf):
    from transformers import AutoTokenizer

    ours = load_chat_template(smollm2_hf / "tokenizer.json")
    assert ours.source == "chat_template.jinja" and ours.special_tokens["eos_token"] == "<|im_end|>"
    ref = AutoTokenizer.from_pretrained(smollm2_hf)
    tok = load_tokenizer(smollm2_hf)
    for messages in CONVERSATIONS:
        ids, _ = tok.encode_with_offsets(ours.render(messages))
        assert ids == _hf_ids(ref, messages)
        text, spans = ours.render_with_spans(messages)
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [text[a:b] for a, b in spans] == answers


def test_assistant_spans_are_each_answer_through_its_end_of_turn_token(tmp_path):
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    ct = load_chat_template(_folder(tmp_path, HEADER_TEMPLATE, special) / "tokenizer.json")
    text, spans = ct.render_with_spans(CONVERSATIONS[1])
    assert [text[a:b] for a, b in spans] == [
        "Hello! How can I help?<|eot_id|>",
        "Blue (bleu, in French: très bien).<|eot_id|>",
    ]
    # "plain": BOS, the turns' text, EOS after each answer
    plain = load_chat_template(tmp_path / "tokenizer.json", "plain")
    text, spans = plain.render_with_spans(CONVERSATIONS[2])
    assert text == "<|begin_of_text|>Count:\n1\n23\n4<|eot_id|>and? 5 <|eot_id|>"
    assert [text[a:b] for a, b in spans] == ["3\n4<|eot_id|>", " 5 <|eot_id|>"]


def test_a_template_that_refuses_a_conversation_names_its_reason(tmp_path):
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    ct = load_chat_template(_folder(tmp_path, ALTERNATING_TEMPLATE, special) / "tokenizer.json")
    with pytest.raises(RowError, match="roles must alternate"):
        ct.render_with_spans([{"role": "assistant", "content": "x"}])
    assert ct.render_with_spans(CONVERSATIONS[0])[0] == "<s>[INST] What is 2+2? [/INST]4.</s>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # drops every assistant turn but the last, as some reasoning models' templates do
    template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ct = load_chat_template(_folder(tmp_path, template, {"eos_token": "<|end_of_text|>"}) / "tokenizer.json")
    with pytest.raises(RowError, match="turn by turn"):
        ct.render_with_spans(CONVERSATIONS[2])


def test_tiktoken_offsets_point_at_each_tokens_first_character(tmp_path):
    import base64

    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (tmp_path / "tokenizer.model").write_text(ranks)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    text = "aé<|end_of_text|>b"
    ids, starts = tok.encode_with_offsets(text)
    # byte-level: é is two tokens, both starting at character 1; the special token is one id
    assert ids == [ord("a"), 0xC3, 0xA9, tok.eos_id, ord("b")]
    assert starts == [0, 1, 1, 2, len(text) - 1]


def test_template_sources_and_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(BUNDLED.read_bytes())
    with pytest.raises(RowError, match='no chat template.*"plain"'):
        load_chat_template(tmp_path / "tokenizer.json")
    assert load_chat_template(tmp_path, "plain", eos_token="<|end_of_text|>").special_tokens == {
        "eos_token": "<|end_of_text|>"
    }
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "chat_template": [{"name": "default", "template": "D"}]})
    )
    ct = load_chat_template(tmp_path)
    assert (ct.template, ct.special_tokens) == ("D", {"eos_token": "</s>"})
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path).template == "J"  # the file first, as transformers reads it
    with pytest.raises(RowError, match="cannot read it"):
        load_chat_template(tmp_path, str(tmp_path / "missing.jinja"))
    other = load_chat_template(tmp_path, str(tmp_path / "chat_template.jinja"))
    assert other.template == "J" and other.sha256 != load_chat_template(tmp_path, "plain").sha256
    copy = pickle.loads(pickle.dumps(other))
    assert copy.render([{"role": "user", "content": "x"}]) == "J"


def test_row_formats_become_messages():
    chat = {"messages": [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a"}]}
    assert to_messages("chat", chat) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    share = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert [m["role"] for m in to_messages("sharegpt", share)] == ["system", "user", "assistant"]
    alpaca = to_messages("alpaca", {"instruction": "Sum.", "input": "1 2", "output": "3"})
    assert alpaca[0]["content"] == ALPACA_PROMPT["input"].format(instruction="Sum.", input="1 2")
    assert alpaca[0]["content"].endswith("### Input:\n1 2\n\n### Response:\n") and alpaca[1]["content"] == "3"
    assert (
        "### Input" not in to_messages("alpaca", {"instruction": "Hi.", "input": "", "output": "Hello"})[0]["content"]
    )


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("chat", {"text": "x"}, "no 'messages' list"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "empty assistant",
        ),
        ("chat", {"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ("chat", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "not text"),
        ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown ShareGPT speaker 'bot'"),
        ("alpaca", {"instruction": "q", "output": None}, "content is NoneType"),
    ],
)
def test_bad_rows_are_refused_with_the_reason(fmt, row, reason):
    with pytest.raises(RowError, match=reason):
        to_messages(fmt, row)
