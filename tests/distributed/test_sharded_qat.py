"""Per-shard QAT quantizes every weight (and every rowwise input) to the same FP4 codes, block
scales and tensor scales as the unsharded model: FSDP=2, TP=2, FSDP=2 x TP=2 on gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import nvfp4
import nvfp4.qat.autograd
import nvfp4.sharded
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.parallel import ParallelDims, build_mesh, parallelize_llama
from tests.distributed.harness import (
    DEVICES,
    ROWWISE,
    backend,
    cat_nvfp4,
    gather_nvfp4,
    run_ranks,
    skip_unless_ranks,
)


class Recorder:
    """Records every quantize call of the QAT forward: {layer: {"x": (input, q), "w": (weight, q)}}."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[str, dict] = {}
        self.current: list[str] = []
        self.weight_only = set()
        for name, m in model.named_modules():
            if isinstance(m, nvfp4.NVFP4QATLinear):
                m.register_forward_pre_hook(lambda mod, args, name=name: self.current.append(name))
                if m.config.activation_scale == "none":
                    self.weight_only.add(name)
        self._orig = nvfp4.qat.autograd.quantize_for_gemm, nvfp4.qat.autograd.quantize_operands
        nvfp4.qat.autograd.quantize_for_gemm, nvfp4.qat.autograd.quantize_operands = (
            self._quantize,
            self._quantize_operands,
        )

    def _quantize_operands(self, pairs, with_operand=True, operand_scales=None, block_scale_rules=None):
        out = self._orig[1](pairs, with_operand, operand_scales, block_scale_rules)
        for (x, _), (q, _) in zip(pairs, out):
            self._record(x, q)
        return out

    def _quantize(self, x, s, with_operand=True, block_scale_rule="amax"):
        q, operand = self._orig[0](x, s, with_operand, block_scale_rule)
        self._record(x, q)
        return q, operand

    def _record(self, x: torch.Tensor, q: nvfp4.NVFP4) -> None:
        name = self.current[-1]
        entry = self.calls.setdefault(name, {})
        entry["w" if "x" in entry or name in self.weight_only else "x"] = (x.detach().clone(), q)

    def close(self) -> None:
        nvfp4.qat.autograd.quantize_for_gemm, nvfp4.qat.autograd.quantize_operands = self._orig


def _equal(a: nvfp4.NVFP4, b: nvfp4.NVFP4) -> bool:
    return (
        torch.equal(a.packed, b.packed)
        and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
        and torch.equal(a.tensor_scale, b.tensor_scale)
    )


def codes_worker(
    rank: int,
    world: int,
    dp: int,
    tp: int,
    mode: str,
    reduce_amax: bool,
    act: str = "dynamic",
    device_type: str = "cpu",
    rules: tuple[str, ...] = ("amax",),
) -> None:
    """For each block scale rule of ``rules``, in this one process group: the sharded model's codes,
    block scales and tensor scales equal the unsharded model's (the rule chooses per block, so shard
    by shard); rowwise inputs equal quantizing the whole input (block amax mapped to 6)."""
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    if not reduce_amax:  # negative control: each shard uses its own amax
        nvfp4.sharded.reduce_amax = lambda a, like: a
    mesh = build_mesh(ParallelDims(dp, tp), device.type)
    for rule in rules:
        config = nvfp4.QATConfig(tensor_scale=mode, activation_scale=act, block_scale_rule=rule)
        _check_codes(mesh, device, tp, mode, reduce_amax, act, config)


def _check_codes(mesh, device, tp: int, mode: str, reduce_amax: bool, act: str, config: nvfp4.QATConfig) -> None:
    torch.manual_seed(0)
    args = FLAVORS["debug"].with_(n_layers=2)
    ref = Transformer(args)
    ref.init_weights()
    nvfp4.prepare(ref, config)
    ref.to(device)
    tokens = torch.randint(0, args.vocab_size, (2, 32)).to(device)
    if act == "static":
        nvfp4.calibrate(ref, [tokens])
    rec_ref = Recorder(ref)
    ref(tokens)
    rec_ref.close()

    with torch.device("meta"):
        model = Transformer(args)
    nvfp4.prepare(model, config)
    parallelize_llama(model, mesh, "float32", "float32", compile=False)
    model.to_empty(device=device)
    params = {k: v for k, v in ref.state_dict().items() if not k.endswith("input_amax")}
    set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True, strict=False))
    if act == "static":
        for m in nvfp4.qat_linears(model):
            m.reset_calibration()
        nvfp4.calibrate(model, [tokens])
    rec = Recorder(model)
    model(tokens)
    rec.close()

    every = {name for name, m in ref.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}
    assert set(rec_ref.calls) == set(rec.calls) == every and all("w" in c for c in rec.calls.values())
    tp_group = mesh["tp"].get_group()
    mismatches = []
    for name, want in rec_ref.calls.items():
        got = rec.calls[name]
        rowwise = name.endswith(ROWWISE)
        w = cat_nvfp4(gather_nvfp4(got["w"][1], tp_group), 1 if rowwise else 0) if tp > 1 else got["w"][1]
        if not _equal(w, want["w"][1]):
            mismatches.append(f"{name}.weight")
        if rowwise and tp > 1 and act == "dynamic":  # sharded K input: compare with quantizing the whole
            xs = [None] * tp
            dist.all_gather_object(xs, got["x"][0].cpu(), group=tp_group)
            whole = nvfp4.quantize(torch.cat(xs, -1).to(device), tensor_scale_mode=mode)
            if not _equal(cat_nvfp4(gather_nvfp4(got["x"][1], tp_group), -1), whole):
                mismatches.append(f"{name}.input")
    if reduce_amax:
        assert not mismatches, (config.block_scale_rule, mismatches)
    else:
        assert mismatches, "local amaxes gave the same codes: the check cannot fail"


BOTH = ("amax", "four_over_six")
CASES = {  # (FSDP, TP, tensor scale, activation scale, the block scale rules checked in one spawn)
    "fsdp2": (2, 1, "pow2", "dynamic", BOTH),
    "tp2": (1, 2, "pow2", "dynamic", BOTH),
    "fsdp2xtp2": (2, 2, "pow2", "dynamic", BOTH),
    "tp2-amax-scale": (1, 2, "amax", "dynamic", BOTH),
    "tp2-weight-only": (1, 2, "pow2", "none", ("amax",)),
    "tp2-static": (1, 2, "amax", "static", ("amax",)),
    "fsdp2-static": (2, 1, "amax", "static", ("amax",)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp,tp,mode,act,rules", CASES.values(), ids=CASES.keys())
def test_sharded_codes_equal_unsharded(dp, tp, mode, act, rules, device):
    skip_unless_ranks(device, dp * tp)
    run_ranks(codes_worker, dp * tp, dp, tp, mode, True, act, device, rules, backend=backend(device))


def test_negative_control_local_amax_gives_different_codes():
    run_ranks(codes_worker, 2, 1, 2, "amax", False)


def non_finite_calibration_worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    nvfp4.prepare(model, nvfp4.QATConfig(activation_scale="static"))
    x = torch.randn(3, 32)
    if rank == 1:
        x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^0: input amax inf is not finite"):
        nvfp4.calibrate(model, [x])
    assert model[0].input_amax.item() == -1  # left uncalibrated, as before the call


def test_a_nan_on_one_rank_stops_calibration_on_every_rank():
    """A max over ranks need not keep a NaN: rank 0's finite amax would hide rank 1's fault."""
    run_ranks(non_finite_calibration_worker, 2)
