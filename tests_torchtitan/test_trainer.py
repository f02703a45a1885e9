"""torchtitan's own trainer (``nvfp4_titan.torchtitan_qat.launch``, 2 gloo ranks on the CPU) trains the
``debug`` config with the NVFP4 QAT converter: under TP=2 its losses equal the 1-process run's from the
same seed checkpoint, under TP=2 and FSDP=2 each rank's shard codes joined equal the unsharded weight's
after training, and the checkpoint it saves converts and passes ``--verify``. With FSDP gathering the
QAT weights as NVFP4 (``debug_nvfp4_all_gather``) it trains the plain FSDP run's weights bit for bit.
With static activation scales (``debug_static``) the launcher calibrates once, on the batches the run
then trains on, to the 1-process amax; a resumed run keeps it; the export's input scales are its tensor
scales."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import nvfp4
from nvfp4_titan.convert.cli import main as convert
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.torchtitan_qat.export import our_modules

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _run(
    dump: Path, nproc: int, *overrides: str, config: str = "debug", steps: int = STEPS, interval: int = STEPS
) -> tuple[dict[int, float], str]:
    """Run the trainer; return the loss of every step it trained (it logs each) and its log."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"),
        *("-m", "tests_torchtitan.train_and_check", "--module", "nvfp4_titan.torchtitan_qat.configs"),
        *("--config", config, "--dump_folder", str(dump), "--training.steps", str(steps), "--metrics.log_freq", "1"),
        *("--checkpoint.interval", str(interval)),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)
    losses = {int(s): float(v) for s, v in re.findall(r"step:\s+(\d+)\s+loss:\s+([0-9.]+)", log)}
    assert max(losses) == steps, log[-2000:]
    return losses, log


def _losses(dump: Path, nproc: int, *overrides: str) -> list[float]:
    losses, _ = _run(dump, nproc, *overrides)
    assert sorted(losses) == list(range(1, STEPS + 1))
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


def _converts(dump: Path, out: Path, config: str = "debug") -> None:
    args = [str(dump), str(out), "--torchtitan", f"nvfp4_titan.torchtitan_qat.configs:{config}", "--quiet"]
    assert convert([*args, "--calibration-data", "data/assets/shakespeare.jsonl", "--calibration-seq-len", "128"]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def one(seed, tmp_path_factory) -> tuple[Path, list[float]]:
    """The 1-process run from the seed checkpoint: its folder and losses."""
    dump = tmp_path_factory.mktemp("one") / "run"
    return dump, _losses(dump, 1, *_from(seed))


@pytest.fixture(scope="module")
def fsdp2(seed, tmp_path_factory) -> tuple[Path, list[float]]:
    """The FSDP=2 run from the seed checkpoint (checkpoints at steps 2 and 3): its folder and losses."""
    dump = tmp_path_factory.mktemp("fsdp2") / "run"
    losses, _ = _run(dump, 2, *_from(seed), interval=2)
    return dump, [losses[s] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("layout", ["tp2", "fsdp2"])
def test_trainer_trains_sharded_with_unsharded_codes(tmp_path, monkeypatch, seed, one, fsdp2, layout):
    monkeypatch.chdir(REPO)
    if layout == "tp2":
        dump = tmp_path / "run"
        losses = _losses(dump, 2, *_from(seed), "--parallelism.tensor_parallel_degree", "2")
        # the same batches as one process: the same losses, to fp32 reduction noise
        assert all(abs(a - b) <= 1e-4 for a, b in zip(losses, one[1])), (losses, one[1])
    else:
        dump, losses = fsdp2
    for rank in range(2):
        assert (dump / f"shard_check.rank{rank}.txt").read_text() == "30"  # every QAT linear, bitwise
    assert losses[-1] < losses[0]
    _converts(dump, tmp_path / "nvfp4")


def _tensors(step: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torchtitan DCP step (model, optimizer), by key."""
    out = tmp_path / f"{step.parent.parent.name}.{step.name}.pt"
    dcp_to_torch_save(step, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    walk("", state)
    return flat


def test_nvfp4_all_gather_trains_the_plain_runs_weights_bit_for_bit(tmp_path, monkeypatch, seed, fsdp2):
    """The NVFP4 all-gather gives the linears the codes and scales of the plain all-gather, so FSDP=2 trains
    the same weights and optimizer state, bit for bit; a run resumed from its checkpoint too (the tensor
    scales are computed again after the load)."""
    monkeypatch.chdir(REPO)
    dump = tmp_path / "run"
    losses, log = _run(dump, 2, *_from(seed), config="debug_nvfp4_all_gather", interval=2)
    assert "FSDP all-gathers 30 linears' weights as NVFP4" in log
    assert [losses[s] for s in range(1, STEPS + 1)] == fsdp2[1]
    for rank in range(2):
        assert (dump / f"shard_check.rank{rank}.txt").read_text() == "30"
    want = _tensors(fsdp2[0] / "checkpoint" / f"step-{STEPS}", tmp_path)
    got = _tensors(dump / "checkpoint" / f"step-{STEPS}", tmp_path)
    assert sorted(got) == sorted(want) and any(".wqkv." in k for k in got)
    assert not [k for k in want if not torch.equal(got[k], want[k])]
    _converts(dump, tmp_path / "nvfp4", config="debug_nvfp4_all_gather")

    resumed = tmp_path / "resumed"
    shutil.copytree(dump / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    losses, _ = _run(resumed, 2, config="debug_nvfp4_all_gather")
    assert losses == {STEPS: fsdp2[1][-1]}
    got = _tensors(resumed / "checkpoint" / f"step-{STEPS}", tmp_path)
    assert not [k for k in want if not torch.equal(got[k], want[k])]


def _amax(dump: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(dump / f"input_amax.rank{rank}.pt")


def test_static_scales_are_calibrated_once_on_the_batches_the_run_trains_on(tmp_path, monkeypatch, seed, one):
    monkeypatch.chdir(REPO)
    calibrated = "calibrated static activation scales on 4 batches per rank"
    tp2, log = _run(
        tmp_path / "tp2", 2, *_from(seed), "--parallelism.tensor_parallel_degree", "2", config="debug_static"
    )
    alone, alone_log = _run(tmp_path / "one", 1, *_from(seed), config="debug_static", interval=2)
    assert calibrated in log and calibrated in alone_log
    # calibration reads the first batches and rewinds the loader: the steps train on the dynamic run's batches
    trained = (one[0] / "batches.rank0.txt").read_text()
    assert len(trained.split()) == STEPS
    for run, ranks in ((tmp_path / "tp2", 2), (tmp_path / "one", 1)):
        for rank in range(ranks):
            assert (run / f"batches.rank{rank}.txt").read_text() == trained
    assert all(abs(tp2[s] - alone[s]) <= 1e-4 for s in tp2), (tp2, alone)
    a0, a1, a = _amax(tmp_path / "tp2", 0), _amax(tmp_path / "tp2", 1), _amax(tmp_path / "one")
    assert len(a) == 30
    for name in a:  # one amax on every rank, the 1-process one (to TP's fp32 reduction order)
        assert torch.equal(a0[name], a1[name]) and a[name] > 0, name
        assert abs(a0[name] - a[name]) <= 1e-5 * a[name], (name, a0[name], a[name])

    # resumed from step 2, the run keeps the saved amax and trains step 3 as the uninterrupted run did
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one" / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    losses, resumed_log = _run(resumed, 1, config="debug_static")
    assert calibrated not in resumed_log and sorted(losses) == [STEPS]
    assert losses[STEPS] == alone[STEPS]
    assert (resumed / "batches.rank0.txt").read_text() == trained.splitlines(keepends=True)[-1]
    assert all(torch.equal(t, a[name]) for name, t in _amax(resumed).items())

    # the export's input scales are the tensor scales of the calibrated amaxes (q/k/v: the fused wqkv's)
    _converts(tmp_path / "tp2", tmp_path / "nvfp4", config="debug_static")
    with safe_open(tmp_path / "nvfp4" / "model.safetensors", "pt") as f:
        for name, amax in a0.items():
            for ours in our_modules(name):
                scale = f.get_tensor(f"{adapter.to_hf_module(ours)}.input_scale")
                assert torch.equal(scale, nvfp4.tensor_scale(amax, "pow2").reshape(scale.shape)), ours
