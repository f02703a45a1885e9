"""The initial model of every layout equals the 1-process one bitwise. After one forward/backward
from the same weights and global batch, every parameter's gradient under FSDP=2, TP=2,
FSDP=2 x TP=2 and HSDP (replicate 2 x shard 2, and x TP 2) equals the 1-process gradient to fp32
reduction noise, in every activation mode, both tensor-scale modes, with and without NVFP4
all-gather; static calibration gives the unsharded input amaxes; a distillation step (QAD) gives
the 1-process gradients, also on packed examples with masked labels (chat data); under HSDP the
NVFP4-gathered codes equal the unsharded ones and no amax is reduced over the replicate dim. On
gloo (CPU) and, under ``.ci/gpu multi``, NCCL (one GPU per rank)."""

from __future__ import annotations

import math

import pytest

from tests.distributed.harness import DEVICES, backend, run_ranks, skip_unless_ranks
from tests.distributed.parity import (
    LAYOUTS,
    compiled_parity_worker,
    distill_parity_worker,
    gradient_parity_worker,
    hsdp_worker,
    init_parity_worker,
)

FSDP_TP = ["fsdp2", "tp2", "fsdp2xtp2"]
HSDP = ["hsdp2x2", "hsdp2x2xtp2"]


def _run(worker, device: str, layout: tuple[int, int, int], *args) -> None:
    world = math.prod(layout)
    skip_unless_ranks(device, world)
    run_ranks(worker, world, layout, *args, device, backend=backend(device))


# (activation scale, tensor scale, NVFP4 all-gather): amax makes every bit of an amax matter.
CASES = [("dynamic", "pow2", False), ("dynamic", "amax", False), ("static", "amax", False), ("none", "amax", False)]
ALL_GATHER_CASES = [("dynamic", "amax", True), ("static", "pow2", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FSDP_TP)
def test_gradients_equal_unsharded(name, device):
    layout = LAYOUTS[name]
    cases = CASES + (ALL_GATHER_CASES if layout[1] > 1 else [])  # NVFP4 all-gather is FSDP's
    _run(gradient_parity_worker, device, layout, cases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,all_gather", [(name, False) for name in FSDP_TP] + [("fsdp2xtp2", True)], ids=[*FSDP_TP, "fsdp2xtp2-nvfp4-ag"]
)
def test_initial_model_equals_unsharded(name, all_gather, device):
    _run(init_parity_worker, device, LAYOUTS[name], all_gather)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FSDP_TP[:2])
def test_distillation_gradients_equal_unsharded(name, device):
    """QAD: the teacher sharded on the student's mesh, its logits replicated under TP; then chat
    data: packed examples with prompt and boundary labels masked, a different number of counted
    labels on each rank, QAD and cross-entropy."""
    _run(distill_parity_worker, device, LAYOUTS[name])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_tp_gradients_equal_unsharded(device):
    """The recipes' setting: TP with compiled blocks (Inductor on the CPU too)."""
    _run(compiled_parity_worker, device, LAYOUTS["tp2"])


# HSDP: fewer cases than above (8 CPU ranks on 2 cores take ~20 s a case); static calibration
# (reduced over the world) and the NVFP4 all-gather (gathered within the shard group) included.
HSDP_CASES = [("dynamic", "amax", False), ("static", "amax", False), ("dynamic", "amax", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", HSDP)
def test_hsdp_equals_unsharded(name, device):
    """From a fresh init: the initial model bitwise. From one set of weights: one step's gradients
    (the mean over replicate x shard: each replica's shards took other micro-batches), the
    gathered NVFP4 codes and scales bitwise, and the amax all-reduces counted."""
    _run(hsdp_worker, device, LAYOUTS[name], HSDP_CASES)
