"""The reader next to the writer: converted checkpoints decoded by each format's formula
(``verify``) and loaded as our model with ``NVFP4Linear`` layers (``load_nvfp4_model``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import nvfp4
from nvfp4.export import (
    decode,
)
from nvfp4_titan.convert.source import ConvertError, Source, quantized_groups
from nvfp4_titan.models.llama3 import Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.hf import (
    TensorReader,
    args_from_hf_config,
    read_config,
)


class VerifyError(ConvertError):
    """``--verify`` found weights that the reader's formula decodes differently from the QAT
    forward's; nothing was written."""


def verify(output: Path, src: Source, fmt: str, log: Callable[[str], None] = print) -> int:
    """Decode every quantized weight by its reader's formula and compare with the QAT
    forward's fake-quantized weight; print a table; return the number of mismatches."""
    read = TensorReader(output)
    bad = 0
    log(f"{'tensor':56s} {'shape':>14s} {'max |diff|':>11s}  ok")
    for module, _, q in quantized_groups(src):
        prefix = adapter.to_hf_module(module)
        tensors = {k.removeprefix(prefix + "."): read(k) for k in read.files if k.startswith(prefix + ".")}
        got, want = decode(fmt, tensors), nvfp4.dequantize(q)
        ok = torch.equal(got, want)
        bad += not ok
        diff = (got - want).abs().max().item()
        log(f"{prefix + '.weight':56s} {str(tuple(want.shape)):>14s} {diff:11.3e}  {'yes' if ok else 'NO'}")
    log(f"{bad} mismatches")
    return bad


def load_nvfp4_model(path: Path) -> Transformer:
    """Our model with ``NVFP4Linear`` layers from a converted checkpoint (either format)."""
    cfg = read_config(path)
    qc = cfg.get("quantization_config") or {}
    fmt = "modelopt" if qc.get("quant_method") == "modelopt" else "compressed-tensors"
    ours = qc.get("nvfp4_titan") or {}
    mode = ours.get("tensor_scale", "pow2")
    act = ours.get("activation_scale", "none" if qc.get("quant_algo") == "W4A16_NVFP4" else "static")
    args = args_from_hf_config(cfg, str(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(args)
    read = TensorReader(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in read.files:
        module, _, suffix = key.rpartition(".")
        layers.setdefault(module, {})[suffix] = read(key)
    for hf_module, tensors in layers.items():
        name = adapter.from_hf_module(hf_module)
        if "weight_scale" in tensors:
            if fmt == "modelopt":
                q = nvfp4.NVFP4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"])
                s_in = tensors.get("input_scale")
            else:
                q = nvfp4.NVFP4(
                    tensors["weight_packed"], tensors["weight_scale"], 1.0 / tensors["weight_global_scale"].reshape(())
                )
                s_in = 1.0 / tensors["input_global_scale"].reshape(()) if "input_global_scale" in tensors else None
            parent, _, child = name.rpartition(".")
            s_in = s_in if act == "static" else None
            setattr(
                model.get_submodule(parent), child, nvfp4.NVFP4Linear(q, None, s_in, mode, weight_only=act == "none")
            )
        else:
            for suffix, t in tensors.items():
                setattr(model.get_submodule(name), suffix, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()
    return model
