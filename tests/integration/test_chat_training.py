"""train.py on chat data: the bundled conversations rendered with a template, packed whole, the
loss on the answers; exact resume; bad rows and templates named before anything is written; a
global batch with no counted label is skipped, not a NaN."""

import json
import shutil

import pytest

from tests.integration.helpers import FAST, ROOT, losses, metrics, train

CHAT = [
    "--dataset.format=chat",
    "--dataset.path=data/assets/chat.jsonl",
    "--dataset.chat_template=plain",
    "--training.seq_len=128",
    "--metrics.log_freq=1",
]


def test_chat_data_trains_on_the_answers_and_resumes_exactly(tmp_path):
    dump = tmp_path / "run"
    common = [*FAST, *CHAT, "--checkpoint.interval=3", "--validation.freq=6", "--validation.steps=1"]
    r = train(dump, *common, "--training.steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chat examples packed into windows of 129 tokens" in r.stdout and "dropped" in r.stdout
    loss = losses(dump)
    assert loss[6] < loss[1] - 0.5, loss
    assert any("validation/loss" in m for m in metrics(dump))
    resumed = tmp_path / "resumed"
    shutil.copytree(dump, resumed)
    shutil.rmtree(resumed / "checkpoint" / "step-6")
    (resumed / "metrics.jsonl").unlink()
    r = train(resumed, *common, "--training.steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {s: losses(resumed)[s] for s in (4, 5, 6)} == {s: loss[s] for s in (4, 5, 6)}


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("unknown_role", "bad.jsonl row 2: turn 1 has unknown role 'bot'"),
        ("no_field", "bad.jsonl: none of the fields ['messages']; its fields are ['text']"),
        ("no_template", "has no chat template"),
        ("template_refuses", "bad.jsonl row 1: the chat template (" + "{t}) does not render it: no system prompts"),
    ],
)
def test_bad_chat_input_is_named_and_nothing_is_written(tmp_path, case, said):
    rows = {
        "unknown_role": [GOOD, {"messages": [{"role": "bot", "content": "x"}]}],
        "no_field": [{"text": "plain text"}],
    }.get(case, [GOOD])
    corpus = _rows(tmp_path / "bad.jsonl", rows)
    extra = [f"--dataset.path={corpus}"]
    if case == "no_template":
        extra.append("--dataset.chat_template=")
    if case == "template_refuses":
        template = tmp_path / "t.jinja"
        template.write_text(
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('no system prompts') }}{% endif %}"
        )
        extra.append(f"--dataset.chat_template={template}")
        said = said.format(t=template)
    dump = tmp_path / "run"
    r = train(dump, *FAST, *CHAT, *extra, f"--dataset.cache_dir={tmp_path / 'cache'}", "--training.steps=2")
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not dump.exists() and not any((tmp_path / "cache").glob("*tokens-*"))


def test_a_global_batch_without_a_counted_label_is_skipped_and_counted(tmp_path):
    """Prompts longer than the window, truncated: no answer token is left to count."""
    long = {
        "messages": [
            {"role": "user", "content": " ".join(f"word{i}" for i in range(60))},
            {"role": "assistant", "content": "short"},
        ]
    }
    corpus = _rows(tmp_path / "long.jsonl", [long] * 40)
    dump = tmp_path / "run"
    r = train(
        dump,
        *FAST,
        *CHAT,
        f"--dataset.path={corpus}",
        "--dataset.long_examples=truncate",
        "--training.seq_len=32",
        "--training.epochs=0.2",  # 38 training windows of one example each, 4 a step: 2 steps
        "--validation.freq=1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0.2 epoch(s) of 38 windows: training.steps = 2" in r.stdout
    assert r.stdout.count("no label of the global batch counts in the loss") == 2
    rows = [m for m in metrics(dump) if "lr" in m]
    assert [m["skipped_steps"] for m in rows] == [1, 2] and not any("loss" in m for m in metrics(dump))
    assert "40 truncated" in r.stdout


def test_the_bundled_chat_data_renders_with_smollm2s_template(smollm2_hf, tmp_path):
    """SmolLM2-135M-Instruct's own template (its chat_template.jinja) over the bundled data: every
    row renders, and the cache's counted tokens are exactly the answers with their <|im_end|>."""
    from nvfp4_titan.data.tokenizer import load_tokenizer
    from nvfp4_titan.data.tokens import chat_format, dataset_tokens
    from nvfp4_titan.training.config import load_config

    cfg = load_config(ROOT / "recipes/smollm2_135m_qad_chat.toml", [f"--dataset.cache_dir={tmp_path}"])
    tok = load_tokenizer(smollm2_hf)
    assert chat_format(cfg.dataset, tok).template.source == "chat_template.jinja"
    tf = dataset_tokens(ROOT / "data/assets/chat.jsonl", "text", tok, cfg.dataset)
    rows = [json.loads(line) for line in (ROOT / "data/assets/chat.jsonl").read_text().splitlines()]
    assert tf.n_docs == len(rows)
    for d in (0, 1, len(rows) - 1):
        ids = tf.tokens[tf.offsets[d] : tf.offsets[d + 1]]
        counted = tok._tok.decode(
            ids[tf.mask[tf.offsets[d] : tf.offsets[d + 1]] == 1].tolist(), skip_special_tokens=False
        )
        answers = [m["content"] + "<|im_end|>" for m in rows[d]["messages"] if m["role"] == "assistant"]
        assert counted == "".join(answers)
