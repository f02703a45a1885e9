"""What the developer tools in benchmarks/ share, and tests import: the CUDA/Triton check, timing
(CUDA events, torch.profiler), the projections of a Llama block and the 1B training step of bench.py.

Imported as ``benchmarks.utils``: a tool run as ``python benchmarks/X.py`` puts the repository
root on ``sys.path`` first.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import nvfp4
from nvfp4 import kernels
from nvfp4_titan.models.llama3.model import shared_input
from nvfp4_titan.training.loss import cross_entropy

STEP_SEQ, STEP_BATCH = 2048, 4  # the 1B step of build_step: sequence length, batch
STEP_MODES = ("bf16", "qat-dynamic", "qat-static")


def require_cuda(tool: str) -> None:
    """Exit with one line naming ``tool`` unless a CUDA GPU and Triton are there."""
    if not torch.cuda.is_available() or not kernels.HAVE_TRITON:
        sys.exit(f"{tool} needs a CUDA GPU and Triton")


def block_projections(flavor: str) -> list[tuple[str, int, tuple[int, ...]]]:
    """The projections one Llama block runs: (name, K, output widths of the linears sharing x)."""
    from nvfp4_titan.models.llama3 import FLAVORS

    a = FLAVORS[flavor]
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return [
        ("q/k/v", a.dim, (q, kv, kv)),
        ("o", q, (a.dim,)),
        ("gate/up", a.dim, (a.ffn_dim, a.ffn_dim)),
        ("down", a.ffn_dim, (a.dim,)),
    ]


class Projection(torch.nn.Module):
    """Bias-free linears of one input, called as the Llama block calls them (one fused group)."""

    def __init__(self, k: int, widths: tuple[int, ...], qat: bool) -> None:
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for n in widths)
        if qat:
            nvfp4.prepare(self)

    def fused_linear_groups(self) -> list[list[str]]:
        return [[f"linears.{i}" for i in range(len(self.linears))]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return shared_input(tuple(self.linears), x)


def timed(fn, warmup: int = 3, repeat: int = 10, gpu_only: bool = False, samples: list | None = None) -> float:
    """Median milliseconds of fn() on the current stream; each repeat's appended to ``samples``.
    ``gpu_only``: the GPU first spins ~10 ms while the CPU enqueues fn, so that launch latency
    is hidden and the time is the kernels' (a model's many layers hide it the same way when the
    GPU is the bottleneck).
    A QAT projection's fwd+bwd takes up to ~3 ms of CPU to enqueue: a shorter spin let it show."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if gpu_only:
            torch.cuda._sleep(20_000_000)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    if samples is not None:
        samples += times
    return statistics.median(times)


def profiled(fn, iters: int) -> tuple[profile, float, float, float]:
    """Run fn iters times under torch.profiler: (profile, wall ms, GPU-busy ms, kernels) per call."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / iters * 1e3
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return prof, wall, sum(e.device_time for e in events) / iters / 1e3, len(events) / iters


def build_step(mode: str, compile: bool, n_layers: int):
    """One training step of the Llama 1B flavor (``n_layers``) under FSDP world 1, as a closure.
    ``mode``: one of STEP_MODES; batch STEP_BATCH of STEP_SEQ tokens, AdamW, three warm-up steps."""
    from nvfp4_titan.models.llama3 import FLAVORS, Transformer
    from nvfp4_titan.parallel import ParallelDims, build_mesh, parallelize_llama

    # Free the previous step's model first: FSDP's hooks hold it in reference cycles, and left
    # to the cyclic collector its parameters and optimizer state would count in this peak.
    gc.collect()
    torch.cuda.empty_cache()

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1, device_id=torch.device("cuda", 0)
        )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(FLAVORS["1B"].with_(n_layers=n_layers, activation_checkpoint="none"))
    if mode != "bf16":
        nvfp4.prepare(model, nvfp4.QATConfig(activation_scale=mode.split("-")[1]))
    parallelize_llama(model, build_mesh(ParallelDims(1, 1), "cuda"), "bfloat16", "float32", compile)
    model.to_empty(device="cuda")
    model.init_weights()
    for m in nvfp4.qat_linears(model):
        m.reset_calibration()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, 128256, (STEP_BATCH, STEP_SEQ + 1), device="cuda")
    if mode == "qat-static":
        nvfp4.calibrate(model, [tokens[:, :-1]])

    def step():
        logits = model(tokens[:, :-1])
        cross_entropy(logits, tokens[:, 1:], reduction="mean").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step
