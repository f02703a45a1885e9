"""train.py end to end on CPU: learning, metrics, checkpoints, exact resume, signals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import FAST, ROOT, losses, metrics, model_weights, train


def test_debug_recipe_learns_logs_and_checkpoints(tmp_path):
    dump, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    r = train(
        dump,
        "--training.steps=16",
        "--metrics.log_freq=1",
        "--validation.freq=8",
        "--checkpoint.interval=8",
        "--training.seq_len=64",
        env={"TMPDIR": str(tmp)},
    )
    assert r.returncode == 0, r.stderr
    assert not list(tmp.glob("nvfp4-titan-store-*"))  # no process-group store file left behind
    loss = losses(dump)
    assert sorted(loss) == list(range(1, 17))
    assert loss[16] < loss[1] - 1.0  # it learns
    logged = metrics(dump)
    assert any("validation/loss" in m for m in logged)
    assert {"grad_norm", "lr", "tokens_per_s", "qat/mlp/weight_rel_err", "qat/attention/scale_clamped_share"} <= logged[
        0
    ].keys()
    assert list((dump / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-16", "step-8"]
    assert (dump / "checkpoint" / "step-16" / "config.toml").is_file() and (dump / "config.toml").is_file()


def test_resume_after_crash_gives_bit_identical_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [
        *FAST,
        "--training.steps=10",
        "--checkpoint.interval=5",
        "--checkpoint.keep_latest_k=0",
        "--metrics.log_freq=1",
    ]
    assert train(a, *common).returncode == 0
    shutil.copytree(a / "checkpoint" / "step-5", b / "checkpoint" / "step-5")  # later ones "lost"
    r = train(b, *common)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [6, 7, 8, 9, 10]
    assert all(la[s] == lb[s] for s in lb), (la, lb)


def test_crash_during_save_resumes_from_previous_checkpoint(tmp_path):
    dump = tmp_path / "run"
    common = [*FAST, "--checkpoint.interval=2", "--checkpoint.keep_latest_k=0", "--metrics.log_freq=1"]
    assert train(dump, *common, "--training.steps=4").returncode == 0
    # What a kill in the middle of saving step 4 leaves: a .tmp folder without metadata.
    ck = dump / "checkpoint"
    (ck / "step-4").rename(ck / "step-4.tmp")
    (ck / "step-4.tmp" / ".metadata").unlink()
    r = train(dump, *common, "--training.steps=6")
    assert r.returncode == 0, r.stderr
    assert "step-2 at step 2" in r.stdout
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4", "step-6"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_head(path):
    data = bytearray(path.read_bytes())
    data[:4096] = bytes(4096)
    path.write_bytes(bytes(data))


DAMAGES = {  # what a full disk, a killed copy or a keep_latest_k deletion cut short leaves
    "truncated_data": (
        lambda step: _truncate(step / "__0_0.distcp"),
        r"__0_0.distcp is truncated \(\d+ of \d+ bytes\)",
    ),
    "deleted_data": (lambda step: (step / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "truncated_metadata": (lambda step: _truncate(step / ".metadata"), r"its .metadata is unreadable \(\w+\)"),
    # whole-sized but changed (a bad copy): found only while loading it
    "zeroed_header": (
        lambda step: _zero_head(step / "__0_0.distcp"),
        r"its data cannot be read \(UnpicklingError: [^)]*\)",
    ),
    "copied_data": (
        lambda step: shutil.copy(step.parent / "step-2" / "__0_0.distcp", step / "__0_0.distcp"),
        r"it holds step 2 \(renamed, or its files copied from another step\)",
    ),
    "deleted_config": (
        lambda step: (step / "config.toml").unlink(),
        r"its config.toml is missing \(train.py writes [^)]*\)",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_resumes_from_the_newest_whole_one(tmp_path, damage):
    """The newest step's files damaged: the warning names the file, the run resumes from the
    older whole step with the losses of an uninterrupted run, and the damaged step is kept aside."""
    dump = tmp_path / "run"
    common = [
        *FAST,
        "--training.steps=4",
        "--checkpoint.interval=2",
        "--checkpoint.keep_latest_k=0",
        "--metrics.log_freq=1",
    ]
    assert train(dump, *common).returncode == 0
    uninterrupted = losses(dump)
    ck = dump / "checkpoint"
    damage_fn, message = DAMAGES[damage]
    damage_fn(ck / "step-4")
    (dump / "metrics.jsonl").unlink()
    r = train(dump, *common)
    assert r.returncode == 0, r.stderr
    assert re.search(f"checkpoint .*step-4 cannot be loaded: {message}; using step-2 ", r.stdout), r.stdout
    assert "step-2 at step 2" in r.stdout
    resumed = losses(dump)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == uninterrupted[s] for s in resumed)
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4", "step-4.damaged"]


def test_a_renamed_step_is_set_aside_and_keep_latest_k_keeps_the_new_ones(tmp_path):
    """step-4 renamed step-10: it holds step 4, so it is set aside (not resumed "at step 4" and
    ranked newest, which made keep_latest_k delete every checkpoint saved after it); the run
    resumes from step-2 and keeps its own latest checkpoint."""
    dump = tmp_path / "run"
    common = [*FAST, "--training.steps=4", "--checkpoint.interval=2", "--checkpoint.keep_latest_k=0"]
    assert train(dump, *common).returncode == 0
    ck = dump / "checkpoint"
    (ck / "step-4").rename(ck / "step-10")
    r = train(dump, *common[:-2], "--training.steps=6", "--checkpoint.interval=2", "--checkpoint.keep_latest_k=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"step-10 cannot be loaded: it holds step 4 .*; using step-2 \(step-10.damaged\)", r.stdout), (
        r.stdout
    )
    assert sorted(p.name for p in ck.iterdir()) == ["step-10.damaged", "step-6"]


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    """Starting over would drop the run's training without a word: refused, naming each step;
    a damaged initial_load_path is refused before a run folder is made."""
    dump = tmp_path / "run"
    common = [*FAST, "--training.steps=2", "--checkpoint.interval=1", "--checkpoint.keep_latest_k=0"]
    assert train(dump, *common).returncode == 0
    for step in ("step-1", "step-2"):
        _truncate(dump / "checkpoint" / step / "__0_0.distcp")
    before = sorted((p.name, p.stat().st_size) for p in dump.rglob("*"))
    r = train(dump, *common, "--training.steps=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"every checkpoint in .* is damaged \(step-2: __0_0.distcp is truncated .*; step-1: ", r.stderr)
    assert sorted((p.name, p.stat().st_size) for p in dump.rglob("*")) == before
    r = train(tmp_path / "new", *common, f"--checkpoint.initial_load_path={dump / 'checkpoint' / 'step-2'}")
    assert r.returncode == 2 and "initial_load_path=" in r.stderr and "is damaged" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_resume_with_another_model_shape_is_refused_before_any_write(tmp_path):
    dump = tmp_path / "run"
    assert train(dump, *FAST, "--training.steps=2").returncode == 0
    config = (dump / "config.toml").read_text()
    r = train(dump, *FAST, "--training.steps=4", "--model.flavor=1B")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"step-2: model\.\S+ has shape .* this model needs", r.stderr), r.stderr
    assert (dump / "config.toml").read_text() == config


def test_full_disk_during_save_says_so_and_leaves_no_partial_save(tmp_path):
    """A write that fails mid-save (here: a file-size limit, as a full disk fails it): one error
    naming the save, the free space and the latest intact checkpoint; no step-N.tmp left holding
    the space; exit 1 without a traceback."""
    import resource

    def limit_file_size():  # 4 MiB per file: the logs fit, a checkpoint (~60 MB) does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    dump = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        f"--job.dump_folder={dump}",
        *FAST,
        "--training.steps=2",
        "--checkpoint.interval=2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert re.search(
        r"error: could not save checkpoint .*step-2 \(.*\); [\d.]+ GiB free on its disk\. The partial "
        r"save was removed; the latest checkpoint is none",
        r.stderr,
    ), r.stderr
    assert list((dump / "checkpoint").iterdir()) == []


def test_validation_split_smaller_than_a_batch_is_announced(tmp_path):
    r = train(
        tmp_path / "run",
        *FAST,
        "--training.steps=1",
        "--validation.freq=1",
        "--training.seq_len=2048",
        "--training.local_batch_size=16",
        "--dataset.validation_fraction=0.001",
        "--checkpoint.enable=false",
    )
    assert r.returncode == 0, r.stderr
    assert re.search(
        r"validation is off: the held-out split has \d+ windows of 2049 tokens, fewer than one "
        r"batch \(16 x 1 ranks\)",
        r.stdout,
    ), r.stdout


def test_tokenize_script_builds_the_cache_that_train_reads(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "scripts/tokenize_corpus.py", "--recipe", "recipes/debug_cpu.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=False,
    )
    assert r.returncode == 0 and re.search(r"tokens-\w+: 278 documents, \d+ tokens", r.stdout), r.stderr
    assert "tokenizing" in r.stderr  # built here, with a progress bar
    t = train(tmp_path / "run", *FAST, "--training.steps=2", env=env)
    assert t.returncode == 0, t.stderr
    assert "tokenizing" not in t.stderr  # train.py mapped the script's cache
    assert re.search(r"data ready in \d+\.\d\d s, peak RSS of this process \d+\.\d\d GiB", t.stdout), t.stdout


def test_sigterm_saves_and_resume_continues(tmp_path):
    dump = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        f"--job.dump_folder={dump}",
        *FAST,
        "--training.steps=500",
        "--metrics.log_freq=1",
        "--checkpoint.interval=1000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((dump / "metrics.jsonl").exists() and len(metrics(dump)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = [int(p.name.split("-")[1]) for p in (dump / "checkpoint").iterdir()]
    assert len(saved) == 1 and saved[0] >= 3 and "stopped by signal" in out
    n = saved[0]
    r = train(dump, *FAST, f"--training.steps={n + 2}", "--metrics.log_freq=1", "--checkpoint.interval=1000")
    assert r.returncode == 0, r.stderr
    assert max(losses(dump)) == n + 2 and f"at step {n}" in r.stdout


def test_sigterm_to_torchrun_workers_saves_and_torchrun_exits_0(tmp_path):
    """The documented way to stop a torchrun job (docs/reliability.md): SIGTERM to torchrun's
    children (the workers). Both ranks stop after the same step, save one checkpoint, and torchrun
    exits 0."""
    dump = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        f"--job.dump_folder={dump}",
        *FAST,
        "--training.steps=500",
        "--metrics.log_freq=1",
        "--checkpoint.interval=1000",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((dump / "metrics.jsonl").exists() and len(metrics(dump)) >= 2):
        time.sleep(0.2)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    saved = [p.name for p in (dump / "checkpoint").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-") and "stopped by signal" in out


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path):
    # huge finite weights after step 1: step 2's gradients overflow and the run stops there
    dump = tmp_path / "run"
    r = train(
        dump,
        *FAST,
        "--training.steps=6",
        "--optimizer.lr=1e30",
        "--lr_scheduler.warmup_steps=0",
        "--training.max_norm=0",
        "--checkpoint.interval=1",
        "--qat.enable=false",
    )
    assert r.returncode == 1
    assert "non-finite gradient (norm nan) at step 2" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"Last good checkpoint: {dump / 'checkpoint' / 'step-1'}." in r.stderr
    assert sorted(p.name for p in (dump / "checkpoint").glob("step-*")) == ["step-1"]
    assert all(torch.isfinite(t).all() for t in model_weights(dump / "checkpoint" / "step-1").values())


def test_resume_on_a_corpus_edited_in_place_is_refused(tmp_path):
    """The checkpoint records the sha256 of the tokens it trained on (data.json): a corpus edited
    in place (same dataset.path) is refused before any write; the same text written again (new
    file times, same tokens) resumes."""
    corpus, dump = tmp_path / "corpus.jsonl", tmp_path / "run"
    shutil.copy(ROOT / "data/assets/shakespeare.jsonl", corpus)
    common = [*FAST, f"--dataset.path={corpus}", f"--dataset.cache_dir={tmp_path / 'cache'}",
              "--training.steps=4", "--checkpoint.interval=2", "--lr_scheduler.warmup_steps=0"]  # fmt: skip
    assert train(dump, *common, "--training.steps=2").returncode == 0
    recorded = json.loads((dump / "checkpoint" / "step-2" / "data.json").read_text())
    assert recorded["path"] == str(corpus) and len(recorded["tokens_sha256"]) == 64
    original = corpus.read_bytes()
    corpus.write_bytes(original + json.dumps({"text": "A scene added in place."}).encode() + b"\n")
    before = {p: p.stat().st_mtime_ns for p in dump.rglob("*")}
    r = train(dump, *common)
    assert r.returncode == 2 and "now holds other text" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in dump.rglob("*")} == before
    corpus.write_bytes(original)
    r = train(dump, *common)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


def test_resume_with_another_seq_len_or_qat_setting_is_refused(tmp_path):
    """A changed sequence length redraws the data windows, a changed QAT setting changes what the
    model computes: resuming either way is one clear error naming the key and the flag. QAT
    patterns that select the same linears are no change: the run saved with exclude ["output"]
    (the default before it became nvfp4.QATConfig's four patterns) resumes under the default."""
    dump = tmp_path / "run"
    common = [*FAST, "--training.steps=4", "--checkpoint.interval=2", "--lr_scheduler.warmup_steps=0"]
    assert train(dump, *common, "--training.steps=2", '--qat.exclude=["output"]').returncode == 0
    before = sorted(p.name for p in dump.rglob("*"))
    for change, fix in (
        ("--training.seq_len=32", "--training.seq_len=64"),
        ("--qat.enable=false", "--qat.enable=true"),
        ("--qat.activation_scale=static", '--qat.activation_scale="dynamic"'),
        ('--qat.exclude=["output", "layers.0.*"]', '--qat.exclude=["output"]'),
        ("--dataset.validation_fraction=0.1", "--dataset.validation_fraction=0.05"),
        ("--training.mixed_precision_param=bfloat16", '--training.mixed_precision_param="float32"'),
        ("--qat.block_scale_rule=four_over_six", '--qat.block_scale_rule="amax"'),
    ):
        r = train(dump, *common, change)
        assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, (change, r.stderr[-2000:])
        assert sorted(p.name for p in dump.rglob("*")) == before
    r = train(dump, *common)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    r = train(dump, *common, "--training.steps=3")  # below the checkpoint's step: said, not silent
    assert r.returncode == 0 and "nothing to train: the checkpoint is at step 4 and training.steps = 3" in r.stdout
