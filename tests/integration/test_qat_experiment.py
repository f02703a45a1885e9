"""scripts/qat_experiment.py runs end to end at toy size on the CPU and reports a table of
lm-eval figures."""

import json
import math
import re
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch

from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.evaluate import load_model
from scripts.qat_experiment import token_perplexity
from tests.integration.helpers import FAST, ROOT


def test_experiment_runs_at_toy_size(tmp_path):
    out = tmp_path / "exp"
    cmd = [
        sys.executable,
        "scripts/qat_experiment.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        "--out",
        str(out),
        "--seeds",
        "0",
        "--pretrain-steps",
        "4",
        "--finetune-steps",
        "2",
        "--finetune-lr",
        "1e-3",
        "--eval-data",
        "tests/integration/tiny_corpus.jsonl",
        "--eval-seq-len",
        "512",  # every document in one window: the check below scores each in one forward
        "--eval-batch-size",
        "1",  # each document its own dynamic activation scales, as in that check
        "--ablations",
        "tokens_x0.5",
        "weight_only",
        "qad_temperature_2",
        "--qad",
        "--block-scale-rules",
        "amax",
        "four_over_six",
        "--jobs",
        "2",
        "--",
        *FAST,
        "--validation.freq=0",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    res = results["seeds"]["0"]
    assert res["nvfp4"] == res["qat"]  # the converted checkpoint is the QAT model
    assert res["base_ptq"] != res["base"]
    assert res["qad_nvfp4"] == res["qad"] and res["qad"] != res["qat"]  # QAD: its own run, exported exactly
    assert res["qad_recovery"] == (res["base_ptq"] - res["qad"]) / (res["base_ptq"] - res["base"])
    ab = results["ablations"]
    assert sorted(ab) == ["qad_temperature_2", "tokens_x0.5", "weight_only"]
    t2 = ab["qad_temperature_2"]  # a QAD row: its own run, against the teacher
    assert (t2["base"], t2["base_ptq"]) == (res["base"], res["base_ptq"]) and t2["qad"] != res["qad"]
    assert t2["qad_recovery"] == (res["base_ptq"] - t2["qad"]) / (res["base_ptq"] - res["base"])
    assert ab["weight_only"]["float_ft"] == res["float_ft"]  # a QAT-only knob reuses the float fine-tune
    assert ab["weight_only"]["qat"] != res["qat"] and ab["weight_only"]["float_ft_ptq"] != res["float_ft_ptq"]
    assert ab["tokens_x0.5"]["float_ft"] != res["float_ft"]  # a budget knob gets its own float fine-tune
    # the four_over_six rows: float runs shared, PTQ, QAT and QAD with the rule, exported exactly
    fos = results["rules"]["four_over_six"]["0"]
    assert (fos["base"], fos["float_ft"], fos["held_out"]) == (res["base"], res["float_ft"], res["held_out"])
    assert fos["base_ptq"] != res["base_ptq"] and fos["qat"] != res["qat"] and fos["qad"] != res["qad"]
    assert fos["nvfp4"] == fos["qat"] and fos["qad_nvfp4"] == fos["qad"]
    assert fos["recovery"] == (fos["float_ft_ptq"] - fos["qat"]) / (fos["float_ft_ptq"] - fos["float_ft"])
    assert fos["qad_recovery"] == (fos["base_ptq"] - fos["qad"]) / (fos["base_ptq"] - fos["base"])
    exported = json.loads((out / "seed0" / "qat_four_over_six_nvfp4" / "config.json").read_text())
    assert exported["quantization_config"]["nvfp4_titan"]["block_scale_rule"] == "four_over_six"
    # token perplexity: the QAT model scored directly, each document after EOS (lm-eval's prefix
    # token for a tokenizer that names no BOS), every token once; words as re.split counts them
    tok = load_tokenizer(ROOT / "data/assets/tokenizer.json")
    docs = [
        json.loads(line)["text"] for line in (ROOT / "tests/integration/tiny_corpus.jsonl").read_text().splitlines()
    ]
    model, _ = load_model(out / "seed0" / "qat")
    nll, tokens = 0.0, 0
    for ids in tok.encode_batch(docs):
        x = torch.tensor([[tok.eos_id, *ids]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model.eval()(x[:, :-1]).float(), -1)
        nll -= log_probs[0].gather(1, x[0, 1:, None]).sum().item()
        tokens += len(ids)
    assert res["held_out"] == {"tokens": tokens, "words": sum(len(re.split(r"\s+", d)) for d in docs)}
    text = (out / "results.md").read_text()
    token_row = next(line for line in text.splitlines() if line.startswith(f"| 0 | {tokens} |"))
    header = next(line for line in text.splitlines() if line.startswith("| seed | tokens | words |"))
    assert float(token_row.split("|")[header.split("|").index(" qat ")]) == pytest.approx(
        math.exp(nll / tokens), rel=1e-5
    )
    assert "| seed | base | base_ptq" in text and "| weight_only | weight-only W4A16" in text
    assert "| seed | base | base_ptq | qad | qad_nvfp4 | QAD recovery | QAT recovery |" in text
    assert f"| qad_temperature_2 | QAD at temperature 2 | {res['base']:.4f} | {res['base_ptq']:.4f} |" in text
    qad_tok = token_perplexity(fos["qad"], fos["held_out"])
    assert f"| 0 | four_over_six | qad | {fos['qad']:.4f} | {qad_tok:.4f} | {fos['qad'] / fos['base']:.3f} |" in text

    r = subprocess.run(
        [sys.executable, "scripts/plot_qat_experiment.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    svg = {name: ElementTree.parse(out / f"{name}.svg").getroot() for name in ("loss_curves", "perplexity", "recovery")}
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg["loss_curves"].findall(f"{ns}polyline")) == 3  # float_ft, qat and qad of seed 0
    bars = lambda root: [t.text for t in root.iter(f"{ns}title")]  # noqa: E731
    assert len(bars(svg["perplexity"])) == 8  # the eight evaluations of seed 0
    assert [b.split(":")[0] for b in bars(svg["recovery"])] == [
        "seed 0 qat",
        "seed 0 qad",
        "tokens_x0.5 qat",
        "weight_only qat",
        "qad_temperature_2 qad",
    ]
