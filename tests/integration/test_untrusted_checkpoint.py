"""A checkpoint whose pickles would run code is refused, naming what it holds, before any of it
runs: by train.py's resume, the converter and evaluation."""

import pickle
import shutil

import pytest

from nvfp4_titan.convert import ConvertError
from nvfp4_titan.convert.cli import main as convert_main
from nvfp4_titan.evaluate import load_model
from nvfp4_titan.training.safe_dcp import UnsafeCheckpointError
from tests.integration.helpers import FAST, train
from tests.unit.test_safe_dcp import RunsCode

RUN = [*FAST, "--training.steps=2", "--lr_scheduler.warmup_steps=0", "--checkpoint.interval=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("untrusted") / "run"
    assert train(dump, *RUN).returncode == 0
    return dump


@pytest.fixture
def planted(run, tmp_path):
    """A copy of the run whose step-2/.metadata runs `touch marker` when unpickled."""
    dump, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(run, dump)
    (dump / "checkpoint" / "step-2" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    return dump, marker


def test_train_refuses_to_resume_from_it(planted):
    dump, marker = planted
    r = train(dump, *RUN, "--training.steps=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "step-2/.metadata holds a pickled posix.system" in r.stderr
    assert not marker.exists() and (dump / "checkpoint" / "step-2" / ".metadata").is_file()  # not set aside


def test_the_converter_and_evaluation_refuse_it(planted, tmp_path, capsys):
    dump, marker = planted
    assert convert_main([str(dump), str(tmp_path / "out")]) != 0
    assert "pickled posix.system" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises((UnsafeCheckpointError, ConvertError), match="pickled posix.system"):
        load_model(dump / "checkpoint" / "step-2")
    assert not marker.exists()
