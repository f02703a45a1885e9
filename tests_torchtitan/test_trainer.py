"""torchtitan's own trainer (``nvfp4_titan.torchtitan_qat.launch``, 2 gloo ranks on the CPU) trains the
``debug`` config with the NVFP4 QAT converter: under TP=2 its losses equal the 1-process run's from the
same seed checkpoint, under TP=2 and FSDP=2 each rank's shard codes joined equal the unsharded weight's
after training, and the checkpoint it saves converts and passes ``--verify``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_titan.convert.cli import main as convert

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _run(dump: Path, nproc: int, *overrides: str) -> list[float]:
    """Run the trainer; return the loss of every step (it logs each)."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"),
        *("-m", "tests_torchtitan.train_and_check", "--module", "nvfp4_titan.torchtitan_qat.configs"),
        *("--config", "debug", "--dump_folder", str(dump), "--training.steps", str(STEPS), "--metrics.log_freq", "1"),
        *("--checkpoint.interval", str(STEPS)),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)
    losses = {int(s): float(v) for s, v in re.findall(r"step:\s+(\d+)\s+loss:\s+([0-9.]+)", plain)}
    assert sorted(losses) == list(range(1, STEPS + 1)), plain[-2000:]
    return [losses[s] for s in sorted(losses)]


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """A seed checkpoint (step-0 of one process), the common initial model of every run."""
    dump = tmp_path_factory.mktemp("seed")
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"),
        *("-m", "nvfp4_titan.torchtitan_qat.launch", "--module", "nvfp4_titan.torchtitan_qat.configs"),
        *("--config", "debug", "--dump_folder", str(dump), "--checkpoint.create_seed_checkpoint"),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (dump / "checkpoint" / "step-0" / ".metadata").is_file()
    return dump / "checkpoint" / "step-0"


def _from(seed: Path) -> tuple[str, ...]:
    return ("--checkpoint.initial_load_path", str(seed), "--checkpoint.initial_load_model_only")


def _converts(dump: Path, out: Path) -> None:
    args = [str(dump), str(out), "--torchtitan", "nvfp4_titan.torchtitan_qat.configs:debug", "--quiet"]
    assert convert([*args, "--calibration-data", "data/assets/shakespeare.jsonl", "--calibration-seq-len", "128"]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 1)], ids=["tp2", "fsdp2"])
def test_trainer_trains_sharded_with_unsharded_codes(tmp_path, monkeypatch, seed, dp, tp):
    monkeypatch.chdir(REPO)
    dump = tmp_path / "run"
    losses = _run(dump, 2, *_from(seed), "--parallelism.tensor_parallel_degree", str(tp))
    for rank in range(2):
        assert (dump / f"shard_check.rank{rank}.txt").read_text() == "30"  # every QAT linear, bitwise
    if tp == 2:  # the same batches as one process: the same losses, to fp32 reduction noise
        one = _run(tmp_path / "one", 1, *_from(seed))
        assert all(abs(a - b) <= 1e-4 for a, b in zip(losses, one)), (losses, one)
    assert losses[-1] < losses[0]
    _converts(dump, tmp_path / "nvfp4")
