"""nvfp4-titan in lm-evaluation-harness: a compressed-tensors export scores as lm-eval's stock
``--model hf`` scores it (transformers + compressed-tensors), and bitwise as the QAT run it came
from; lm-eval's perplexity against the project's earlier strided loop, difference by difference;
greedy generation, chat templates, the command line, the bundled task, bad input."""

import json
import logging
import math
import re
import shutil
import sys

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance

from nvfp4_titan import harness
from nvfp4_titan.convert import ConvertError, Options, convert_checkpoint
from nvfp4_titan.data.chat import RowError
from nvfp4_titan.data.dataset import DataError
from nvfp4_titan.data.tokenizer import TokenizerError
from nvfp4_titan.harness.documents import NEXT_LINE, PLAYS, next_line_items
from nvfp4_titan.harness.errors import HarnessError
from nvfp4_titan.harness.model import NVFP4TitanLM
from nvfp4_titan.parallel.parallelize import DTYPES
from tests.integration.helpers import FAST, ROOT, train

CORPUS = ROOT / "tests" / "integration" / "tiny_corpus.jsonl"
DOCS = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
TEMPLATE = (  # ChatML, as SmolLM2's
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# HF's bf16 forward (config.json's torch_dtype) and bf16 log-softmax against ours (float32, as the
# run trained): at most this many nats apart per scored token (measured: up to 0.044) ...
NATS_PER_TOKEN = 0.05
# ... and HFLM sums each window's log-probabilities in bf16: within half a bf16 ulp of the sum.
BF16_SUM = 2**-8


@pytest.fixture(autouse=True)
def _lm_eval_logs_to_an_open_stream(monkeypatch):
    """lm-eval's command line adds its log handler once, on the sys.stderr of that moment: a
    test's capture, closed after it (each later log line would print a logging traceback)."""
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # lm_eval.utils.setup_logging's (not pytest's own)
            monkeypatch.setattr(handler, "stream", sys.stderr)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-step QAT run whose tokenizer folder names BOS and EOS in tokenizer_config.json (where
    transformers, hence HFLM, reads them) and holds a chat template; its compressed-tensors
    export (the tokenizer files copied along); and its float export, for the tests of the
    scoring and generation logic (fast on the CPU: the emulated NVFP4 GEMM dequantizes its
    weights on every forward)."""
    tmp = tmp_path_factory.mktemp("harness")
    tok = tmp / "tokenizer"
    tok.mkdir()
    shutil.copy(ROOT / "data" / "assets" / "tokenizer.json", tok)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "chat_template.jinja").write_text(TEMPLATE)
    run = tmp / "run"
    data = [f"--dataset.path={CORPUS}", f"--model.tokenizer_path={tok}"]  # a held-out split of one document
    r = train(run, *FAST, "--training.steps=2", "--checkpoint.interval=2", *data)
    assert r.returncode == 0, r.stderr[-3000:]
    convert_checkpoint(run, tmp / "ct", Options(fmt="compressed-tensors", calibration_batches=1))
    convert_checkpoint(run, tmp / "float", Options(fmt="hf"))
    return run, tmp / "ct", tmp / "float"


def _evaluate(lm, tasks, metadata, **kw) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, log_samples=True, task_manager=harness.task_manager(metadata, False), **kw
    )


def _lls(task: str, sample: dict) -> list[float]:
    """Each request's log-likelihood (a rolling one's is a float, a choice's (ll, is_greedy))."""
    return [r[0] if task == "corpus_ppl" else r[0][0] for r in sample["resps"]]


def _scored_tokens(lm: NVFP4TitanLM, task: str, sample: dict) -> list[int]:
    """Tokens each request of a sample scores: a document's, or a choice's continuation."""
    if task == "corpus_ppl":
        return [sample["doc"]["n_tokens"]]
    return [len(lm._encode_pair(ctx, cont)[1]) for ctx, cont in sample["arguments"]]


def test_export_scores_as_lm_eval_hf_scores_it(models):
    """--model hf with default arguments (bf16 from config.json's torch_dtype; transformers runs
    the export through compressed-tensors) and nvfp4-titan on the same folder: the same tokens
    and prefix, each request within NATS_PER_TOKEN a scored token (and HF's bf16 rounding of its
    sums), hence the perplexities within that bound and the same answer wherever the bound cannot
    flip it."""
    from lm_eval.models.huggingface import HFLM

    _, ct, _ = models
    ours = NVFP4TitanLM(path=ct, max_length=64, batch_size=64, device="cpu")
    hf = HFLM(pretrained=str(ct), max_length=64, batch_size=64, device="cpu")
    assert ours.prefix_token_id == hf.prefix_token_id == 0 and ours.eot_token_id == hf.eot_token_id == 1
    for text in [*DOCS, "<|begin_of_text|>starts with BOS", "Ham.\nWhither wilt thou lead me?\n"]:
        assert ours.tok_encode(text) == hf.tok_encode(text)
    got = {}
    for lm, key in ((ours, "path"), (hf, "pretrained")):
        got[key] = _evaluate(lm, ["corpus_ppl", "shakespeare_next_line"], {key: str(ct), "data": str(CORPUS)}, limit=8)
    for task in ("corpus_ppl", "shakespeare_next_line"):
        for a, b in zip(got["path"]["samples"][task], got["pretrained"]["samples"][task], strict=True):
            n, x, y = _scored_tokens(ours, task, a), _lls(task, a), _lls(task, b)
            bound = [NATS_PER_TOKEN * k + BF16_SUM * abs(v) for k, v in zip(n, y)]
            for i in range(len(n)):
                assert abs(x[i] - y[i]) <= bound[i], (task, a["doc_id"], x, y, n)
            if task == "shakespeare_next_line":  # the same answer where the bound cannot change it
                first, second = sorted(range(4), key=lambda i: -x[i])[:2]
                if x[first] - x[second] > bound[first] + bound[second]:
                    assert max(range(4), key=lambda i: y[i]) == first
    samples = got["path"]["samples"]["corpus_ppl"]
    tokens = sum(s["doc"]["n_tokens"] for s in samples)
    nll = -sum(_lls("corpus_ppl", s)[0] for s in got["pretrained"]["samples"]["corpus_ppl"])
    for metric in ("word_perplexity", "byte_perplexity", "token_perplexity"):
        count = sum(s[metric][1] for s in samples)
        ppl = [got[k]["results"]["corpus_ppl"][f"{metric},none"] for k in ("path", "pretrained")]
        assert abs(math.log(ppl[0]) - math.log(ppl[1])) <= (NATS_PER_TOKEN * tokens + BF16_SUM * nll) / count, metric


def test_run_and_its_export_score_bitwise_alike(models):
    """The QAT run as trained and its export read through NVFP4Linear: every response of every
    task equal, generation included."""
    run, ct, _ = models
    got = []
    for path in (run, ct):
        lm = NVFP4TitanLM(path=path, max_length=64, batch_size=64, device="cpu")
        tasks = ["corpus_ppl", "shakespeare_next_line", "shakespeare_next_line_gen"]
        metadata = {"path": str(path), "data": str(CORPUS)}
        got.append(_evaluate(lm, tasks, metadata, limit=4, gen_kwargs="max_gen_toks=6")["samples"])
    for task, samples in got[0].items():
        assert [s["resps"] for s in samples] == [s["resps"] for s in got[1][task]], task


def _step_with_recipe(run, folder, *changes: tuple[str, str]):
    """The run's step-2 (its files linked) in ``folder``, its recipe's text with each (old, new) replaced."""
    step = folder / "step-2"
    step.mkdir()
    for f in (run / "checkpoint" / "step-2").iterdir():
        if f.name != "config.toml":
            (step / f.name).symlink_to(f)
    recipe = (run / "checkpoint" / "step-2" / "config.toml").read_text()
    for old, new in changes:
        assert old in recipe, old
        recipe = recipe.replace(old, new)
    (step / "config.toml").write_text(recipe)
    return step


def test_a_run_is_evaluated_in_the_dtype_it_trained_in(models, tmp_path):
    """training.mixed_precision_param decides: the same step, its recipe saying bfloat16, loads in bf16."""
    run, _, _ = models
    step = _step_with_recipe(run, tmp_path, ('mixed_precision_param = "float32"', 'mixed_precision_param = "bfloat16"'))
    assert NVFP4TitanLM(path=run).model.tok_embeddings.weight.dtype == torch.float32
    assert NVFP4TitanLM(path=step).model.tok_embeddings.weight.dtype == torch.bfloat16


def test_a_run_is_scored_with_the_chat_template_it_trained_with(models, tmp_path):
    """A run whose recipe sets dataset.chat_template renders prompts with it, not with its
    tokenizer's template (ChatML here); chat_template="" asks for the tokenizer's; a recipe that
    sets none takes the tokenizer's."""
    run, _, _ = models
    step = _step_with_recipe(run, tmp_path, ('chat_template = ""', 'chat_template = "plain"'))
    chat = [{"role": "user", "content": "Who speaks?"}]
    # "plain": tokenizer_config.json's BOS, then the turns as they are
    assert NVFP4TitanLM(path=step).apply_chat_template(chat) == "<|begin_of_text|>Who speaks?"
    chatml = "<|im_start|>user\nWho speaks?<|im_end|>\n<|im_start|>assistant\n"
    assert NVFP4TitanLM(path=step, chat_template="").apply_chat_template(chat) == chatml
    assert NVFP4TitanLM(path=run).apply_chat_template(chat) == chatml


@pytest.mark.cuda
def test_on_a_gpu_the_export_and_ptq_of_its_float_weights_score_alike(models):
    """On CUDA (Triton kernels in the QAT linear, the emulated GEMM in NVFP4Linear): the export
    and PTQ of the run's float export (the same quantization as the run's QAT forward) give equal
    responses, and within float rounding of the CPU's."""
    _, ct, float_ = models
    items = [json.loads(line) for line in NEXT_LINE.read_text().splitlines()[:8]]
    got = {}
    for device in ("cuda", "cpu"):
        for name, kw in (("export", {"path": ct}), ("ptq", {"path": float_, "quant": "nvfp4-ptq"})):
            lm = NVFP4TitanLM(**kw, max_length=64, batch_size=8, device=device)
            assert next(lm.model.parameters()).device.type == device
            rolling = lm.loglikelihood_rolling(
                [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
            )
            pairs = [(it["context"], c) for it in items for c in it["choices"]]
            ll = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
            kwargs = {"until": [], "max_gen_toks": 8}
            gen = lm.generate_until(
                [Instance("generate_until", {}, (it["context"], kwargs), i) for i, it in enumerate(items)]
            )
            got[device, name] = (rolling, [x for x, _ in ll], gen)
    assert got["cuda", "export"] == got["cuda", "ptq"]
    for want, have in zip(got["cpu", "export"][:2], got["cuda", "export"][:2]):
        assert have == pytest.approx(want, rel=1e-4)


def _strided_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> dict[int, float]:
    """scripts/eval_ppl.py before lm-eval (its windows, every target of the stream scored once):
    NLL of each target position of the token stream ``ids``."""
    losses, prev_end = {}, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[None, begin:end]).float(), -1)[0]
        nll = -lp.gather(1, ids[begin + 1 : end + 1, None])[:, 0]
        for j in range(max(0, prev_end - begin), end - begin):
            losses[begin + 1 + j] = nll[j].item()
        prev_end = end
        if end == len(ids) - 1:
            break
    return losses


def test_lm_eval_perplexity_against_the_earlier_strided_loop(models):
    """On one document in one window (the same text and window) the two agree; over a corpus the
    earlier loop scored one stream (documents joined by EOS, windows of 64 every 32 tokens) and
    counted words with str.split. lm-eval's total NLL is the earlier one without the EOS targets,
    with each document's first token scored after the prefix token instead of after the previous
    document, and within 0.5% otherwise (context across documents and windows)."""
    _, _, float_ = models
    lm = NVFP4TitanLM(path=float_, max_length=64, batch_size=64, device="cpu")
    enc = [lm.tok_encode(d) for d in DOCS]
    wide = NVFP4TitanLM(path=float_, max_length=256, device="cpu")
    one = wide.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (DOCS[0],), 0)])[0]
    assert len(enc[0]) < 256
    same = _strided_nll(lm.model, torch.tensor([lm.prefix_token_id, *enc[0]]), 256, 256)
    assert -one == pytest.approx(sum(same.values()), rel=1e-5)

    ids = torch.tensor([t for e in enc for t in (*e, lm.eot_token_id)])
    starts = [sum(len(e) + 1 for e in enc[:i]) for i in range(len(enc))]
    old = _strided_nll(lm.model, ids, 64, 32)
    eos = sum(old[s + len(e)] for s, e in zip(starts, enc))
    first_old = sum(old.get(s, 0.0) for s in starts)  # the stream's very first token is never scored
    with torch.no_grad():
        first_new = sum(
            -torch.log_softmax(lm.model(torch.tensor([[lm.prefix_token_id]])).float(), -1)[0, 0, e[0]].item()
            for e in enc
        )
    r = _evaluate(lm, ["corpus_ppl"], {"path": str(float_), "data": str(CORPUS)})
    samples = r["samples"]["corpus_ppl"]
    new = -sum(s["word_perplexity"][0] for s in samples)
    assert abs(new - (sum(old.values()) - eos - first_old + first_new)) <= 0.005 * new
    assert [s["word_perplexity"][1] for s in samples] == [len(re.split(r"\s+", d)) for d in DOCS]
    assert r["results"]["corpus_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(new / sum(len(re.split(r"\s+", d)) for d in DOCS)), rel=1e-9
    )


def test_greedy_generation_stops_as_asked(models):
    """generate_until, batched, equals a plain greedy loop over the model (argmax of the last
    position) for each context alone, cut at the first stop string."""
    _, _, float_ = models
    lm = NVFP4TitanLM(path=float_, batch_size=3, device="cpu")
    contexts = ["HAMLET.\nTo be, or not to be", "Enter Ghost", "Ham.\nWhither wilt thou lead me? speak!"]
    for until, budget in ((["\n"], 10), (["e"], 10), ([], 4)):
        kwargs = {"until": until, "max_gen_toks": budget, "do_sample": False}
        got = lm.generate_until([Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)])
        for context, text in zip(contexts, got):
            ids = lm.tok_encode(context)
            new = []
            for _ in range(budget):
                with torch.no_grad():
                    token = int(lm.model(torch.tensor([ids + new]))[0, -1].argmax())
                if token == lm.eot_token_id:
                    break
                new.append(token)
                if any(s in lm.encoder.decode(new) for s in until):
                    break
            want = lm.encoder.decode(new)
            for s in until:
                want = want.split(s)[0]
            assert text == want
    with pytest.raises(ValueError, match="generates greedily: pass --gen_kwargs do_sample=false"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True, "temperature": 1.0}), 0)])


def test_chat_prompts_render_as_transformers_renders_them(models):
    from transformers import AutoTokenizer

    _, _, float_ = models
    lm = NVFP4TitanLM(path=float_, batch_size=1, device="cpu")
    ref = AutoTokenizer.from_pretrained(float_)
    chat = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Who speaks?"}]
    assert lm.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prefill = [*chat, {"role": "assistant", "content": "It is "}]
    assert lm.apply_chat_template(prefill, add_generation_prompt=False) == ref.apply_chat_template(
        prefill, tokenize=False, continue_final_message=True
    )
    r = _evaluate(lm, ["shakespeare_next_line_gen"], {}, limit=1, apply_chat_template=True, gen_kwargs="max_gen_toks=2")
    prompt = r["samples"]["shakespeare_next_line_gen"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_command_line_runs_lm_eval_with_the_model_and_tasks(models, capsys, monkeypatch):
    """nvfp4-lm-eval (python -m nvfp4_titan.harness) is lm-eval's command line with the model and
    the tasks: its table holds the figure the Python API gives."""
    from nvfp4_titan.harness.cli import main

    run, _, _ = models
    monkeypatch.setattr(sys, "argv", sys.argv)  # main() sets it for lm-eval's parser
    args = ["--model", "nvfp4-titan", "--model_args", f"path={run},max_length=64", "--tasks", "corpus_ppl"]
    main([*args, "--device", "cpu", "--batch_size", "64", "--metadata", json.dumps({"data": str(CORPUS)})])
    want = harness.corpus_perplexity({"path": str(run), "max_length": 64}, {"data": str(CORPUS)}, 64, "cpu")
    row = next(line for line in capsys.readouterr().out.splitlines() if "|word_perplexity" in line)
    assert float(row.split("|")[7]) == pytest.approx(want["word_perplexity"], abs=5e-4)


def test_command_line_names_bad_input_in_one_line(models, capsys, monkeypatch, tmp_path):
    """The project's errors for bad input end nvfp4-lm-eval with one line on stderr, exit status
    2, no traceback, worded with the harness's own arguments."""
    from nvfp4_titan.harness.cli import main

    run, _, _ = models
    monkeypatch.setattr(sys, "argv", sys.argv)
    task = ["--tasks", "corpus_ppl", "--device", "cpu", "--limit", "1"]
    for args, said in (
        (["--model_args", f"pth={run}"], "error: nvfp4-titan has no model argument pth"),
        (["--model_args", "max_length=64"], "error: nvfp4-titan needs the model: --model_args path=PATH"),
        (
            ["--model_args", f"path={run}", "--metadata", json.dumps({"data": str(tmp_path / "nope.jsonl")})],
            'does not exist; name a local file or folder with --metadata \'{"data": "PATH"}\'',
        ),
        (["--model_args", f"path={run}", "--include_path", "x"], "error: nvfp4-lm-eval passes its own tasks folder"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", "nvfp4-titan", *args, *task])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and said in last and "dataset.path" not in err, err


def test_bad_input_is_named(models, tmp_path):
    run, ct, _ = models
    for kwargs, error, said in (
        ({"path": tmp_path / "nope"}, ConvertError, "does not exist"),
        ({"path": ct, "quant": "nvfp4-ptq"}, ConvertError, "evaluated as stored"),
        ({"path": run, "quant": "nvfp4-ptq"}, ConvertError, "already quantized"),
        ({"path": run, "quant": "int4"}, ConvertError, r"quant='int4': use one of \['none', 'nvfp4-ptq'\]"),
        ({"path": run, "batch_size": "auto"}, ValueError, "batch_size='auto': give a whole number"),
        ({"path": run, "max_length": 4096}, ConvertError, "max_length=4096 exceeds the model's max_seq_len 2048"),
        ({"path": run, "pretrained": run}, HarnessError, "no model argument pretrained; .* pretrained= is path= here"),
        ({"pretrained": run}, HarnessError, "no model argument pretrained; .* pretrained= is path= here"),
        ({"pth": run}, HarnessError, "no model argument pth; it takes path, "),
        ({}, HarnessError, r"needs the model: --model_args path=PATH"),
        ({"path": run, "tokenizer": tmp_path / "no.json"}, TokenizerError, "pass --model_args tokenizer=PATH$"),
    ):
        with pytest.raises(error, match=said):
            NVFP4TitanLM(**kwargs)
    lm = NVFP4TitanLM(path=ct)
    for metadata, error, said in (
        ({"path": str(ct)}, ConvertError, "corpus_ppl needs its documents"),
        (  # lm-eval merges --model_args into the metadata: those are known keys
            {"path": str(ct), "max_length": 64, "daat": str(CORPUS)},
            HarnessError,
            r"unknown metadata key 'daat': the perplexity tasks take data, text_field, held_out_of \(--metadata\)",
        ),
        ({"path": str(ct), "data": str(CORPUS), "held_out_of": str(run)}, HarnessError, "give data or held_out_of"),
        (
            {"path": str(ct), "held_out_of": str(ct)},
            ConvertError,
            r"held_out_of=.*: a Hugging Face folder \(float or converted\), not a training run: name the run",
        ),
    ):
        with pytest.raises(error, match=said) as e:
            _evaluate(lm, ["corpus_ppl"], metadata)
        assert "convert the float checkpoint" not in str(e.value)
    no_template = NVFP4TitanLM(path=run, tokenizer=ROOT / "data" / "assets" / "tokenizer.json")
    with pytest.raises(
        ValueError, match=r'has no chat template .* Set --model_args chat_template to a jinja2 file, or to "plain"'
    ):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


def test_a_runs_relative_paths_are_named_from_elsewhere(models, tmp_path, monkeypatch):
    """A recipe's relative paths are from the directory the run trained in: run from elsewhere,
    the tokenizer, the held-out corpus and the chat template say so and name the argument that
    gives them instead."""
    run, _, _ = models
    tok = run.parent / "tokenizer"
    step = _step_with_recipe(
        run,
        tmp_path,
        (f'"{tok}"', '"data/assets/tokenizer.json"'),
        (f'"{CORPUS}"', '"tests/integration/tiny_corpus.jsonl"'),
        ('chat_template = ""', 'chat_template = "templates/chat.jinja"'),
    )
    monkeypatch.chdir(tmp_path)
    elsewhere = "relative to the directory the run was trained in, and there is no {} in {}: "
    elsewhere += "run from that directory, or pass {}"
    said = elsewhere.format("data/assets/tokenizer.json", tmp_path, "--model_args tokenizer=PATH")
    with pytest.raises(TokenizerError) as e:
        NVFP4TitanLM(path=step)
    assert said in str(e.value)
    lm = NVFP4TitanLM(path=step, tokenizer=tok)
    said = elsewhere.format("tests/integration/tiny_corpus.jsonl", tmp_path, '--metadata \'{"data": "PATH"}\'')
    with pytest.raises(DataError) as e:
        _evaluate(lm, ["corpus_ppl"], {"path": str(step), "tokenizer": str(tok)})
    assert said in str(e.value)
    said = elsewhere.format("templates/chat.jinja", tmp_path, "--model_args chat_template=PATH")
    with pytest.raises(RowError) as e:
        lm.apply_chat_template([{"role": "user", "content": "x"}])
    assert said in str(e.value)


def test_the_docs_list_the_dtypes_the_code_takes():
    """docs/evaluation.md and the model's docstring name every dtype load_model accepts."""
    doc = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    dtype = doc[doc.index("`dtype` (`auto`") : doc.index("`tokenizer`, `prefix_token_id`")]
    for name in DTYPES:
        assert f"`{name}`" in dtype and f"``{name}``" in NVFP4TitanLM.__doc__, name


def test_bundled_next_line_items_are_rebuilt_from_the_plays():
    """tasks/shakespeare_next_line.jsonl is what scripts/build_next_line_task.py writes; each
    answer is the line after its context in the play."""
    scenes = [json.loads(line) for line in PLAYS.read_text().splitlines()]
    items = next_line_items(scenes)
    assert NEXT_LINE.read_text() == "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items)
    assert NEXT_LINE.stat().st_size < 1 << 20
    plays: dict[str, str] = {}  # each play's lines stripped, stage directions left out, as the items read them
    for s in scenes:
        lines = [line.strip() for line in s["text"].split("\n") if not line.lstrip().startswith("[")]
        plays[s["source"]] = plays.get(s["source"], "") + "\n".join(lines) + "\n"
    for item in items:
        assert item["context"] + item["choices"][item["label"]] + "\n" in plays[item["play"]]


def test_eval_ppl_reports_lm_eval_figures_on_a_runs_held_out_split(models, tmp_path, capsys):
    """scripts/eval_ppl.py: the converted checkpoint, which carries no recipe, scored on its run's
    validation split (--held-out-of) gives exactly the run's figures, which are lm-eval's
    corpus_ppl; bad input is named by the flag that fixes it."""
    from scripts import eval_ppl

    run, ct, _ = models
    figures = []
    for argv in ([str(run)], [str(ct), "--held-out-of", str(run)]):
        assert eval_ppl.main([*argv, "--seq-len=64", "--batch-size=64"]) == 0
        figures.append(capsys.readouterr().out.split(":", 1)[1])
    assert figures[0] == figures[1]
    want = harness.corpus_perplexity({"path": str(run), "max_length": 64}, {"held_out_of": str(run)}, 64, "cpu")
    assert f"word_ppl {want['word_perplexity']:.6f}  token_ppl {want['token_perplexity']:.6f}" in figures[0]
    assert eval_ppl.main([str(ct)]) == 2
    assert "give --data or --held-out-of" in capsys.readouterr().err
    assert eval_ppl.main([str(run), "--held-out-of", str(ct)]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert eval_ppl.main([str(run), "--seq-len=4096"]) == 2
    assert "--seq-len 4096 exceeds the model's max_seq_len 2048" in capsys.readouterr().err
    for bad, said in (
        (["--seq-len=1"], "need --seq-len >= 2 (got 1)"),
        (["--batch-size=0"], "need --batch-size >= 1 (got 0)"),
        ([f"--data={CORPUS}", f"--held-out-of={run}"], "give --data or --held-out-of, not both"),
    ):
        with pytest.raises(SystemExit):
            eval_ppl.main([str(run), *bad])
        assert said in capsys.readouterr().err
    (tmp_path / "other.jsonl").write_text('{"body": "text under another field"}\n')
    chat = _step_with_recipe(run, tmp_path, ('format = "text"', 'format = "chat"'))
    for model, bad, fix in (  # the harness's hints name its arguments; eval_ppl's fix is one of its flags
        (run, [f"--data={tmp_path / 'missing.jsonl'}"], "does not exist; name a local file or folder with --data PATH"),
        (
            run,
            [f"--data={tmp_path / 'other.jsonl'}"],
            "no field 'text'; its fields are ['body'] (name the field with --text-field NAME)",
        ),
        (run, [f"--tokenizer={tmp_path / 'missing.json'}"], "does not exist; pass --tokenizer PATH"),
        (ct, [f"--held-out-of={chat}"], "give the documents to score as --data FILE.jsonl, or"),
    ):
        assert eval_ppl.main([str(model), *bad]) == 2
        err = capsys.readouterr().err  # lm-eval's own log lines name --metadata
        err = next(line for line in err.splitlines() if line.startswith("error: "))
        assert fix in err and "dataset." not in err and "model.tokenizer_path" not in err, err
        assert "--metadata" not in err and "--model_args" not in err, err


def test_documents_are_encoded_as_transformers_encodes_them(tmp_path):
    """A tokenizer.json whose post-processor adds BOS (as Llama 3's does): ids as transformers'
    encode gives them, BOS included unless the text starts with the prefix token's text; a Llama 3
    tiktoken tokenizer.model adds its <|begin_of_text|> the same way; decode leaves special tokens
    out unless asked."""
    import base64

    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from nvfp4_titan.harness.encoding import Encoder

    tok = Tokenizer.from_file(str(ROOT / "data" / "assets" / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    enc = Encoder(tmp_path / "hf")
    assert enc.prefix_id == 0 and enc.eot_id == 1
    for text in ("To be, or not to be", "<|end_of_text|>after EOS"):
        assert enc.encode(text) == ref.encode(text) and enc.encode(text)[0] == 0
    assert enc.encode("<|begin_of_text|>Ham.") == ref.encode("<|begin_of_text|>Ham.", add_special_tokens=False)

    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (tmp_path / "tiktoken").mkdir()
    (tmp_path / "tiktoken" / "tokenizer.model").write_text(ranks)
    enc = Encoder(tmp_path / "tiktoken")  # no tokenizer_config.json: EOS is the prefix, as in HFLM
    assert (enc.prefix_id, enc.eot_id) == (257, 257)
    assert enc.encode("ab") == [256, 97, 98] and enc.encode("<|end_of_text|>ab") == [257, 97, 98]
    assert enc.decode([256, 97, 257]) == "a"
    assert enc.decode([256, 97, 257], skip_special_tokens=False) == "<|begin_of_text|>a<|end_of_text|>"
