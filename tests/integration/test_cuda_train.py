"""On one GPU: the debug recipe trains with QAT under NCCL, with the same losses bit for bit
whether the Triton kernels or the reference quantizer run."""

import pytest

from tests.integration.helpers import FAST, losses, train

pytestmark = pytest.mark.cuda


def test_debug_recipe_losses_equal_with_kernels_on_and_off(tmp_path):
    args = [
        *FAST,
        "--training.device=cuda",
        "--training.steps=8",
        "--metrics.log_freq=1",
        "--checkpoint.enable=false",
        "--training.mixed_precision_param=bfloat16",
    ]
    runs = {}
    for flag in ("0", "1"):
        r = train(tmp_path / flag, *args, env={"NVFP4_REFERENCE": flag})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[flag] = losses(tmp_path / flag)
    assert runs["0"] == runs["1"] and len(runs["0"]) == 8


def test_nvfp4_all_gather_changes_no_loss_on_gpu(tmp_path):
    """FSDP2 all-gathers QAT weights as NVFP4 under NCCL (world 1: FSDP2's copy path)."""
    args = [
        *FAST,
        "--training.device=cuda",
        "--training.steps=6",
        "--metrics.log_freq=1",
        "--checkpoint.enable=false",
        "--training.mixed_precision_param=bfloat16",
    ]
    runs = {}
    for flag in ("false", "true"):
        r = train(tmp_path / flag, *args, f"--qat.fsdp_nvfp4_all_gather={flag}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[flag] = losses(tmp_path / flag)
    assert runs["false"] == runs["true"] and len(runs["false"]) == 6


@pytest.mark.parametrize("qat", ["true", "false"])
def test_compiled_training_with_every_activation_checkpointing(tmp_path, qat):
    """compile + activation_checkpoint none / selective / full (the 8B recipe's) train, QAT on and
    off, in bf16 with FSDP2: full checkpointing around compiled blocks stopped at the first backward
    with CheckpointError. Checkpointing recomputes; it changes the losses at most by Inductor's
    different fusion of the recomputed bf16 work."""
    args = [
        *FAST,
        "--training.device=cuda",
        "--training.steps=3",
        "--metrics.log_freq=1",
        "--training.compile=true",
        "--checkpoint.enable=false",
        "--training.mixed_precision_param=bfloat16",
        f"--qat.enable={qat}",
    ]
    runs = {}
    for ac in ("none", "selective", "full"):
        r = train(tmp_path / ac, *args, f"--training.activation_checkpoint={ac}")
        assert r.returncode == 0, (ac, r.stderr[-3000:])
        runs[ac] = losses(tmp_path / ac)
    for ac in ("selective", "full"):
        assert sorted(runs[ac]) == [1, 2, 3] and all(abs(runs[ac][s] - runs["none"][s]) < 1e-2 for s in runs[ac]), runs
