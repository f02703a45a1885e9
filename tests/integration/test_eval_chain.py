"""The whole chain at toy size: float pre-train, QAT and float fine-tunes, convert, evaluate."""

import importlib.util
import json

import torch

import nvfp4
from data.tokenizer import load_tokenizer
from tests.integration.helpers import FAST, ROOT, train
from training.convert import Options, convert

spec = importlib.util.spec_from_file_location("eval_ppl", ROOT / "scripts" / "eval_ppl.py")
eval_ppl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_ppl)


def _ppl(path, ids, n_words, quant="none"):
    model, _ = eval_ppl.load_model(path)
    if quant == "nvfp4-ptq":
        nvfp4.prepare(model, nvfp4.QATConfig())
    return eval_ppl.perplexity(model.eval(), ids, n_words, seq_len=64, stride=32, batch_size=8, progress=False)


def test_pretrain_finetune_convert_evaluate(tmp_path):
    steps = ["--training.steps=6", "--checkpoint.interval=6"]
    assert train(tmp_path / "pre", *FAST, *steps, "--qat.enable=false").returncode == 0
    base = f"--checkpoint.initial_load_path={tmp_path / 'pre' / 'checkpoint' / 'step-6'}"
    for name, qat in (("qat", "true"), ("float", "false")):
        r = train(tmp_path / name, *FAST, "--training.steps=3", "--checkpoint.interval=3", base, f"--qat.enable={qat}")
        assert r.returncode == 0, r.stderr
    convert(tmp_path / "qat", tmp_path / "nvfp4", Options(calibration_batches=1))

    docs = [json.loads(line)["text"][:1500] for line in (ROOT / "data/assets/shakespeare.jsonl").read_text().splitlines()[:4]]
    tok = load_tokenizer(ROOT / "data/assets/tokenizer.json")
    ids = torch.tensor([t for d in tok.encode_batch(docs) for t in (*d, tok.eos_id)])
    words = sum(len(d.split()) for d in docs)
    r = {
        "base": _ppl(tmp_path / "pre", ids, words),
        "base_ptq": _ppl(tmp_path / "pre", ids, words, "nvfp4-ptq"),
        "float_ft": _ppl(tmp_path / "float", ids, words),
        "float_ft_ptq": _ppl(tmp_path / "float", ids, words, "nvfp4-ptq"),
        "qat": _ppl(tmp_path / "qat", ids, words),
        "nvfp4": _ppl(tmp_path / "nvfp4", ids, words),
    }
    assert r["nvfp4"]["word_ppl"] == r["qat"]["word_ppl"]  # the deployed model is the QAT model
    assert r["nvfp4"]["tokens"] == r["qat"]["tokens"] == len(ids) - 1  # every token scored once
    assert r["base_ptq"]["word_ppl"] != r["base"]["word_ppl"]
    assert all(v["word_ppl"] > v["token_ppl"] > 1 for v in r.values())


def test_strided_windows_score_every_target_once():
    ids = torch.arange(100)
    seen = []
    for inp, tgt, first in eval_ppl.strided_windows(ids, seq_len=16, stride=6):
        assert torch.equal(inp + 1, tgt) and len(inp) <= 16
        seen += tgt[first:].tolist()
    assert seen == list(range(1, 100))
