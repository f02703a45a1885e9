"""Fused groups share their QAT call under tensor parallelism: q/k/v and gate/up quantize their
common (local) input once and all-reduce the group's weight amax once (``forward_shared`` with
DTensor weights), and the outputs and every gradient stay bitwise those of the per-module path
(each linear its own QAT call). TP=2 and FSDP=2 x TP=2 on gloo; NCCL under ``.ci/gpu multi``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import nvfp4
import nvfp4.fsdp
import nvfp4.qat.linear
from tests.distributed.harness import DEVICES, backend, run_ranks, skip_unless_ranks
from tests.distributed.parity import ARGS, _batch, reference, sharded


def expected(act: str, all_gather: bool) -> tuple[dict, dict]:
    """Per layer, forward, (shared, per-module): QAT calls q/k/v, wo, w1/w3, w2 (7 per module);
    amax all-reduces: the q/k/v and w1/w3 weights once per group (once per weight per module),
    wo's and w2's weights, each together with its rowwise-sharded dynamic input in one
    all-reduce (``global_amaxes_and_scales``); with the NVFP4 all-gather the weights' scales are
    precomputed, and only wo's and w2's dynamic inputs are reduced."""
    if all_gather:
        inputs = 2 if act == "dynamic" else 0
        return {"qat_calls": 4, "all_reduces": inputs}, {"qat_calls": 7, "all_reduces": inputs}
    return {"qat_calls": 4, "all_reduces": 4}, {"qat_calls": 7, "all_reduces": 7}


class Counts:
    """Counts the QAT linear calls and the amax all-reduces while active."""

    def __init__(self) -> None:
        self.qat_calls = self.all_reduces = 0
        self._qat, self._all_reduce = nvfp4.qat.linear.qat_linear, dist.all_reduce

    def __enter__(self) -> Counts:
        def qat(*a, **k):
            self.qat_calls += 1
            return self._qat(*a, **k)

        def all_reduce(*a, **k):
            self.all_reduces += 1
            return self._all_reduce(*a, **k)

        nvfp4.qat.linear.qat_linear, dist.all_reduce = qat, all_reduce
        return self

    def __exit__(self, *exc) -> None:
        nvfp4.qat.linear.qat_linear, dist.all_reduce = self._qat, self._all_reduce

    def per_layer(self) -> dict[str, float]:
        return {"qat_calls": self.qat_calls / ARGS.n_layers, "all_reduces": self.all_reduces / ARGS.n_layers}


def _step(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Logits, every parameter's local gradient, and the forward's counts per layer."""
    with Counts() as counts:
        logits = model(x)
    logits.flatten(0, 1).float().logsumexp(-1).mean().backward()  # a loss through every logit
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        grads[name] = g.detach().clone()
        p.grad = None
    logits = logits.to_local() if hasattr(logits, "to_local") else logits
    return logits.detach().clone(), grads, counts.per_layer()


def shared_group_worker(rank: int, world: int, dp: int, tp: int, cases: list[tuple], device_type: str) -> None:
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    failures = []
    for act, mode, param_dtype, all_gather in cases:
        ref = reference(nvfp4.QATConfig(tensor_scale=mode, activation_scale=act), device)
        model, mesh = sharded(ref, (1, dp, tp), device, all_gather, param_dtype=param_dtype)
        x = _batch(device)[0].chunk(dp)[mesh["dp_shard"].get_local_rank()]
        if all_gather:
            nvfp4.fsdp.precompute_weight_scales(model)
        if act == "static":
            nvfp4.calibrate(model, [x])
        shared = _step(model, x)
        orig = nvfp4.qat.linear._shares_input
        nvfp4.qat.linear._shares_input = lambda linears: False  # the per-module path: each linear alone
        try:
            each = _step(model, x)
        finally:
            nvfp4.qat.linear._shares_input = orig
        case = (act, mode, param_dtype, all_gather)
        want = expected(act, all_gather)
        if (shared[2], each[2]) != want:
            failures.append(f"{case}: per layer, shared {shared[2]} and per-module {each[2]}, want {want}")
        if not torch.equal(shared[0], each[0]):
            failures.append(f"{case}: logits differ")
        differ = [n for n, g in shared[1].items() if not torch.equal(g, each[1][n])]
        if differ:
            failures.append(f"{case}: gradients differ: {differ}")
    assert not failures, "\n".join(failures)


# (activation scale, tensor scale, FSDP's parameter dtype, NVFP4 all-gather)
CASES = [("dynamic", "pow2", "float32", False), ("static", "amax", "float32", False)]
FSDP_CASES = [("dynamic", "amax", "bfloat16", False), ("dynamic", "pow2", "bfloat16", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 2)], ids=["tp2", "fsdp2xtp2"])
def test_fused_groups_share_one_qat_call_under_tp(dp, tp, device):
    skip_unless_ranks(device, dp * tp)
    cases = CASES + (FSDP_CASES if dp > 1 else [])
    run_ranks(shared_group_worker, dp * tp, dp, tp, cases, device, backend=backend(device))
