"""A step whose gradient holds NaN never reaches the optimizer or a checkpoint: skipped while
training.skip_nonfinite_steps allows, else the run stops naming the step, the parameter and the
last good checkpoint; every rank decides alike."""

import os
import shutil
import subprocess
import sys

import torch

from tests.integration.helpers import FAST, ROOT, losses, metrics, model_weights

PLANT = str(ROOT / "tests/integration/plant_nan.py")
COMMON = [*FAST, "--checkpoint.interval=1", "--checkpoint.keep_latest_k=0", "--metrics.log_freq=1"]
PARAM = "layers.1.feed_forward.w2.weight"


def _train(dump, *overrides, steps: str, ranks: str = "0", nproc: int = 1, into: str = "grad"):
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launch, *([f"--nproc_per_node={nproc}"] if nproc > 1 else []), PLANT, "--recipe", "recipes/debug_cpu.toml"]
    env = {**os.environ, "PLANT_NAN_STEPS": steps, "PLANT_NAN_RANKS": ranks, "PLANT_NAN_INTO": into}
    cmd += [f"--job.dump_folder={dump}", *COMMON, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _finite(step) -> bool:
    return all(torch.isfinite(t).all() for t in model_weights(step).values())


def test_skipped_steps_change_nothing_and_resume_exactly(tmp_path):
    dump = tmp_path / "run"
    r = _train(dump, "--training.steps=6", "--training.skip_nonfinite_steps=2", steps="3,4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"(first non-finite gradient: {PARAM}): skipped") == 2, r.stdout
    assert [m["skipped_steps"] for m in metrics(dump) if "loss" in m] == [0, 0, 1, 2, 2, 2]
    ck = dump / "checkpoint"
    w2, w4 = model_weights(ck / "step-2"), model_weights(ck / "step-4")
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # neither skipped step moved a weight
    assert not torch.equal(w4[PARAM], model_weights(ck / "step-5")[PARAM])
    assert all(_finite(ck / f"step-{n}") for n in range(1, 7))
    # resumed from a skipped step's checkpoint: the same later losses
    resumed = tmp_path / "resumed"
    shutil.copytree(dump, resumed)
    for n in (5, 6):
        shutil.rmtree(resumed / "checkpoint" / f"step-{n}")
    r = _train(resumed, "--training.steps=6", "--training.skip_nonfinite_steps=2", steps="3,4")
    assert r.returncode == 0 and "at step 4" in r.stdout, r.stderr[-3000:]
    assert {s: losses(resumed)[s] for s in (5, 6)} == {s: losses(dump)[s] for s in (5, 6)}


def test_by_default_the_first_non_finite_gradient_stops_the_run_before_it_is_applied(tmp_path):
    dump = tmp_path / "run"
    r = _train(dump, "--training.steps=5", steps="3")
    assert r.returncode == 1
    assert f"non-finite gradient (norm nan) at step 3 (first non-finite gradient: {PARAM})" in r.stderr, r.stderr
    assert f"Last good checkpoint: {dump / 'checkpoint' / 'step-2'}" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-1", "step-2"]


def test_a_nan_on_one_rank_is_skipped_then_stops_on_every_rank(tmp_path):
    """FSDP=2: the NaN is in rank 1's shard only; both ranks skip step 2, both stop at step 3."""
    dump = tmp_path / "run"
    r = _train(dump, "--training.steps=5", "--training.skip_nonfinite_steps=1", steps="2,3", ranks="1", nproc=2)
    assert r.returncode != 0
    assert "non-finite gradient (norm nan) at step 2" in r.stdout and "skipped" in r.stdout, r.stdout
    for rank in (0, 1):
        log = (dump / "logs" / f"rank{rank}.log").read_text()
        assert "at step 2" in log and "skipped" in log, log
    stop = f"at step 3 (first non-finite gradient: {PARAM}), after 1 skipped in a row"
    assert r.stderr.count(stop) == 2, r.stderr[-3000:]  # both ranks, the same parameter
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-1", "step-2"]
    w1, w2 = model_weights(dump / "checkpoint" / "step-1"), model_weights(dump / "checkpoint" / "step-2")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_model_that_holds_nan_is_never_saved(tmp_path):
    """NaN planted in a weight (finite gradients, so the step is applied): the save refuses it."""
    dump = tmp_path / "run"
    r = _train(dump, "--training.steps=5", steps="3", into="weight")
    assert r.returncode == 1
    said = f"after step 3, {PARAM} holds NaN or Inf: the checkpoint was not written. Last good checkpoint: "
    assert said + str(dump / "checkpoint" / "step-2") in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-1", "step-2"]
