"""train.py in every layout against 1 process: one checkpoint saved by a single process, resumed
under torchrun as 1 process, FSDP=2, TP=2 and FSDP=2 x TP=2 (DCP resharding on load) on the same
global batches, FSDP layouts again with NVFP4 all-gather (which must not change a bit); every
layout from a fresh init of the same seed; resuming on another world size; converting each
layout's checkpoint. On the CPU (gloo) and, under ``.ci/gpu multi``, on GPUs (NCCL), with as
many ranks as there are GPUs.

Bounds: FSDP=2 runs the 1-process micro-batches on two ranks and sums their gradients as one
process accumulates them (power-of-two scalings only), so it is bitwise equal. TP sums partial
GEMMs in another order (~1e-7 relative per element); measured on CPU at most 1e-7 on losses and
grad norms over 5 steps. The bounds below leave 10-100x room for that and are 10-100x under what
the bugs they guard against gave: a missing TP reduction of the QAT input gradient (grad norm
6% off, losses 8e-4 after 4 steps) and fp32 grad norms on the CPU (3e-4 off, changing every
clipped update)."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nvfp4_titan.convert import Options, convert_checkpoint, verify
from tests.distributed.harness import DEVICES, skip_unless_ranks
from tests.integration.helpers import FAST, ROOT, losses, metrics, model_weights, train

COMMON = [
    *FAST,
    "--training.global_batch_size=8",
    "--training.local_batch_size=4",
    "--training.steps=7",
    "--checkpoint.interval=2",
    "--checkpoint.keep_latest_k=0",
    "--metrics.log_freq=1",
    "--lr_scheduler.warmup_steps=0",
    "--optimizer.lr=3e-3",
]
LAYOUTS = {"fsdp2": (2, 1), "tp2": (1, 2), "fsdp2xtp2": (2, 2)}  # name: (FSDP, TP)


def _run(dump, device: str, nproc: int, *overrides: str, torchrun: bool | None = None) -> subprocess.CompletedProcess:
    """train.py with COMMON + overrides: one plain process, or ``nproc`` ranks under torchrun."""
    # One thread per process everywhere, as torchrun gives its workers: CPU reductions split over
    # 2 threads round otherwise, and a 1-process run on 2 threads was not bitwise FSDP=2's (loss
    # 1.5e-5 off at step 2 on a 2-core machine, one FP4 code flipped by Adam's first update).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (nproc > 1 if torchrun is None else torchrun):
        r = train(dump, *COMMON, f"--training.device={device}", *overrides, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    skip_unless_ranks(device, nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "train.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        f"--job.dump_folder={dump}",
        *COMMON,
        f"--training.device={device}",
        *overrides,
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (dump.name, r.stderr[-3000:])
    return r


def _layout(dp: int, tp: int, all_gather: bool = False, replicate: int = 1) -> list[str]:
    return [
        f"--parallelism.data_parallel_replicate_degree={replicate}",
        f"--parallelism.data_parallel_shard_degree={dp}",
        f"--parallelism.tensor_parallel_degree={tp}",
        f"--qat.fsdp_nvfp4_all_gather={str(all_gather).lower()}",
    ]


# HSDP replicate 2 x shard 2: 4 data-parallel ranks, so the global batch of 8 takes local batches of 2.
HSDP = [*_layout(2, 1, replicate=2), "--training.local_batch_size=2"]


def _losses_and_norms(dump) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in metrics(dump) if "loss" in m}


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


def _resume_from(base, dump):
    shutil.copytree(base / "checkpoint" / "step-2", dump / "checkpoint" / "step-2")


def _runnable(device: str, nproc: int) -> bool:
    return device == "cpu" or torch.cuda.device_count() >= nproc


@pytest.mark.parametrize("device", DEVICES)
def test_losses_match_across_layouts_and_qat_matters(tmp_path, device):
    base = tmp_path / "base"
    _run(base, device, 1)
    ref = _losses_and_norms(base)
    runs = {}
    layouts = {
        "single": (1, 1, False),
        **{k: (*v, False) for k, v in LAYOUTS.items()},
        "fsdp2-nvfp4-ag": (2, 1, True),
        "fsdp2xtp2-nvfp4-ag": (2, 2, True),
    }
    for name, (dp, tp, all_gather) in layouts.items():
        if not _runnable(device, dp * tp):
            continue
        dump = tmp_path / name
        _resume_from(base, dump)
        r = _run(dump, device, dp * tp, *_layout(dp, tp, all_gather), torchrun=True)
        assert "at step 2" in r.stdout
        runs[name] = _losses_and_norms(dump)
    for name, got in runs.items():
        assert sorted(got) == [3, 4, 5, 6, 7], name
        for s, (loss, norm) in got.items():
            first = s == 3
            assert _close(loss, ref[s][0], 1e-6 if first else 1e-5), (name, s, loss, ref[s][0])
            assert _close(norm, ref[s][1], 1e-5 if first else 1e-4), (name, s, norm, ref[s][1])
    ref_steps = {s: ref[s] for s in range(3, 8)}
    for name in ("single", "fsdp2", "fsdp2-nvfp4-ag"):  # the 1-process sums: bit-identical
        assert runs[name] == ref_steps, name
    if "fsdp2xtp2" in runs:
        assert runs["fsdp2xtp2-nvfp4-ag"] == runs["fsdp2xtp2"]  # the all-gather format changes no bit

    float_run = tmp_path / "float"  # the same step-2 state, continued without QAT (a new run from it)
    _run(
        float_run,
        device,
        1,
        "--qat.enable=false",
        f"--checkpoint.initial_load_path={base / 'checkpoint' / 'step-2'}",
        "--checkpoint.initial_load_model_only=false",
    )
    # QAT changes the forward by far more than any sharding layout does.
    qat_effect = abs(losses(float_run)[3] - ref[3][0])
    layout_noise = max(abs(got[3][0] - ref[3][0]) for got in runs.values())
    assert qat_effect > 1e-5 * abs(ref[3][0]) and qat_effect > 5 * layout_noise, (qat_effect, layout_noise)


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_init_gives_the_same_first_steps_in_every_layout(tmp_path, device):
    """No checkpoint: each layout initializes from the seed; the first two steps agree."""
    fresh = ["--training.steps=2", "--checkpoint.enable=false"]
    _run(tmp_path / "single", device, 1, *fresh)
    ref = _losses_and_norms(tmp_path / "single")
    for name, (dp, tp) in LAYOUTS.items():
        if not _runnable(device, dp * tp):
            continue
        _run(tmp_path / name, device, dp * tp, *fresh, *_layout(dp, tp))
        got = _losses_and_norms(tmp_path / name)
        assert sorted(got) == [1, 2], name
        # Step 1 from the same initial weights: TP's partial sums are reduction noise (1e-7). Its
        # update moves weights by that noise, which can flip FP4 codes: step 2 under TP=2 read 1.5e-5
        # (loss) and 1e-3 (grad norm) off on CPU. The bugs these guard against show at step 1 (a
        # missing TP reduction: grad norm 6% off; fp32 grad norms: 3e-4).
        assert _close(got[1][0], ref[1][0], 1e-6) and _close(got[1][1], ref[1][1], 1e-5), (name, got[1], ref[1])
        assert _close(got[2][0], ref[2][0], 1e-4) and _close(got[2][1], ref[2][1], 1e-2), (name, got[2], ref[2])
        if tp == 1:
            assert got == ref, name


@pytest.mark.parametrize("device", DEVICES)
def test_resume_on_another_world_size(tmp_path, device):
    """Saved by FSDP=2 with the default global batch (local x DP), resumed by 1 process: the
    changed batch and seed are named with the fix; with it, the losses continue bit for bit.
    And the reverse: saved by 1 process, resumed by TP=2, continuing the uninterrupted run."""
    run = ["--training.global_batch_size=-1", "--training.steps=4", "--lr_scheduler.decay_type=constant"]
    _run(tmp_path / "whole", device, 2, *run)
    dump = tmp_path / "resumed"
    _run(dump, device, 2, *run, "--training.steps=2")
    for extra, message in (
        (["--training.global_batch_size=-1"], "--training.global_batch_size=8"),
        (["--training.global_batch_size=8", "--training.seed=1"], "--training.seed=0"),
    ):
        r = train(dump, *COMMON, f"--training.device={device}", *run, *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    r = _run(dump, device, 1, *run, "--training.global_batch_size=8")
    assert "at step 2" in r.stdout
    assert losses(dump) == losses(tmp_path / "whole")

    run[0] = "--training.global_batch_size=8"
    _run(tmp_path / "whole1", device, 1, *run)
    _run(tmp_path / "to_tp", device, 1, *run, "--training.steps=2")
    _run(tmp_path / "to_tp", device, 2, *run, *_layout(1, 2))
    got, want = losses(tmp_path / "to_tp"), losses(tmp_path / "whole1")
    assert sorted(got) == [1, 2, 3, 4] and all(_close(got[s], want[s], 1e-5) for s in got), (got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_every_layout_converts_to_the_same_nvfp4_checkpoint(tmp_path, device):
    """One step from the seed's initial model (HSDP too) at lr 1e-46 (0 in fp32, so the weights stay the
    initial ones, which every layout draws bitwise alike; at 1e-30 an initial weight of exactly 0
    moved by 1e-30 times a gradient ratio that differs in the last bits), saved by each layout:
    the same weights, converted to bitwise the same NVFP4 tensors, which --verify decodes exactly."""
    still = [
        "--training.steps=1",
        "--checkpoint.interval=1",
        "--optimizer.lr=1e-46",
        "--lr_scheduler.decay_type=constant",
    ]
    want: dict[str, dict[str, torch.Tensor]] = {}
    layouts = {name: (dp * tp, _layout(dp, tp)) for name, (dp, tp) in {"single": (1, 1), **LAYOUTS}.items()}
    layouts["hsdp2x2"] = (4, HSDP)
    for name, (nproc, layout) in layouts.items():
        if not _runnable(device, nproc):
            continue
        _run(tmp_path / name, device, nproc, *still, *layout)
        out = tmp_path / f"{name}-nvfp4"
        src = convert_checkpoint(tmp_path / name, out, Options(calibration_batches=2))
        assert verify(out, src, "modelopt", log=lambda line: None) == 0, name
        got = {
            "weights": model_weights(tmp_path / name / "checkpoint" / "step-1"),
            "nvfp4": load_file(str(out / "model.safetensors")),
        }
        for kind, tensors in got.items():
            want.setdefault(kind, tensors)
            assert tensors.keys() == want[kind].keys(), (name, kind)
            differ = [k for k in tensors if not _bitwise_equal(tensors[k], want[kind][k])]
            assert not differ, (name, kind, differ)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # float8- and NaN-safe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(dump, nnodes: int, nproc: int, *overrides: str) -> list[subprocess.CompletedProcess]:
    """train.py as ``nnodes`` torchrun launchers of ``nproc`` ranks each on this machine, meeting
    by the c10d rendezvous on 127.0.0.1 (docs/distributed.md, "Across nodes"); they share the
    dump folder (checkpoints on shared storage) and whatever token cache the overrides name."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=hsdp-test",
        "--local-addr=127.0.0.1",
    ]
    train_args = ["train.py", "--recipe", "recipes/debug_cpu.toml", f"--job.dump_folder={dump}", *COMMON, *overrides]
    nodes = [
        subprocess.Popen(launch + train_args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(nnodes)
    ]
    done = []
    for p in nodes:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r in done:
        assert r.returncode == 0, r.stderr[-3000:]
    return done


def test_hsdp_resumes_across_layouts_and_nodes(tmp_path):
    """A 1-process checkpoint resumes under HSDP (replicate 2 x shard 2), its checkpoint under
    FSDP=2, that one's under HSDP again, and that one's on 1 process (DCP resharding 1 -> HSDP ->
    FSDP -> HSDP -> 1, a step each), continuing the uninterrupted 1-process run. The first leg again
    as two "nodes" (two torchrun launchers, ``--nnodes 2``, one replica each, building one fresh
    token cache at once) gives the one-launcher run's losses and checkpoint bit for bit. CPU: 4 ranks.

    Legs of one step: with 4 data-parallel ranks at this lr, Adam grows the reduction-order noise
    (1e-7) to 4e-4 on grad norms by the fifth step, plain FSDP=4 as much as HSDP (measured)."""
    run = ["--training.local_batch_size=2", "--lr_scheduler.decay_type=constant", "--checkpoint.interval=1"]
    _run(tmp_path / "whole", "cpu", 1, *run, "--training.steps=6")
    want = _losses_and_norms(tmp_path / "whole")
    chain = tmp_path / "chain"
    _resume_from(tmp_path / "whole", chain)
    for steps, nproc, layout in ((3, 4, HSDP), (4, 2, _layout(2, 1)), (5, 4, HSDP), (6, 1, _layout(1, 1))):
        r = _run(chain, "cpu", nproc, *run, *layout, f"--training.steps={steps}", torchrun=True)
        assert f"at step {steps - 1}" in r.stdout, r.stdout[-2000:]
    got = _losses_and_norms(chain)
    assert sorted(got) == [3, 4, 5, 6]
    for s, (loss, norm) in got.items():  # HSDP sums the replicas' gradients in another order
        first = s == 3
        assert _close(loss, want[s][0], 1e-6 if first else 1e-5), (s, loss, want[s][0])
        assert _close(norm, want[s][1], 1e-5 if first else 1e-4), (s, norm, want[s][1])

    nodes = tmp_path / "nodes"
    _resume_from(tmp_path / "whole", nodes)
    rs = _run_nodes(nodes, 2, 2, *run, *HSDP, "--training.steps=3", f"--dataset.cache_dir={tmp_path / 'cache'}")
    # each node's LOCAL_RANK 0 tokenized into the shared cache at once (its progress bar on the node's
    # stderr): one whole copy kept, no partial one left
    assert all("tokenizing" in r.stderr for r in rs)
    assert [p.name.startswith("tokens-") for p in (tmp_path / "cache").iterdir()] == [True]
    assert _losses_and_norms(nodes) == {3: got[3]}
    step3 = [model_weights(d / "checkpoint" / "step-3") for d in (nodes, chain)]
    assert step3[0].keys() == step3[1].keys()
    assert all(torch.equal(step3[0][k], step3[1][k]) for k in step3[0])
