"""The initial model of every layout equals the 1-process one bitwise. After one forward/backward
from the same weights and global batch, every parameter's gradient under FSDP=2, TP=2 and
FSDP=2 x TP=2 equals the 1-process gradient to fp32 reduction noise, in every activation mode,
both tensor-scale modes, with and without NVFP4 all-gather; static calibration gives the
unsharded input amaxes; a distillation step (QAD) gives the 1-process gradients, also on packed
examples with masked labels (chat data). On gloo (CPU)
and, under ``.ci/gpu multi``, NCCL (one GPU per rank)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import DEVICES, backend, run_ranks, skip_unless_ranks
from tests.distributed.parity import (
    LAYOUTS,
    compiled_parity_worker,
    distill_parity_worker,
    gradient_parity_worker,
    init_parity_worker,
)

LAYOUT_IDS = ["fsdp2", "tp2", "fsdp2xtp2"]


def _run(worker, device: str, dp: int, tp: int, *args) -> None:
    skip_unless_ranks(device, dp * tp)
    run_ranks(worker, dp * tp, dp, tp, *args, device, backend=backend(device))


# (activation scale, tensor scale, NVFP4 all-gather): amax makes every bit of an amax matter.
CASES = [("dynamic", "pow2", False), ("dynamic", "amax", False), ("static", "amax", False), ("none", "amax", False)]
ALL_GATHER_CASES = [("dynamic", "amax", True), ("static", "pow2", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp,tp", LAYOUTS, ids=LAYOUT_IDS)
def test_gradients_equal_unsharded(dp, tp, device):
    cases = CASES + (ALL_GATHER_CASES if dp > 1 else [])  # NVFP4 all-gather is FSDP's
    _run(gradient_parity_worker, device, dp, tp, cases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dp,tp,all_gather",
    [(*layout, False) for layout in LAYOUTS] + [(2, 2, True)],
    ids=[*LAYOUT_IDS, "fsdp2xtp2-nvfp4-ag"],
)
def test_initial_model_equals_unsharded(dp, tp, all_gather, device):
    _run(init_parity_worker, device, dp, tp, all_gather)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp,tp", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_distillation_gradients_equal_unsharded(dp, tp, device):
    """QAD: the teacher sharded on the student's mesh, its logits replicated under TP; then chat
    data: packed examples with prompt and boundary labels masked, a different number of counted
    labels on each rank, QAD and cross-entropy."""
    _run(distill_parity_worker, device, dp, tp)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_tp_gradients_equal_unsharded(device):
    """The recipes' setting: TP with compiled blocks (Inductor on the CPU too)."""
    _run(compiled_parity_worker, device, 1, 2)
