"""One checkpoint saved by a single process, resumed by train.py under torchrun as 1 process,
FSDP=2, TP=2 and FSDP=2 x TP=2 (DCP resharding on load), on the same global batches; FSDP
layouts again with NVFP4 all-gather, which must not change a bit."""

import shutil
import subprocess
import sys

from tests.integration.helpers import FAST, ROOT, losses, train

COMMON = [*FAST, "--training.global_batch_size=8", "--training.local_batch_size=4", "--training.steps=7",
          "--checkpoint.interval=2", "--checkpoint.keep_latest_k=0", "--metrics.log_freq=1",
          "--lr_scheduler.warmup_steps=0", "--optimizer.lr=3e-3"]


def _torchrun(dump, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", "--recipe", "recipes/debug_cpu.toml", f"--job.dump_folder={dump}", *COMMON, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _resume_from(base, dump):
    shutil.copytree(base / "checkpoint" / "step-2", dump / "checkpoint" / "step-2")


def test_losses_match_across_layouts_and_qat_matters(tmp_path):
    base = tmp_path / "base"
    r = train(base, *COMMON)
    assert r.returncode == 0, r.stderr
    ref = losses(base)
    runs = {}
    layouts = (("single", 1, 1, 1, False), ("fsdp2", 2, 2, 1, False), ("tp2", 2, 1, 2, False),
               ("fsdp2xtp2", 4, 2, 2, False), ("fsdp2-nvfp4-ag", 2, 2, 1, True), ("fsdp2xtp2-nvfp4-ag", 4, 2, 2, True))
    for name, nproc, dp, tp, all_gather in layouts:
        dump = tmp_path / name
        _resume_from(base, dump)
        r = _torchrun(dump, nproc, f"--parallelism.data_parallel_shard_degree={dp}",
                      f"--parallelism.tensor_parallel_degree={tp}", f"--qat.fsdp_nvfp4_all_gather={all_gather}".lower())
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert "at step 2" in r.stdout
        runs[name] = losses(dump)
    for name, got in runs.items():
        assert sorted(got) == [3, 4, 5, 6, 7], name
        assert abs(got[3] - ref[3]) <= 1e-5 * abs(ref[3]), (name, got[3], ref[3])
        for s in (4, 5, 6, 7):
            assert abs(got[s] - ref[s]) <= 1e-3 * abs(ref[s]), (name, s, got[s], ref[s])
    assert runs["single"] == {s: ref[s] for s in runs["single"]}  # same layout: bit-identical
    assert runs["fsdp2-nvfp4-ag"] == runs["fsdp2"]  # the all-gather format changes no bit
    assert runs["fsdp2xtp2-nvfp4-ag"] == runs["fsdp2xtp2"]

    float_run = tmp_path / "float"
    _resume_from(base, float_run)
    r = train(float_run, *COMMON, "--qat.enable=false")
    assert r.returncode == 0, r.stderr
    # QAT changes the forward by far more than any sharding layout does.
    qat_effect = abs(losses(float_run)[3] - ref[3])
    layout_noise = max(abs(got[3] - ref[3]) for got in runs.values())
    assert qat_effect > 1e-5 * abs(ref[3]) and qat_effect > 5 * layout_noise, (qat_effect, layout_noise)
