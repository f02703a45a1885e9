"""Workers that compare a sharded QAT model with the 1-process one, shared by the gloo (CPU)
and NCCL (GPU) suites: each runs on every rank of ``run_ranks``."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

import nvfp4
from nvfp4.fsdp import NVFP4GatheredWeight, precompute_weight_scales
from nvfp4.sharded import local
from nvfp4_titan.data.packing import IGNORE, Batch
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.parallel import ParallelDims, build_mesh, dp_rank, parallelize_llama
from nvfp4_titan.training.distill import distillation_loss
from tests.distributed.harness import ROWWISE, cat_nvfp4, gather_nvfp4

Layout = tuple[int, int, int]  # (HSDP replicate, FSDP shard, TP) degrees
LAYOUTS: dict[str, Layout] = {
    "fsdp2": (1, 2, 1),
    "tp2": (1, 1, 2),
    "fsdp2xtp2": (1, 2, 2),
    "hsdp2x2": (2, 2, 1),
    "hsdp2x2xtp2": (2, 2, 2),
}
ARGS = FLAVORS["debug"].with_(n_layers=2)
BATCH, SEQ = 4, 32

# Gradient bound. TP sums partial GEMMs in another order than one GEMM does (fp32, ~1e-7
# relative per element), and that noise flows through every later layer; a QAT input can then
# round to a neighbouring FP4 code now and then. Over a whole parameter the relative L2 error
# of such noise stays below 1e-4, where the bugs this guards against (a missing TP reduction
# of the input gradient) put whole gradients 15-80% off.
GRAD_RTOL = 1e-4


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ + 1), generator=g)
    return w[:, :-1].to(device), w[:, 1:].to(device)


def packed_batch(device: torch.device) -> Batch:
    """BATCH rows of packed examples (2 to 5 a row), labels IGNORE at example boundaries and at
    a share of the positions that differs per row (prompts), so every micro-batch, and every
    data-parallel rank, counts another number of labels."""
    g = torch.Generator().manual_seed(2)
    w = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ + 1), generator=g)
    cuts = [torch.randperm(SEQ - 1, generator=g)[: 1 + r][None] + 1 for r in range(BATCH)]
    segments = torch.cat([(torch.arange(SEQ)[:, None] >= c).sum(-1)[None] for c in cuts])
    prompt = torch.rand(BATCH, SEQ, generator=g) < torch.linspace(0.2, 0.8, BATCH)[:, None]
    boundary = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    boundary[:, :-1] = segments[:, 1:] != segments[:, :-1]
    labels = torch.where(prompt | boundary, IGNORE, w[:, 1:])
    return Batch(w[:, :-1], labels, segments).to(device)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def reference(config: nvfp4.QATConfig, device: torch.device) -> Transformer:
    """The unsharded QAT model from seed 0 (initialized on the CPU, then moved)."""
    torch.manual_seed(0)
    ref = Transformer(ARGS)
    ref.init_weights()
    nvfp4.prepare(ref, config)
    return ref.to(device)


def mesh_of(layout: Layout, device_type: str):
    replicate, shard, tp = layout
    return build_mesh(ParallelDims(shard, tp, replicate), device_type)


def sharded(
    ref: Transformer,
    layout: Layout,
    device: torch.device,
    all_gather: bool = False,
    param_dtype: str = "float32",
    compile: bool = False,
):
    """The same model on the ``layout``'s mesh with ``ref``'s weights (blocks compiled if asked, as
    the trainer compiles them); returns (model, mesh)."""
    mesh = mesh_of(layout, device.type)
    with torch.device("meta"):
        model = Transformer(ARGS)
    nvfp4.prepare(model, nvfp4.qat_linears(ref)[0].config)
    parallelize_llama(model, mesh, param_dtype, "float32", compile=compile, nvfp4_all_gather=all_gather)
    model.to_empty(device=device)
    params = {k: v for k, v in ref.state_dict().items() if not k.endswith("input_amax")}
    set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True, strict=False))
    for m in nvfp4.qat_linears(model):
        m.reset_calibration()
    return model, mesh


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gradient_parity_worker(
    rank: int, world: int, layout: Layout, cases: list[tuple[str, str, bool]], device_type: str
) -> None:
    """``gradient_parity`` of each (activation scale, tensor scale, NVFP4 all-gather) case, in one
    process group (a group costs seconds to start); the error names every failing case."""
    failures = []
    for case in cases:
        try:
            gradient_parity(layout, *case, torch.device(device_type, rank if device_type == "cuda" else 0))
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert not failures, "\n".join(failures)


def gradient_parity(layout: Layout, act: str, mode: str, all_gather: bool, device: torch.device) -> None:
    """One step's gradients (and static input amaxes) of the ``layout`` equal the 1-process run's;
    ``mode`` amax makes every bit of every amax matter."""
    replicate, shard, tp = layout
    dp = replicate * shard
    ref = reference(nvfp4.QATConfig(tensor_scale=mode, activation_scale=act), device)
    # The 1-process run of the same recipe: the global batch in micro-batches of the local batch
    # size, gradients accumulated. A dynamic input scale comes from the micro-batch's amax, so DP
    # rank r (over replicate x shard) must run exactly micro-batch r (the data loader's split).
    micro = list(zip(*(t.chunk(dp) for t in _batch(device))))
    if act == "static":
        nvfp4.calibrate(ref, [x for x, _ in micro])
    for x, y in micro:
        (_loss(ref, x, y) / dp).backward()

    model, mesh = sharded(ref, layout, device, all_gather)
    xl, yl = micro[dp_rank(mesh)[0]]
    if all_gather:  # as the trainer: the weights' scales before any forward
        precompute_weight_scales(model)
    if act == "static":
        nvfp4.calibrate(model, [xl])
        _check_input_amaxes(ref, model, tp)
    _loss(model, xl, yl).backward()

    _check_gradients(ref, model)


def _check_gradients(ref: Transformer, model: Transformer) -> None:
    """Every parameter's gradient, and the global gradient norm, equal the 1-process ones to
    GRAD_RTOL (relative L2)."""
    want = dict(ref.named_parameters())
    errors = {}
    for name, p in model.named_parameters():
        g, g_ref = full(p.grad), want[name].grad
        errors[name] = float((g - g_ref).norm() / g_ref.norm())
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients off by more than {GRAD_RTOL} (relative L2): {bad}"
    norm = torch.stack([full(p.grad).norm() for p in model.parameters()]).norm()
    norm_ref = torch.stack([p.grad.norm() for p in ref.parameters()]).norm()
    assert abs(norm - norm_ref) <= GRAD_RTOL * norm_ref, (float(norm), float(norm_ref))


def distill_parity_worker(rank: int, world: int, layout: Layout, device_type: str) -> None:
    """One QAD step (loss mix, temperature 2, the teacher = the student's float initial weights,
    sharded on the same mesh as the trainer shards it) of the ``layout`` gives the 1-process
    gradients; then on a packed, masked batch (``packed_batch``: chat data) a QAD step and a
    cross-entropy step, each rank's loss divided by its share of the global batch's counted labels,
    as the trainer divides it."""
    dp = layout[0] * layout[1]
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    ref = reference(nvfp4.QATConfig(), device)
    float_weights = {k: v.clone() for k, v in ref.state_dict().items() if not k.endswith("input_amax")}
    teacher_ref = Transformer(ARGS).to(device)
    teacher_ref.load_state_dict(float_weights)
    model, mesh = sharded(ref, layout, device)
    with torch.device("meta"):
        teacher = Transformer(ARGS)
    parallelize_llama(teacher, mesh, "float32", "float32", compile=False)
    teacher.requires_grad_(False)
    teacher.to_empty(device=device)
    set_model_state_dict(teacher, float_weights, options=StateDictOptions(full_state_dict=True))

    def step(student, teacher, mb, loss_kind, divide):
        with torch.no_grad():
            t = teacher(mb.inputs, mb.segments)
        loss, _ = distillation_loss(
            student(mb.inputs, mb.segments), t, mb.labels, loss_kind, kl_weight=0.5, temperature=2.0
        )
        (loss / divide).backward()

    for batch, loss_kind in (
        (Batch(*_batch(device)), "mix"),
        (packed_batch(device), "mix"),
        (packed_batch(device), "ce"),
    ):
        ref.zero_grad()
        model.zero_grad()
        micro, counted = batch.split(BATCH // dp), batch.counted()
        for mb in micro:  # the global batch's token mean, accumulated as the trainer does
            step(ref, teacher_ref, mb, loss_kind, counted)
        step(model, teacher, micro[dp_rank(mesh)[0]], loss_kind, counted / dp)
        _check_gradients(ref, model)


def _check_input_amaxes(ref: Transformer, model: Transformer, tp: int) -> None:
    """Calibrated input amaxes: bitwise where the sharded run computes the linear's input
    exactly as one process does (everything under FSDP; up to layer 0's attention output under
    TP, before the first rowwise partial sum), else to fp32 reduction noise."""
    want = {n: m.input_amax for n, m in ref.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}
    for name, m in model.named_modules():
        if not isinstance(m, nvfp4.NVFP4QATLinear):
            continue
        got = full(m.input_amax)
        exact = tp == 1 or name.startswith("layers.0.attention.")
        if exact:
            assert torch.equal(got, want[name]), (name, float(got), float(want[name]))
        else:
            assert torch.allclose(got, want[name], rtol=1e-5, atol=0), (name, float(got), float(want[name]))
    dist.barrier()


def init_parity_worker(rank: int, world: int, layout: Layout, all_gather: bool, device_type: str) -> None:
    init_parity(layout, all_gather, torch.device(device_type, rank if device_type == "cuda" else 0))


def init_parity(layout: Layout, all_gather: bool, device: torch.device) -> None:
    """``init_weights(seed)`` of the ``layout`` gives the 1-process initial model bitwise."""
    with torch.device(device):
        ref = Transformer(ARGS)
    ref.init_weights(seed=7)
    mesh = mesh_of(layout, device.type)
    with torch.device("meta"):
        model = Transformer(ARGS)
    nvfp4.prepare(model)
    parallelize_llama(model, mesh, "float32", "float32", compile=False, nvfp4_all_gather=all_gather)
    model.to_empty(device=device)
    model.init_weights(seed=7)
    want = dict(ref.named_parameters())
    got = {name: full(p.detach()) for name, p in model.named_parameters()}
    assert got.keys() == want.keys()
    differ = [name for name, t in got.items() if not torch.equal(_plain(t), want[name])]
    assert not differ, f"initial weights differ from the 1-process init: {differ}"
    assert model.output.weight is model.tok_embeddings.weight  # still tied


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside an NVFP4 all-gather wrapper (nvfp4/fsdp.py)."""
    return getattr(t, "_tensor", t)


def compiled_parity_worker(rank: int, world: int, layout: Layout, device_type: str) -> None:
    """One QAT step of the ``layout`` with compiled blocks, as the recipes run, gives the
    1-process eager gradients, the tied embedding's included (its gradient came back as zeros
    under TP + compile before ``nvfp4_titan.parallel.parallelize._plain_output``)."""
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    ref = reference(nvfp4.QATConfig(), device)
    dp = layout[0] * layout[1]
    micro = list(zip(*(t.chunk(dp) for t in _batch(device))))
    for x, y in micro:
        (_loss(ref, x, y) / dp).backward()
    model, mesh = sharded(ref, layout, device, compile=True)
    xl, yl = micro[dp_rank(mesh)[0]]
    _loss(model, xl, yl).backward()
    _check_gradients(ref, model)


def gathered_codes_parity(layout: Layout, mode: str, device: torch.device, rule: str = "amax") -> None:
    """With the NVFP4 all-gather, the codes, block scales and tensor scale each QAT linear receives
    (joined over TP) equal the unsharded model's quantized weight bitwise (weight block scale rule
    ``rule``)."""
    ref = reference(nvfp4.QATConfig(tensor_scale=mode, block_scale_rule=rule), device)
    model, mesh = sharded(ref, layout, device, all_gather=True)
    seen = _gathered_weights(model)
    precompute_weight_scales(model)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(tokens.to(device))
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}
    assert sorted(seen) == sorted(layers)
    tp = layout[2]
    for name, got in seen.items():
        if tp > 1:  # the TP-local weight FSDP gathered: join the TP shards (rowwise split K)
            got = cat_nvfp4(gather_nvfp4(got, mesh["tp"].get_group()), 1 if name.endswith(ROWWISE) else 0)
        want = layers[name].quantized_weight()  # the unsharded model's weight, its group amax
        assert torch.equal(got.packed, want.packed), (rule, name)
        assert torch.equal(got.block_scale.view(torch.uint8), want.block_scale.view(torch.uint8)), (rule, name)
        assert torch.equal(got.tensor_scale, want.tensor_scale), (rule, name)


def _gathered_weights(model: Transformer) -> dict[str, nvfp4.NVFP4]:
    """Forward pre-hooks: the NVFP4 weight each QAT linear receives from the all-gather."""
    seen: dict[str, nvfp4.NVFP4] = {}

    def hook(mod, args, name):
        w = local(mod.weight)
        assert isinstance(w, NVFP4GatheredWeight), f"{name}: weight arrived as {type(w).__name__}, not NVFP4"
        seen[name] = w.nvfp4

    for name, m in model.named_modules():
        if isinstance(m, nvfp4.NVFP4QATLinear):
            m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
    return seen


class AllReduces:
    """Records (op, ranks of the group) of every ``dist.all_reduce`` inside the ``with`` block
    (nvfp4.sharded and nvfp4.calibrate call it through the module attribute)."""

    def __enter__(self) -> list[tuple[str, tuple[int, ...]]]:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self._orig = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            self.calls.append((str(op).rsplit(".", 1)[-1], tuple(sorted(ranks))))
            return self._orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        return self.calls

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._orig


def amax_reductions(layout: Layout, device: torch.device) -> None:
    """Under HSDP the replicas hold identical shards, so the weight amax is all-reduced (MAX) over
    the shard group and the TP group only, never over the replicate dim: one collective per
    sharded dim per step for all weights (NVFP4 all-gather), one per QAT call over TP in a
    forward (without it); static calibration alone ends with a reduction over the world (every
    replica's data).
    The groups expected are built from rank arithmetic (rank = (r x shard + s) x tp + t), not
    from the mesh."""
    replicate, shard, tp = layout
    rank = dist.get_rank()
    r, s, t = rank // (shard * tp), rank // tp % shard, rank % tp
    shard_group = tuple((r * shard + i) * tp + t for i in range(shard))
    tp_group = tuple((r * shard + s) * tp + i for i in range(tp))
    world = tuple(range(replicate * shard * tp))
    ref = reference(nvfp4.QATConfig(activation_scale="static"), device)
    x = _batch(device)[0]

    model, _ = sharded(ref, layout, device, all_gather=True)
    with AllReduces() as calls:
        precompute_weight_scales(model)
    assert calls == [("MAX", shard_group)] + ([("MAX", tp_group)] if tp > 1 else []), calls
    with AllReduces() as calls:
        nvfp4.calibrate(model, [x])
    # the forward reduces a rowwise linear's sharded input over TP; then one MAX over the world
    assert calls[-1] == ("MAX", world) and all(c == ("MAX", tp_group) for c in calls[:-1]), calls

    model, _ = sharded(ref, layout, device)
    nvfp4.calibrate(model, [x])
    with AllReduces() as calls:
        model(x)
    assert all(c == ("MAX", tp_group) for c in calls) and (len(calls) > 0) == (tp > 1), calls


def hsdp_worker(rank: int, world: int, layout: Layout, cases: list[tuple[str, str, bool]], device_type: str) -> None:
    """Every check of an HSDP layout in one process group (8 CPU ranks take seconds to start):
    the initial model, one step's gradients in each case, the NVFP4-gathered codes and the amax
    reductions equal (or run as) the 1-process ones; the error names every failing check."""
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    checks = {
        "init": lambda: init_parity(layout, True, device),
        **{f"gradients {case}": lambda case=case: gradient_parity(layout, *case, device) for case in cases},
        "gathered codes": lambda: gathered_codes_parity(layout, "amax", device),
        "amax reductions": lambda: amax_reductions(layout, device),
    }
    failures = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
