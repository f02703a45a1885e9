"""Quantization-aware distillation through train.py: a student equal to its teacher learns
nothing (zero KL, zero gradient); a QAD run logs its terms, records its teacher, resumes
bit-exactly with it and refuses another; bad teachers are named before anything is written."""

import json
import shutil

import pytest

from nvfp4_titan.models.llama3 import FLAVORS, Transformer, to_hf
from tests.integration.helpers import FAST, metrics, train

COMMON = [*FAST, "--metrics.log_freq=1", "--training.global_batch_size=8"]  # 2 micro-batches: accumulation


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two float debug models as Hugging Face folders."""
    out = {}
    for seed in (3, 4):
        model = Transformer(FLAVORS["debug"])
        model.init_weights(seed)
        out[seed] = tmp_path_factory.mktemp("teacher") / f"seed{seed}"
        to_hf(model, out[seed])
    return out


def _from(teacher):
    return ["--checkpoint.initial_load_in_hf=true", f"--checkpoint.initial_load_path={teacher}"]


def test_a_student_equal_to_its_teacher_learns_nothing(teachers, tmp_path):
    r = train(
        tmp_path / "run",
        *COMMON,
        *_from(teachers[3]),
        "--qat.enable=false",
        "--qat.loss=kl",
        "--optimizer.weight_decay=0",
        "--training.steps=3",
        "--checkpoint.enable=false",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(rows) == 3
    for m in rows:
        assert m["loss"] == 0.0 and m["distill/kl"] == 0.0 and m["grad_norm"] == 0.0, m
        assert m["distill/top1_agreement"] == 1.0 and m["distill/ce"] > 5


def test_qad_resumes_bit_exactly_with_its_teacher_and_refuses_another(teachers, tmp_path):
    qad = [*COMMON, *_from(teachers[3]), "--qat.loss=mix", "--qat.temperature=2.0", "--checkpoint.interval=2"]
    split = tmp_path / "run"
    assert train(split, *qad, "--training.steps=4").returncode == 0
    rows = {m["step"]: m for m in metrics(split) if "loss" in m}
    shutil.rmtree(split / "checkpoint" / "step-4")  # as if killed after step 3: resume from step 2
    r = train(split, *qad, "--training.steps=4")
    assert r.returncode == 0 and "resumed from" in r.stderr + r.stdout, r.stderr[-2000:]
    assert set(rows) == {1, 2, 3, 4} and all(0 < rows[s]["distill/kl"] for s in rows)
    assert 0 <= rows[1]["distill/top1_agreement"] <= 1 and rows[1]["distill/ce"] > rows[1]["distill/kl"]
    resumed = [m for m in metrics(split) if "loss" in m][4:]
    assert [m["step"] for m in resumed] == [3, 4]
    for m in resumed:
        assert m["loss"] == rows[m["step"]]["loss"] and m["distill/kl"] == rows[m["step"]]["distill/kl"], m
    recorded = json.loads((split / "checkpoint" / "step-4" / "teacher.json").read_text())
    assert recorded["path"] == str(teachers[3]) and len(recorded["sha256"]) == 64

    r = train(split, *qad, "--training.steps=6", f"--qat.teacher_path={teachers[4]}")
    assert r.returncode == 2
    assert "was distilled from the teacher" in r.stderr and "differs" in r.stderr, r.stderr[-2000:]
    r = train(split, *qad[:-3], "--qat.loss=ce", "--training.steps=6")
    assert r.returncode == 2 and "qat.loss='mix'" in r.stderr, r.stderr[-2000:]
    assert not (split / "checkpoint" / "step-6").exists()


def test_bad_teachers_are_named_before_any_write(teachers, tmp_path):
    small = Transformer(FLAVORS["debug"].with_(n_layers=1))
    to_hf(small, tmp_path / "small")
    (tmp_path / "empty").mkdir()
    cases = {
        "small": (
            "the teacher has another shape than the model (n_layers: 1 vs 4)",
            [f"--qat.teacher_path={tmp_path / 'small'}"],
        ),
        "empty": (
            "must be a Hugging Face folder (config.json) or a DCP step-N folder",
            [f"--qat.teacher_path={tmp_path / 'empty'}"],
        ),
        "none": ("distils from a teacher: set qat.teacher_path", []),
    }
    for name, (message, extra) in cases.items():
        r = train(tmp_path / name / "run", *COMMON, "--qat.loss=kl", "--training.steps=1", *extra)
        assert r.returncode == 2 and message in r.stderr, (name, r.stderr[-2000:])
        assert not (tmp_path / name / "run").exists()
