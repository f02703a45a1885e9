"""Where the tensor-parallel QAT training step's extra time goes: bf16 vs QAT under TP, side by side.

    torchrun --standalone --nproc_per_node=2 benchmarks/profile_tp.py [--layers 4] \
        [--configs bf16-sel qat-sel qat-sel-noar bf16-none qat-none qat-sel-nowar] [--out DIR]

Every rank builds the recipe's model exactly as train.py does (``Trainer._build_model``: QAT
prepare, TP plan, per-block compile, FSDP2; ``Trainer._materialize``; ``build_optimizer``) with
``--layers`` blocks, data-parallel degree 1 and tensor-parallel degree = world size, and runs
``Trainer._train_step`` on random tokens (kept on the GPU: the loader's 64 KB host copy is left
out). Configurations (``--configs``):

- ``bf16-<ac>``, ``qat-<ac>``: QAT off / on, ``<ac>`` = ``sel`` (selective activation
  checkpointing, the recipe's: QAT linears of the MLP run as the opaque ``nvfp4::qat_linear`` op)
  or ``none`` (every QAT linear traced by Inductor) or ``full``.
- ``qat-<ac>-noar``: the global-amax all-reduces (``nvfp4.sharded.reduce_amax``) skipped, and
  ``-nowar``: only the weights' skipped (2-D tensors; the activations' kept). Numerics change: for
  timing only, to measure what the per-linear all-reduces cost.

Per configuration: wall ms per step (median of ``--steps`` unprofiled steps, each ends with the
trainer's loss ``.item()``); the host ms to enqueue one step while the GPU is held busy ahead
(``torch.cuda._sleep``; a figure near the hold means the CPU blocked: a host sync or a full launch
queue), and the synchronizing calls ``torch.cuda.set_sync_debug_mode`` reports in it; from
``torch.profiler`` over ``--profile-steps`` steps: GPU-busy ms (union of kernel intervals, with and
without NCCL), kernels per step, NCCL kernels per step and their ms (all-reduces apart), the
CPU ms in the opaque QAT ops and in compiled regions, the top kernels; and from Dynamo's counters
and logs: graph breaks, recompiles, graphs compiled. Rank 0 writes one JSON row per configuration
to ``<out>/profile_tp.jsonl`` as each finishes and prints a markdown table at the end.

CPU check of the logic (gloo, tiny model): ``--device cpu --flavor debug --layers 1 [--no-compile]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nvfp4.sharded  # noqa: E402
from nvfp4_titan.data.packing import Batch  # noqa: E402
from nvfp4_titan.models.llama3 import FLAVORS  # noqa: E402
from nvfp4_titan.parallel import build_mesh, resolve_dims  # noqa: E402
from nvfp4_titan.training.config import load_config  # noqa: E402
from nvfp4_titan.training.loss import cross_entropy  # noqa: E402
from nvfp4_titan.training.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr  # noqa: E402
from nvfp4_titan.training.runtime import ScheduledGC  # noqa: E402
from nvfp4_titan.training.trainer import Trainer, model_args  # noqa: E402

AC = {"sel": "selective", "none": "none", "full": "full"}
DEFAULT_CONFIGS = ["bf16-sel", "qat-sel", "qat-sel-noar", "bf16-none", "qat-none", "qat-sel-nowar"]
_REDUCE_AMAX = nvfp4.sharded.reduce_amax


def parse_config(name: str) -> tuple[bool, str, str | None]:
    """'qat-sel-noar' -> (qat, activation_checkpoint, all-reduce patch)."""
    parts = name.split("-")
    if (
        len(parts) not in (2, 3)
        or parts[0] not in ("bf16", "qat")
        or parts[1] not in AC
        or (len(parts) == 3 and (parts[2] not in ("noar", "nowar") or parts[0] != "qat"))
    ):
        raise ValueError(f"configuration {name!r}: want bf16|qat-sel|none|full[-noar|-nowar] (QAT only)")
    return parts[0] == "qat", AC[parts[1]], parts[2] if len(parts) == 3 else None


def patch_reduce_amax(skip: str | None) -> None:
    """Skip the global-amax all-reduces: all of them (noar) or the weights' (nowar, 2-D tensors)."""
    if skip is None:
        nvfp4.sharded.reduce_amax = _REDUCE_AMAX
        return

    def reduce_amax(local_amax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if skip == "noar" or like.ndim == 2:
            return local_amax
        return _REDUCE_AMAX(local_amax, like)

    nvfp4.sharded.reduce_amax = reduce_amax


class DynamoLog(logging.Handler):
    """Counts Dynamo's graph-break and recompile log records (TORCH_LOGS=graph_breaks,recompiles)."""

    NAMES = (
        "torch._dynamo.guards.__recompiles",
        "torch._dynamo.exc.__graph_breaks",
        "torch._dynamo.symbolic_convert.__graph_breaks",
        "torch._dynamo.convert_frame.__graph_breaks",
        "torch._dynamo.convert_frame.__recompiles",
    )

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []
        for n in self.NAMES:
            logging.getLogger(n).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        kind = "recompiles" if "recompiles" in record.name else "graph_breaks"
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001  (a bad format string must not stop the run)
            msg = str(record.msg)
        self.records.append((kind, msg))

    def take(self) -> list[tuple[str, str]]:
        out, self.records = self.records, []
        return out


class RandomLoader:
    """``GlobalBatchLoader``'s interface: one micro-batch (a ``Batch``) per step, the same on every
    rank (data-parallel degree 1), on the device already."""

    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device, n: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device) for _ in range(n)]
        self.i = 0

    @property
    def consumed(self) -> int:
        return self.i

    def counted(self, b: int) -> int:
        t = self.batches[b % len(self.batches)]
        return t.shape[0] * (t.shape[1] - 1)

    def next(self) -> list[Batch]:
        t = self.batches[self.i % len(self.batches)]
        self.i += 1
        return [Batch.from_windows(t)]


def build_trainer(args, qat: bool, ac: str, mesh, device, rank: int, world: int) -> Trainer:
    overrides = [
        f"--qat.enable={str(qat).lower()}",
        "--qat.start_step=0",
        f"--training.activation_checkpoint={ac}",
        f"--training.compile={str(not args.no_compile).lower()}",
        "--training.steps=100000",
        "--parallelism.data_parallel_shard_degree=1",
        f"--parallelism.tensor_parallel_degree={world}",
        f"--training.device={device.type}",
        "--lr_scheduler.warmup_steps=0",
        "--checkpoint.enable=false",
        "--checkpoint.initial_load_path=",
        "--checkpoint.initial_load_in_hf=false",
    ]
    if device.type == "cpu":
        overrides.append("--training.mixed_precision_param=float32")  # as debug_cpu; gloo has no bf16 MAX
    cfg = load_config(ROOT / "recipes" / f"{args.recipe}.toml", overrides)
    tr = Trainer(cfg)
    tr.device, tr.rank, tr.world, tr.mesh = device, rank, world, mesh
    margs = model_args(cfg, 0).with_(n_layers=args.layers)
    if args.flavor:
        f = FLAVORS[args.flavor]
        margs = margs.with_(
            dim=f.dim, n_heads=f.n_heads, n_kv_heads=f.n_kv_heads, ffn_dim=f.ffn_dim, vocab_size=f.vocab_size
        )
    tr.args = margs
    tr._build_model()
    tr._build_teacher()  # none: the recipe's qat.loss is ce
    tr._materialize()
    tr.optimizer = build_optimizer(tr.model, cfg.optimizer)
    seq = args.seq or cfg.training.seq_len
    tr.cfg.training.seq_len = seq
    tr.loader = RandomLoader(cfg.training.local_batch_size, seq, margs.vocab_size, device)
    tr.ckpt_folder = Path(tempfile.gettempdir()) / "profile_tp_no_checkpoints"
    return tr


def train_step(tr: Trainer) -> None:
    """One step as Trainer.run runs it (``_prepare_qat``, ``_train_step``: ends with the loss's .item())."""
    tr.step += 1
    tr._prepare_qat()
    tr._train_step()


def enqueue_step(tr: Trainer) -> None:
    """``Trainer._train_step`` without its loss ``.item()`` and non-finite check: only enqueues work."""
    tr.step += 1
    tr._prepare_qat()
    tokens = tr.loader.counted(tr.loader.consumed)
    micro = tr.loader.next()
    loss_sum = torch.zeros((), device=tr.device)
    for mb in micro:
        loss = cross_entropy(tr.model(mb.inputs, mb.segments), mb.labels) / tokens
        loss.backward()
        loss_sum += loss.detach()
    clip_grad_norm_(tr.model.parameters(), tr.cfg.training.max_norm or math.inf)
    set_lr(tr.optimizer, lr_at(tr.step, tr.cfg.optimizer.lr, tr.cfg.training.steps, tr.cfg.lr_scheduler))
    dist.all_reduce(loss_sum)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_time(tr: Trainer, hold_ms: float, cycles_per_ms: float) -> dict:
    """Host ms to enqueue one step while the GPU spins ``hold_ms`` ahead, and the synchronizing
    calls torch reports during it."""
    sync(tr.device)
    dist.barrier()
    sync(tr.device)
    if tr.device.type == "cuda":
        if hold_ms > 0:
            torch.cuda._sleep(int(hold_ms * cycles_per_ms))
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        enqueue_step(tr)
        host = (time.perf_counter() - t) * 1e3
    if tr.device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    t = time.perf_counter()
    sync(tr.device)
    drain = (time.perf_counter() - t) * 1e3
    syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
    return {"host_ms": host, "drain_ms": drain, "syncs": len(syncs), "sync_msgs": dict(Counter(syncs).most_common(5))}


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1e30
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _short(name: str, n: int = 90) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def profile_steps(tr: Trainer, steps: int, trace: Path | None) -> dict:
    """torch.profiler over ``steps`` training steps: GPU busy, kernels, NCCL, CPU-side op costs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.type == "cuda" else [])
    sync(tr.device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            train_step(tr)
        sync(tr.device)
        wall = (time.perf_counter() - t) * 1e3 / steps
    if trace is not None:
        import gzip
        import shutil

        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    events = prof.events()
    # Device-side events less the user annotations the profiler also puts on the GPU timeline
    # ("nccl:all_reduce", "Optimizer.step#AdamW.step"): they span kernels and would count twice.
    kern = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith(("nccl:", "ProfilerStep"))
        and "#" not in e.name
    ]
    qat_kern = [
        e
        for e in kern
        if any(k in e.name for k in ("_quantize_kernel", "_amax_kernel", "_dequantize_kernel", "_tensor_scale_kernel"))
    ]
    nccl = [e for e in kern if "nccl" in e.name.lower()]
    compute = [e for e in kern if "nccl" not in e.name.lower()]
    iv = lambda es: [(e.time_range.start, e.time_range.end) for e in es]  # noqa: E731
    by_name: dict[str, list[float]] = {}
    for e in kern:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
    top = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in by_name.items()), reverse=True)[:12]
    ar = [e for e in nccl if "allreduce" in e.name.lower().replace("_", "")]
    # CPU side: the opaque QAT ops, compiled regions, syncs, launches, collectives.
    cpu: dict[str, list[float]] = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        n = e.name
        key = (
            "Torch-Compiled Region"
            if n.startswith("Torch-Compiled Region")
            else n
            if n
            in (
                "nvfp4::qat_linear",
                "nvfp4::qat_linear_backward",
                "CompiledFunction",
                "CompiledFunctionBackward",
                "cudaStreamSynchronize",
                "cudaDeviceSynchronize",
                "cudaEventSynchronize",
                "cudaMemcpyAsync",
                "cudaLaunchKernel",
                "cuLaunchKernel",
                "cuLaunchKernelEx",
                "aten::_local_scalar_dense",
                "_c10d_functional::all_reduce_",
                "_c10d_functional::all_reduce",
                "_c10d_functional::wait_tensor",
                "c10d::allreduce_",
                "nvfp4::quantize",
                "nvfp4::amax",
            )
            else None
        )
        if key:
            cpu.setdefault(key, []).append(e.cpu_time_total / 1e3)
    cpu_rows = {k: {"calls": len(v) / steps, "ms": sum(v) / steps} for k, v in sorted(cpu.items())}
    regions = sorted({e.name for e in events if e.name.startswith("Torch-Compiled Region")})
    self_cpu = sorted(
        ((a.self_cpu_time_total / steps / 1e3, a.count / steps, a.key) for a in prof.key_averages()), reverse=True
    )[:15]
    return {
        "profiled_wall_ms": wall,
        "gpu_busy_ms": _union_ms(iv(kern)) / steps,
        "compute_busy_ms": _union_ms(iv(compute)) / steps,
        "kernels": len(kern) / steps,
        "compute_kernel_ms": sum(e.time_range.elapsed_us() for e in compute) / 1e3 / steps,
        "nccl_kernels": len(nccl) / steps,
        "nccl_ms": sum(e.time_range.elapsed_us() for e in nccl) / 1e3 / steps,
        "nccl_allreduce": len(ar) / steps,
        "nccl_allreduce_ms": sum(e.time_range.elapsed_us() for e in ar) / 1e3 / steps,
        "qat_kernels": len(qat_kern) / steps,
        "qat_kernel_ms": sum(e.time_range.elapsed_us() for e in qat_kern) / 1e3 / steps,
        "nccl_by_kind": {k: round(v / steps, 2) for k, v in Counter(_short(e.name, 60) for e in nccl).items()},
        "top_kernels": [{"ms": round(ms, 3), "calls": c, "name": _short(n)} for ms, c, n in top],
        "cpu_ops": cpu_rows,
        "compiled_region_names": regions,
        "top_self_cpu": [{"ms": round(ms, 3), "calls": c, "name": _short(n, 70)} for ms, c, n in self_cpu],
    }


def run_config(
    args, name: str, mesh, device, rank: int, world: int, dlog: DynamoLog, cycles_per_ms: float, out: Path
) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    qat, ac, skip = parse_config(name)
    torch._dynamo.reset()
    counters.clear()
    dlog.take()
    patch_reduce_amax(skip)
    torch.manual_seed(0)
    tr = build_trainer(args, qat, ac, mesh, device, rank, world)
    t = time.perf_counter()
    for _ in range(args.warmup):
        train_step(tr)
    sync(device)
    warmup_s = time.perf_counter() - t
    logged_warm = dlog.take()
    gb_warm = sum(counters["graph_break"].values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls = []
    with ScheduledGC(tr.cfg.training.gc_freq) as collector:  # as Trainer.run
        for _ in range(args.steps):
            sync(device)
            t = time.perf_counter()
            train_step(tr)  # ends with .item(): synchronous
            sync(device)
            walls.append((time.perf_counter() - t) * 1e3)
            collector.tick()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    hosts = [host_time(tr, args.hold_ms, cycles_per_ms) for _ in range(2)]
    host = min(hosts, key=lambda h: h["host_ms"])
    free = [host_time(tr, 0.0, cycles_per_ms) for _ in range(3)]  # GPU not held: launch-bound if drain ~ 0
    host["free_ms"] = statistics.median(f["host_ms"] for f in free)
    host["free_drain_ms"] = statistics.median(f["drain_ms"] for f in free)
    trace = out / f"trace_{name}_rank{rank}.json" if args.trace and rank == 0 else None
    prof = profile_steps(tr, args.profile_steps, trace)
    logged_after = dlog.take()
    stats = counters["stats"]
    row = {
        "config": name,
        "qat": qat,
        "activation_checkpoint": ac,
        "amax_allreduce": {None: "all", "noar": "none", "nowar": "activations only"}[skip],
        "layers": args.layers,
        "rank": rank,
        "warmup_s": warmup_s,
        "wall_ms": statistics.median(walls),
        "wall_ms_min": min(walls),
        "walls": [round(w, 2) for w in walls],
        "peak_gib": peak,
        **{f"host_{k}": v for k, v in host.items()},
        "hold_ms": args.hold_ms,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_breaks_warmup": gb_warm,
        "graph_break_reasons": {_short(k, 200): v for k, v in counters["graph_break"].items()},
        "recompiles_logged": sum(1 for k, _ in logged_warm + logged_after if k == "recompiles"),
        "recompiles_after_warmup": sum(1 for k, _ in logged_after if k == "recompiles"),
        "graph_break_logs": sum(1 for k, _ in logged_warm + logged_after if k == "graph_breaks"),
        "recompile_reasons": [_short(m, 300) for k, m in logged_warm + logged_after if k == "recompiles"][:6],
        "unique_graphs": stats.get("unique_graphs", 0),
        "frames_total": counters["frames"].get("total", 0),
        "frames_ok": counters["frames"].get("ok", 0),
        **prof,
    }
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    patch_reduce_amax(None)
    return row


def table(rows: list[dict]) -> str:
    base = {r["activation_checkpoint"]: r["wall_ms"] for r in rows if not r["qat"]}
    out = [
        "| config | AC | amax all-reduce | wall ms | bf16/this | GPU busy ms | compute busy ms | kernels | QAT kernels "
        "(ms) | NCCL kernels | NCCL ms | NCCL all-reduces (ms) | host enqueue ms (GPU drain after) | host ms, GPU "
        "held | syncs | opaque-op CPU ms (calls) | compiled regions | graph breaks | recompiles | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base.get(r["activation_checkpoint"])
        ops = r["cpu_ops"]
        op_ms = sum(ops.get(k, {}).get("ms", 0) for k in ("nvfp4::qat_linear", "nvfp4::qat_linear_backward"))
        op_calls = sum(ops.get(k, {}).get("calls", 0) for k in ("nvfp4::qat_linear", "nvfp4::qat_linear_backward"))
        held = " (blocked)" if r["host_host_ms"] > 0.95 * r["hold_ms"] else ""
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        out.append(
            f"| {r['config']} | {r['activation_checkpoint']} | {r['amax_allreduce'] if r['qat'] else '-'} | "
            f"{r['wall_ms']:.1f} | {'-' if not b else format(b / r['wall_ms'], '.3f')} | {r['gpu_busy_ms']:.1f} | "
            f"{r['compute_busy_ms']:.1f} | {r['kernels']:.0f} | {r['qat_kernels']:.0f} ({r['qat_kernel_ms']:.1f}) | "
            f"{r['nccl_kernels']:.0f} | {r['nccl_ms']:.1f} | "
            f"{r['nccl_allreduce']:.0f} ({r['nccl_allreduce_ms']:.1f}) | "
            f"{r['host_free_ms']:.1f} ({r['host_free_drain_ms']:.1f}) | "
            f"{r['host_host_ms']:.1f}{held} | {r['host_syncs']} | "
            f"{op_ms:.1f} ({op_calls:.0f}) | {ops.get('Torch-Compiled Region', {}).get('calls', 0):.0f} | "
            f"{r['graph_breaks']} | {r['recompiles_logged']} | {peak} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="llama3_1b_qat")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--flavor", default=None, help="take dims from this flavor (CPU check: debug)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the recipe's)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--hold-ms", type=float, default=600.0, help="GPU spin ahead of the host-time step")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this many seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--trace", action="store_true", help="rank 0 writes a chrome trace per configuration")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args()
    for c in args.configs:
        parse_config(c)
    start = time.perf_counter()
    device = (
        torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(resolve_dims(world, 1, world), device.type)
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    dlog = DynamoLog()
    cycles_per_ms = 0.0
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        a.record()
        torch.cuda._sleep(50_000_000)
        b.record()
        torch.cuda.synchronize()
        cycles_per_ms = 50_000_000 / a.elapsed_time(b)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "profile_tp.jsonl"
    if rank == 0:
        try:
            import triton  # noqa: F401  (only for the versions line)
        except ImportError:
            pass
        meta = {
            "meta": True,
            "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "world": world,
            "args": vars(args) | {"out": str(args.out)},
            "cycles_per_ms": cycles_per_ms,
        }
        jsonl.write_text(json.dumps(meta) + "\n")
        print(json.dumps(meta), flush=True)
    rows = []
    for name in args.configs:
        go = torch.tensor([float(time.perf_counter() - start < args.budget_s)], device=device)
        dist.all_reduce(go, op=dist.ReduceOp.MIN)
        if go.item() == 0:
            if rank == 0:
                print(f"budget: {name} and later configurations not run", flush=True)
            break
        if rank == 0:
            print(f"=== {name} (t={time.perf_counter() - start:.0f}s)", flush=True)
        row = run_config(args, name, mesh, device, rank, world, dlog, cycles_per_ms, args.out)
        gathered = [None] * world
        dist.all_gather_object(
            gathered,
            {
                k: row[k]
                for k in (
                    "wall_ms",
                    "host_host_ms",
                    "host_free_ms",
                    "host_free_drain_ms",
                    "gpu_busy_ms",
                    "compute_busy_ms",
                    "nccl_ms",
                    "nccl_allreduce_ms",
                    "graph_breaks",
                    "recompiles_logged",
                )
            },
        )
        row["per_rank"] = gathered
        rows.append(row)
        if rank == 0:
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "config",
                            "wall_ms",
                            "gpu_busy_ms",
                            "compute_busy_ms",
                            "kernels",
                            "nccl_kernels",
                            "nccl_allreduce",
                            "nccl_ms",
                            "host_host_ms",
                            "host_syncs",
                            "graph_breaks",
                            "recompiles_logged",
                            "unique_graphs",
                            "warmup_s",
                        )
                    }
                ),
                flush=True,
            )
            print(table(rows), flush=True)
    if rank == 0:
        print("\n" + table(rows), flush=True)
        for r in rows:
            print(f"\n## {r['config']}: top kernels (ms per step, calls)")
            for k in r["top_kernels"]:
                print(f"  {k['ms']:8.3f} {k['calls']:6.1f}  {k['name']}")
            print(f"  NCCL: {r['nccl_by_kind']}")
            print(f"  CPU ops: {json.dumps(r['cpu_ops'])}")
            print(f"  top self CPU: {json.dumps(r['top_self_cpu'][:8])}")
            print(f"  graph breaks: {r['graph_break_reasons']}  recompiles: {r['recompile_reasons']}")
            print(f"  host sync messages: {r['host_sync_msgs']}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the gloo exit crash (docs/distributed.md)


if __name__ == "__main__":
    main()
