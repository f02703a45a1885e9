"""Chat examples packed whole into windows: positions restart, attention never crosses an example,
only assistant tokens count; the token cache stores the mask; the loss over a packed, masked
batch is the reference computation's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nvfp4
from nvfp4_titan.data.chat import ChatFormat, load_chat_template
from nvfp4_titan.data.dataset import DataError
from nvfp4_titan.data.packing import IGNORE, Batch, ExampleWindows
from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.data.tokens import MASK_FILE, cached_tokens, windows_from_tokens
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.models.llama3.model import packed_positions_and_mask
from nvfp4_titan.training.distill import distillation_loss
from nvfp4_titan.training.loss import cross_entropy

ROOT = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for m in messages %}{{ '<|begin_of_text|>' + m['role'] + '\\n' + m['content'] + '<|end_of_text|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|begin_of_text|>assistant\\n' }}{% endif %}"
)
ARGS = FLAVORS["debug"].with_(n_layers=2)


def _conversation(i: int) -> dict:
    turns = [{"role": "user", "content": f"question {i} " + "word " * (i % 7)}]
    turns.append({"role": "assistant", "content": f"answer {i} " + "yes " * (i % 5 + 1)})
    if i % 3 == 0:
        turns = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "more?"}]
        turns.append({"role": "assistant", "content": "no " * (i % 4 + 1)})
    return {"messages": turns}


@pytest.fixture
def chat_corpus(tmp_path):
    """40 conversations, a tokenizer folder with a ChatML-style template (the bundled BPE)."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(ROOT / "data/assets/tokenizer.json", tok_dir / "tokenizer.json")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|end_of_text|>", "chat_template": CHATML})
    )
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(40)))
    tok = load_tokenizer(tok_dir)
    return corpus, tok, ChatFormat("chat", load_chat_template(tok_dir))


def _cache(corpus, tok, fmt, tmp_path, num_proc=1):
    return cached_tokens(corpus, "text", tok, tmp_path / "cache", progress=False, num_proc=num_proc, chat=fmt)


def test_positions_restart_and_attention_stays_inside_each_example():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    pos, mask = packed_positions_and_mask(seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], want)


@pytest.mark.parametrize("qat", [None, "static"])
def test_a_packed_window_gives_each_example_its_logits_alone(qat):
    """Float, and QAT with a static input scale (a dynamic one is the whole micro-batch's amax,
    as in an engine's batch: docs/data.md)."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(3)
    lengths = [5, 9, 3, 12]
    examples = [torch.randint(0, ARGS.vocab_size, (1, n)) for n in lengths]
    tokens = torch.cat(examples, dim=1)
    segments = torch.cat([torch.full((1, n), k) for k, n in enumerate(lengths)], dim=1)
    if qat:
        nvfp4.prepare(model, nvfp4.QATConfig(activation_scale=qat))
        nvfp4.calibrate(model, [(tokens, segments)])
    with torch.no_grad():
        packed = model(tokens, segments)
        alone = torch.cat([model(e) for e in examples], dim=1)
        crossed = model(tokens)  # one causal sequence: later examples see earlier ones
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossed[:, lengths[0] :], alone[:, lengths[0] :], atol=1e-3)


def test_rotary_positions_restart_at_each_example():
    """RoPE is relative, so logits hardly tell a restart from an offset: the tables each
    attention layer receives are checked against the positions each example has alone."""
    from nvfp4_titan.models.llama3.rope import rope_tables

    model = Transformer(ARGS)
    model.init_weights(0)
    seen = []
    model.layers[1].attention.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    with torch.no_grad():
        model(torch.zeros(2, 8, dtype=torch.long), segments)
    cos, _ = rope_tables(ARGS, 8, torch.device("cpu"))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 1]])
    assert torch.equal(seen[0], cos[positions])


def test_the_cache_stores_each_conversation_and_its_assistant_mask(chat_corpus, tmp_path):
    corpus, tok, fmt = chat_corpus
    tf = _cache(corpus, tok, fmt, tmp_path)
    assert tf.n_docs == 40 and tf.mask is not None and (tf.folder / MASK_FILE).is_file()
    assert set(tf.manifest["sha256"]) == {"tokens.bin", "offsets.npy", "words.npy", MASK_FILE}
    for d in (0, 1, 3):
        ids, mask, words = fmt.encode(_conversation(d), tok)
        start, end = tf.offsets[d], tf.offsets[d + 1]
        assert tf.tokens[start:end].tolist() == ids and tf.mask[start:end].tolist() == mask.tolist()
        counted = tok._tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        answers = [m["content"] + "<|end_of_text|>" for m in _conversation(d)["messages"] if m["role"] == "assistant"]
        assert counted.replace(" ", "") == "".join(answers).replace(" ", "")
        assert int(tf.words[d]) == words
    # two workers give the same bytes; another template is another cache
    other = cached_tokens(corpus, "text", tok, tmp_path / "cache2", progress=False, num_proc=2, chat=fmt)
    for name in ("tokens.bin", "offsets.npy", MASK_FILE):
        assert (other.folder / name).read_bytes() == (tf.folder / name).read_bytes()
    plain = ChatFormat("chat", load_chat_template(tok.path, "plain"))
    assert _cache(corpus, tok, plain, tmp_path).folder != tf.folder


def test_a_changed_mask_is_found_and_rebuilt(chat_corpus, tmp_path):
    corpus, tok, fmt = chat_corpus
    tf = _cache(corpus, tok, fmt, tmp_path)
    folder, good = tf.folder, (tf.folder / MASK_FILE).read_bytes()
    del tf
    flipped = bytearray(good)
    flipped[5] ^= 1
    (folder / MASK_FILE).write_bytes(bytes(flipped))
    assert (_cache(corpus, tok, fmt, tmp_path).folder / MASK_FILE).read_bytes() == good


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "no messages"}, "none of the fields \\['messages'\\]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "row 3: turn 1 has unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "row 3: turn 2 is an empty",
        ),
    ],
)
def test_a_bad_row_is_named_and_nothing_is_written(chat_corpus, tmp_path, row, reason):
    corpus, tok, fmt = chat_corpus
    bad = tmp_path / "bad.jsonl"
    rows = [_conversation(0), _conversation(1), row] if "messages" in row else [row]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=reason):
        _cache(bad, tok, fmt, tmp_path)
    assert not any((tmp_path / "cache").glob("tokens-*")) and not any((tmp_path / "cache").glob(".tokens-*"))


def test_examples_are_packed_whole_in_order_and_long_ones_dropped_or_truncated(chat_corpus, tmp_path):
    corpus, tok, fmt = chat_corpus
    tf = _cache(corpus, tok, fmt, tmp_path)
    lengths = np.diff(tf.offsets)
    seq = int(np.percentile(lengths, 80))  # some examples do not fit a window of seq + 1
    too_long = int((lengths > seq + 1).sum())
    assert too_long > 0
    w = ExampleWindows(tf, np.arange(40), seq, tok.vocab_size, seed=1)
    assert (w.dropped, w.truncated, w.n_examples) == (too_long, 0, 40 - too_long)
    batch = w.batch(np.arange(len(w)))
    seen = []
    for row in range(len(w)):
        seg = batch.segments[row]
        tokens = torch.cat([batch.inputs[row], batch.labels[row, -1:]])  # (labels may hide the last token)
        for k in seg.unique().tolist():
            e = w.bounds[row] + k
            if e >= w.bounds[row + 1]:  # padding
                continue
            d = int(w.docs[e])
            whole = torch.from_numpy(tf.tokens[tf.offsets[d] : tf.offsets[d + 1]].astype(np.int64))
            at = torch.nonzero(seg == k).flatten()
            assert torch.equal(tokens[at[0] : at[-1] + 1], whole[: len(at)])  # contiguous, in order
            seen.append(d)
    assert sorted(seen) == sorted(int(d) for d in np.flatnonzero(lengths <= seq + 1))
    truncated = ExampleWindows(tf, np.arange(40), seq, tok.vocab_size, seed=1, long_examples="truncate")
    assert (truncated.dropped, truncated.truncated, truncated.n_examples) == (0, too_long, 40)


def test_labels_count_assistant_tokens_only_never_across_examples_or_padding(chat_corpus, tmp_path):
    corpus, tok, fmt = chat_corpus
    tf = _cache(corpus, tok, fmt, tmp_path)
    for train_on_prompt in (False, True):
        w = ExampleWindows(tf, np.arange(40), 200, tok.vocab_size, train_on_prompt=train_on_prompt)
        b = w.batch(np.arange(len(w)))
        for row in range(len(w)):
            for p in range(b.labels.shape[1]):
                label, nxt_seg = int(b.labels[row, p]), None
                same = p + 1 < b.labels.shape[1] and b.segments[row, p + 1] == b.segments[row, p]
                e = w.bounds[row] + int(b.segments[row, p])
                if e >= w.bounds[row + 1] or not (same or p + 1 == b.labels.shape[1]):
                    assert label == IGNORE, (row, p, nxt_seg)  # padding, or the next example's first token
                    continue
                d = int(w.docs[e])
                j = p + 1 - int(torch.nonzero(b.segments[row] == b.segments[row, p])[0])  # index in the example
                if j >= w.used[e]:
                    assert label == IGNORE
                    continue
                want = tf.tokens[tf.offsets[d] + j] if (train_on_prompt or tf.mask[tf.offsets[d] + j]) else IGNORE
                assert label == want, (row, p)
        assert w.counted(np.arange(len(w))) == b.counted() > 0


def _reference_sum(model, tf, w, window_ids) -> torch.Tensor:
    """Each example of those windows run alone, its assistant tokens' cross-entropy summed."""
    total = torch.zeros(())
    for row in window_ids:
        for e in range(w.bounds[row], w.bounds[row + 1]):
            d = int(w.docs[e])
            ids = torch.from_numpy(tf.tokens[tf.offsets[d] : tf.offsets[d + 1]].astype(np.int64))[None]
            mask = torch.from_numpy(tf.mask[tf.offsets[d] : tf.offsets[d + 1]].astype(bool))[None]
            total = total + cross_entropy(model(ids[:, :-1]), torch.where(mask[:, 1:], ids[:, 1:], IGNORE))
    return total


def test_the_masked_packed_loss_and_gradients_are_the_reference_computations(chat_corpus, tmp_path):
    corpus, tok, fmt = chat_corpus
    tf = _cache(corpus, tok, fmt, tmp_path)
    w = ExampleWindows(tf, np.arange(40), 120, tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(5)
    ids = np.arange(4)
    global_counted = w.counted(ids)
    for accumulation in (1, 2):  # the token mean of the global batch, however it is split
        model.zero_grad()
        for mb in w.batch(ids).split(4 // accumulation):
            loss, _ = distillation_loss(model(mb.inputs, mb.segments), None, mb.labels, "ce")
            (loss / global_counted).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        (_reference_sum(model, tf, w, ids) / global_counted).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_distillation_counts_the_same_positions_as_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, requires_grad=True), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :4] = IGNORE
    keep = labels != IGNORE
    loss, parts = distillation_loss(student, teacher, labels, "kl", temperature=2.0)
    loss.backward()
    # the reference: only the counted positions, gathered
    s2 = student.detach()[keep][None].requires_grad_()
    ref, ref_parts = distillation_loss(s2, teacher[keep][None], labels[keep][None], "kl", temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert float(parts["top1_agreement"]) == float(ref_parts["top1_agreement"])
    assert torch.equal(student.grad[~keep], torch.zeros_like(student.grad[~keep]))
    torch.testing.assert_close(student.grad[keep], s2.grad[0])


def test_batch_split_and_windows_of_plain_text_are_unchanged(tmp_path):
    w = torch.arange(3 * 5).reshape(3, 5)
    b = Batch.from_windows(w)
    assert torch.equal(b.inputs, w[:, :-1]) and torch.equal(b.labels, w[:, 1:]) and b.segments is None
    parts = b.split(2)
    assert [p.inputs.shape[0] for p in parts] == [2, 1] and parts[1].segments is None
    assert b.counted() == 12
    tok = load_tokenizer(ROOT / "data/assets/tokenizer.json")
    corpus = tmp_path / "t.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(10)))
    tf = cached_tokens(corpus, "text", tok, tmp_path / "c", progress=False, num_proc=1)
    assert tf.mask is None
    win = windows_from_tokens(tf, 16, 0.0, 0, tok.vocab_size).train
    idx = torch.tensor([0, 2])
    got = win.batch(idx)
    assert torch.equal(got.inputs, win[idx][:, :-1]) and got.segments is None and win.counted(idx) == 32


def test_a_killed_chat_build_resumes_from_its_parts_to_the_same_bytes(chat_corpus, tmp_path, monkeypatch):
    from nvfp4_titan.data import tokens

    corpus, tok, fmt = chat_corpus
    key = tokens.corpus_key(corpus, "text", tok, fmt)
    whole = tokens.tokenize_corpus(corpus, "text", tok, tmp_path / "a" / "x", key, False, 1, 2000, fmt)
    savez, calls = np.savez, []

    def killed_at_the_third(f, **arrays):
        calls.append(f)
        if len(calls) == 3:
            raise KeyboardInterrupt
        savez(f, **arrays)

    monkeypatch.setattr(np, "savez", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        tokens.tokenize_corpus(corpus, "text", tok, tmp_path / "b" / "x", key, False, 1, 2000, fmt)
    monkeypatch.setattr(np, "savez", savez)
    written, write = [], tokens._write_part
    monkeypatch.setattr(
        tokens, "_write_part", lambda build, index, *a, **k: written.append(index) or write(build, index, *a, **k)
    )
    resumed = tokens.tokenize_corpus(corpus, "text", tok, tmp_path / "b" / "x", key, False, 1, 2000, fmt)
    assert written and written[0] == 2  # parts 0 and 1 were kept
    for name in ("tokens.bin", "offsets.npy", "words.npy", MASK_FILE):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()
