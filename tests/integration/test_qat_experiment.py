"""scripts/qat_experiment.py runs end to end at toy size on the CPU and reports a table."""

import json
import subprocess
import sys

from tests.integration.helpers import FAST, ROOT


def test_experiment_runs_at_toy_size(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "scripts/qat_experiment.py", "--recipe", "recipes/debug_cpu.toml", "--out", str(out),
           "--seeds", "0", "--pretrain-steps", "4", "--finetune-steps", "2", "--finetune-lr", "1e-3",
           "--eval-data", "tests/integration/tiny_corpus.jsonl", "--eval-seq-len", "64", "--eval-stride", "32",
           "--", *FAST, "--validation.freq=0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["0"]
    assert res["nvfp4"] == res["qat"]  # the converted checkpoint is the QAT model
    assert res["base_ptq"] != res["base"]
    assert "| seed | base | base_ptq" in (out / "results.md").read_text()
