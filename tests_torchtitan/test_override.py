"""``--override.imports nvfp4_titan.torchtitan_qat.overrides.nvfp4_qat`` on torchtitan's own debug
config gives the model ``NVFP4QATConverter`` gives (module for module, bit for bit in the forward), takes
its settings as kwargs, refuses bad ones, and its checkpoints convert with ``--torchtitan-override``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import ModelWrapper
from torchtitan.config.override import OverrideConfig, apply_overrides
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_debugmodel

import nvfp4
from nvfp4_titan.convert.cli import main as convert
from nvfp4_titan.torchtitan_qat.converter import NVFP4QATConverter
from tests_torchtitan.helpers import build, qat_linears

OVERRIDE = "nvfp4_titan.torchtitan_qat.overrides.nvfp4_qat"
REPO = Path(__file__).resolve().parents[1]


def _sdpa(model_config):
    for layer in model_config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return model_config


def _overridden(**kwargs):
    """torchtitan's ``llama3_debugmodel`` trainer config with the override applied as its trainer does
    (after ``update_from_config``)."""
    config = llama3_debugmodel()
    _sdpa(config.model_spec.model)
    config.model_spec.model.update_from_config(config=config)
    assert apply_overrides(OverrideConfig(imports=[(OVERRIDE, kwargs)]), config)
    return config.model_spec.model


def test_override_gives_the_converters_model():
    by_override = build(_overridden(), seed=4)
    by_converter = build(_sdpa(model_registry("debugmodel", converters=[NVFP4QATConverter.Config()]).model), seed=4)

    def shape(model):
        qat = lambda x: x.config if isinstance(x, nvfp4.NVFP4QATLinear) else None  # noqa: E731
        return [(n, type(x).__name__, qat(x)) for n, x in model.named_modules()]

    assert shape(by_override) == shape(by_converter)
    assert len(qat_linears(by_override)) == 30 and type(by_override.lm_head).__name__ == "Linear"
    ffn = by_override.layers["3"].feed_forward
    assert ffn.w1.amax_peers == (ffn.w3,)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_override(tokens), by_converter(tokens))


def test_override_settings():
    linears = qat_linears(build(_overridden(tensor_scale="amax"))).values()
    assert len(linears) == 30 and all(m.config.tensor_scale == "amax" for m in linears)
    with pytest.raises(ValueError, match="unknown settings"):
        _overridden(exclude=["*"])
    static = qat_linears(build(_overridden(activation_scale="static", calibration_batches=2))).values()
    assert all(m.config.activation_scale == "static" and m.calibration_batches == 2 for m in static)
    cfg = _overridden(fsdp_nvfp4_all_gather=True)
    assert all(layer.feed_forward.w2.fsdp_nvfp4_all_gather for layer in cfg.layers)


def test_checkpoint_converts_with_the_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    model = build(_overridden(), seed=4)
    dcp.save(ModelWrapper(model).state_dict(), checkpoint_id=tmp_path / "run" / "checkpoint" / "step-1", no_dist=True)
    spec = "torchtitan.models.llama3.config_registry:llama3_debugmodel"
    args = [str(tmp_path / "run"), "--torchtitan", spec, "--tokenizer", "data/assets", "--calibration-batches", "0"]
    assert convert([args[0], str(tmp_path / "plain"), *args[1:], "--quiet"]) == 2
    assert "converts no linear" in capsys.readouterr().err
    no_tokenizer = [args[0], str(tmp_path / "x"), "--torchtitan", spec, "--torchtitan-override", OVERRIDE]
    assert convert([*no_tokenizer, "--calibration-batches", "0", "--quiet"]) == 2  # its hf_assets_path is absent
    assert "no tokenizer files" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = tmp_path / "nvfp4"
    assert convert([args[0], str(out), *args[1:], "--torchtitan-override", OVERRIDE, "--verify", "--quiet"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
