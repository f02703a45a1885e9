"""DCP steps are read without running what their pickles hold: the .metadata through an
allow-list, the non-tensor entries with torch.load(weights_only=True)."""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch
import torch.distributed.checkpoint as dcp

from nvfp4_titan.training import safe_dcp
from nvfp4_titan.training.safe_dcp import UnsafeCheckpointError


class RunsCode:
    """Unpickling it runs a shell command (what a planted pickle would do)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _step(tmp_path, **extra):
    step = tmp_path / "step-1"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "train_state": {"step": 1}, **extra}
    dcp.save(state, checkpoint_id=str(step), no_dist=True)
    return step


def test_a_dcp_step_of_tensors_and_plain_values_loads_as_dcp_loads_it(tmp_path):
    step = _step(tmp_path, dataloader={"consumed": 7, "seed": 0})
    state = {"model": {"w": torch.zeros(2, 3)}, "train_state": {"step": 0}, "dataloader": {"consumed": 0, "seed": 1}}
    safe_dcp.load(state, step, no_dist=True)
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert state["train_state"] == {"step": 1} and state["dataloader"] == {"consumed": 7, "seed": 0}
    assert set(safe_dcp.read_metadata(step).state_dict_metadata) == {
        "model.w",
        "train_state.step",
        "dataloader.consumed",
        "dataloader.seed",
    }


def test_a_planted_metadata_is_refused_naming_the_class_and_never_runs(tmp_path):
    step, marker = _step(tmp_path), tmp_path / "ran"
    (step / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"pickled posix\.system, which no DCP checkpoint needs"):
        safe_dcp.read_metadata(step)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        safe_dcp.load({"model": {"w": torch.zeros(2, 3)}}, step, no_dist=True)
    assert not marker.exists()


def test_metadata_of_another_type_is_refused(tmp_path):
    step = _step(tmp_path)
    (step / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpointError, match="dict instead of DCP Metadata"):
        safe_dcp.read_metadata(step)


def test_a_planted_entry_is_refused_naming_the_class_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    step = _step(tmp_path, extra={"payload": RunsCode(marker)})  # saved as a pickled entry
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system \(entry extra\.payload\)"):
        safe_dcp.load({"model": {"w": torch.zeros(2, 3)}, "extra": {"payload": None}}, step, no_dist=True)
    assert not marker.exists()
