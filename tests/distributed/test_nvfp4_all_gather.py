"""NVFP4 all-gather for FSDP2 (nvfp4/fsdp.py) on gloo: the numerics of the bf16 all-gather bit
for bit, over training steps, with the bytes on the wire measured."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

import nvfp4
from benchmarks.fsdp_all_gather_bytes import step_bytes
from benchmarks.fsdp_wire_model import gathered_bytes
from nvfp4.fsdp import precompute_weight_scales, precompute_weight_scales_when_stale
from nvfp4.sharded import local
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.training.config import Optimizer
from nvfp4_titan.training.optim import build_optimizer
from tests.distributed.harness import (
    DEVICES,
    backend,
    run_ranks,
    skip_unless_ranks,
)
from tests.distributed.parity import ARGS, gathered_codes_parity, reference, sharded

CPU = torch.device("cpu")


def _sharded(
    ref: Transformer, dp: int, tp: int, param_dtype: str, all_gather: bool, device: torch.device = CPU
) -> Transformer:
    return sharded(ref, (1, dp, tp), device, all_gather, param_dtype)[0]


def _reference(mode: str = "pow2", device: torch.device = CPU) -> tuple[Transformer, torch.Tensor]:
    """The unsharded QAT model; ``mode`` amax makes every amax bit matter (pow2 rounds)."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return reference(nvfp4.QATConfig(tensor_scale=mode), device), tokens.to(device)


def _codes_worker(rank: int, world: int, dp: int, tp: int, mode: str, device_type: str = "cpu") -> None:
    """Both block scale rules, in this one process group: every weight arrives from the NVFP4
    all-gather as the unsharded model quantizes it."""
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    for rule in nvfp4.BLOCK_SCALE_RULES:
        gathered_codes_parity((1, dp, tp), mode, device, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dp,tp,mode",
    [(1, 1, "pow2"), (2, 1, "pow2"), (2, 1, "amax"), (1, 2, "amax"), (2, 2, "amax")],
    ids=["fsdp1", "fsdp2", "fsdp2-amax", "tp2-amax", "fsdp2xtp2-amax"],
)
def test_gathered_codes_equal_unsharded(dp, tp, mode, device):
    skip_unless_ranks(device, dp * tp)
    run_ranks(_codes_worker, dp * tp, dp, tp, mode, device, backend=backend(device))


def _training_worker(rank: int, world: int, dp: int, tp: int, mode: str) -> None:
    ref, tokens = _reference(mode)
    runs = {}
    precomputed, scales = [], []
    for run in ("off", "explicit", "hook"):  # the bf16 all-gather, NVFP4 with scales set by the loop or a hook
        all_gather = run != "off"
        model = _sharded(ref, dp, tp, "bfloat16", all_gather)
        if run == "hook":
            precompute_weight_scales_when_stale(model)
            model.register_forward_pre_hook(lambda m, args: precomputed.append(_scales_missing(m)), prepend=True)
            first = nvfp4.qat_linears(model)[0].weight._local_tensor  # FSDP's DTensor: the wrapped shard
            model.register_forward_pre_hook(lambda m, args: scales.append(first.scale))  # after the hook
        opt = build_optimizer(model, Optimizer(lr=1e-2))
        losses = []
        for _ in range(3):
            if run == "explicit":
                precompute_weight_scales(model)
            if run == "hook":  # a second forward in the step (an eval) finds the scales set
                with torch.no_grad():
                    model(tokens)
            loss = model(tokens).float().square().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        state = model.state_dict()
        assert all(type(local(v)) is torch.Tensor for v in state.values())  # checkpoints hold plain tensors
        runs[run] = (losses, {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()})
        if run == "explicit":  # the optimizer step cleared the scales: a forward now is an error
            with pytest.raises(RuntimeError, match="precompute_weight_scales"):
                model(tokens)
    # the hook found the scales missing at the first forward of each step and computed them once
    assert precomputed == [True, False] * 3, precomputed
    assert all(scales[i] is scales[i + 1] is not scales[i + 2] for i in (0, 2)) and scales[-1] is scales[-2]
    loss_off, sd_off = runs["off"]
    for run in ("explicit", "hook"):
        loss_on, sd_on = runs[run]
        assert all(torch.equal(a, b) for a, b in zip(loss_off, loss_on)), (run, loss_off, loss_on)
        assert sd_off.keys() == sd_on.keys()
        for k in sd_off:
            assert torch.equal(sd_off[k], sd_on[k]), (run, k)


def _scales_missing(model: Transformer) -> bool:
    """Whether the forward about to run would find no tensor scales without the stale-scales hook."""
    return any(m.weight._local_tensor.scale is None for m in nvfp4.qat_linears(model))


@pytest.mark.parametrize("dp,tp,mode", [(2, 1, "pow2"), (2, 2, "amax")], ids=["fsdp2", "fsdp2xtp2-amax"])
def test_training_steps_bit_identical_to_bf16_all_gather(dp, tp, mode):
    """bf16 mixed precision, AdamW, clipping: 3 steps of losses and the final weights equal, with the
    tensor scales computed by the training loop or by ``precompute_weight_scales_when_stale``."""
    run_ranks(_training_worker, dp * tp, dp, tp, mode)


def _bytes_worker(rank: int, world: int) -> None:
    off, qat = step_bytes("debug", False, world)
    on, _ = step_bytes("debug", True, world)
    # Each block is gathered twice (forward, backward); a QAT weight element costs 2 bytes
    # in bf16 and 4.5 bits = 9/16 byte as NVFP4 (code + its share of an E4M3 block scale).
    assert off - on == 2 * qat * (2 - 9 / 16), (off, on)
    # the FSDP step model's byte counts (benchmarks/fsdp_wire_model.py), from the shapes alone
    assert (off, on) == (gathered_bytes(FLAVORS["debug"], False), gathered_bytes(FLAVORS["debug"], True))


def test_bytes_on_the_wire():
    run_ranks(_bytes_worker, 2)
