"""A torchtitan DCP checkpoint of a QAT run converts with this project's converter
(``--torchtitan MODULE:FUNCTION``) to an NVFP4 checkpoint whose decoded weights are, bit for bit, the
weights torchtitan's QAT forward used (rows mapped as torchtitan's checkpoint and adapter map them);
``--verify`` passes; a checkpoint of another model, one whose tensors torchtitan's ``export_dtype``
narrowed, and one given with another activation-scale mode than it trained with are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torchtitan.components.checkpoint import ModelWrapper

import nvfp4
from nvfp4.export import decode
from nvfp4_titan.convert.cli import main as convert
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.hf import TensorReader
from nvfp4_titan.torchtitan_qat.configs import DEBUG_VOCAB
from tests_torchtitan.helpers import build, model_config, qat_linears, row_maps

CONFIG = "nvfp4_titan.torchtitan_qat.configs:debug"
REPO = Path(__file__).resolve().parents[1]


def _trained_checkpoint(folder: Path) -> torch.nn.Module:
    """Two SGD steps of the QAT model, saved as torchtitan's CheckpointManager saves a step (the model's
    tensors at the top level of the DCP state dict, q/k/v split by torchtitan's state-dict hook)."""
    model = build(model_config(), seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        tokens = torch.randint(0, DEBUG_VOCAB, (2, 33), generator=g)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    dcp.save({**ModelWrapper(model).state_dict(), "train_state": torch.tensor(2)}, checkpoint_id=folder, no_dist=True)
    return model


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_export_decodes_to_the_qat_forwards_weights(tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(REPO)  # the debug config's tokenizer path is relative to the repository
    model = _trained_checkpoint(tmp_path / "run" / "checkpoint" / "step-2")
    out = tmp_path / "nvfp4"
    args = [str(tmp_path / "run"), str(out), "--torchtitan", CONFIG, "--format", fmt, "--calibration-batches", "0"]
    assert convert([*args, "--verify", "--quiet"]) == 0
    read = TensorReader(out)
    decoded = 0
    for fqn, rows_of in row_maps(model_config()).items():
        want = nvfp4.dequantize(qat_linears(model)[fqn].quantized_weight())
        for name, rows in rows_of.items():
            prefix = adapter.to_hf_module(name)
            tensors = {k.removeprefix(prefix + "."): read(k) for k in read.files if k.startswith(prefix + ".")}
            assert torch.equal(decode(fmt, tensors), want[rows]), name
            decoded += 1
    assert decoded == 6 * 7
    assert (out / "tokenizer.json").is_file()


def _missing_w2(state: dict) -> None:
    del state["layers.5.feed_forward.w2.weight"]


def _amaxes(state: dict, value: float = 1.0, dtype: torch.dtype = torch.float32) -> None:
    for key in [k for k in state if k.endswith(".input_amax")]:
        state[key] = torch.tensor(value)
    state["layers.2.feed_forward.w1.input_amax"] = torch.tensor(value, dtype=dtype)


@pytest.mark.parametrize(
    "config,edit,message",
    [
        ("debug", _missing_w2, "has no tensor for layers.5.feed_forward.w2.weight"),
        (  # torchtitan's export_dtype casts the last step: the fp32 weights the forward used are gone
            "debug",
            lambda s: s.update({"layers.1.attention.wo.weight": s["layers.1.attention.wo.weight"].bfloat16()}),
            "layers.1.attention.wo.weight is stored in torch.bfloat16, narrower than the torch.float32",
        ),
        ("debug", _amaxes, "holds a calibrated amax: the run trained with static activation scales"),
        ("debug_static", lambda s: None, "was never calibrated, as in a run trained with dynamic activation"),
        (
            "debug_static",
            lambda s: _amaxes(s, 3.0, torch.bfloat16),
            "layers.2.feed_forward.w1.input_amax is stored in torch.bfloat16, narrower than the float32 amax",
        ),
    ],
    ids=["another_model", "narrowed_weight", "static_run_as_dynamic", "dynamic_run_as_static", "narrowed_amax"],
)
def test_checkpoint_that_would_not_export_as_trained_is_refused(tmp_path, monkeypatch, capsys, config, edit, message):
    monkeypatch.chdir(REPO)
    state = ModelWrapper(build(model_config(), seed=2)).state_dict()
    edit(state)
    dcp.save(state, checkpoint_id=tmp_path / "step-1", no_dist=True)
    out = tmp_path / "nvfp4"
    spec = f"nvfp4_titan.torchtitan_qat.configs:{config}"
    assert convert([str(tmp_path / "step-1"), str(out), "--torchtitan", spec, "--calibration-batches", "0"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
