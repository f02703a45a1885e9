"""NVFP4 checkpoint layouts that inference engines read, and their decoding formulas.

``modelopt`` (vLLM, SGLang, TensorRT-LLM): ``weight`` uint8 [N, K/2] (element 2i in the low
nibble), ``weight_scale`` float8_e4m3fn [N, K/16], ``weight_scale_2`` fp32 = s_tensor
(multiplied), ``input_scale`` fp32 = the activation's s_tensor. Checked against vLLM
``model_executor/layers/quantization/modelopt.py`` (ModelOptNvFp4LinearMethod: alpha =
input_scale * weight_scale_2, input_scale_inv = 1 / input_scale, fused q/k/v take the max
weight_scale_2) and ``hf_quant_config.json`` parsing in the same file.

``compressed-tensors`` (``nvfp4-pack-quantized``): ``weight_packed`` uint8 [N, K/2],
``weight_scale`` e4m3, ``weight_global_scale`` fp32 [1] = 1 / s_tensor (divided),
``input_global_scale`` fp32 [1]. Checked against compressed-tensors 0.20
``compressors/nvfp4/base.py`` (unpack: low nibble first) and
``quantization/lifecycle/forward_helpers.py`` (_dequantize: scale / global_scale).

With the default power-of-two tensor scale, both decodings give our bits exactly. With
``tensor_scale = "amax"`` (amax / 2688, no power of two) neither format can be decoded as trained,
whatever scale is stored: ``code * block_scale * s`` then needs up to 24 significant bits, and
compressed-tensors' decompressor (``NVFP4PackedCompressor.decompress``: the codes unpacked in
bfloat16, ``_dequantize`` divides by the global scale and casts back) and vLLM's NVFP4 emulation
(``nvfp4_emulation_utils.dequantize_to_dtype``, cast to the activations' dtype) hold the weight in
16 bits; vLLM's W4A4 kernels quantize inputs with ``input_global_scale_inv = 1 / input_scale``
(``ModelOptNvFp4LinearMethod.process_weights_after_loading``), a rounded reciprocal. So
``export_problems`` lists the mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nvfp4.format import BLOCK_SIZE, NVFP4, e2m1_values, scale_blocks
from nvfp4.qat.config import QATConfig, layer_pattern

FORMATS = ("modelopt", "compressed-tensors")


def _scalar(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t.detach().float().reshape(shape).clone()


def layer_tensors(fmt: str, q: NVFP4, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear, by suffix (``weight``, ``weight_scale`` ...)."""
    if fmt == "modelopt":
        out = {"weight": q.packed, "weight_scale": q.block_scale, "weight_scale_2": _scalar(q.tensor_scale, ())}
        if input_scale is not None:
            out["input_scale"] = _scalar(input_scale, ())
        return out
    if fmt == "compressed-tensors":
        out = {
            "weight_packed": q.packed,
            "weight_scale": q.block_scale,
            "weight_global_scale": _scalar(1.0 / q.tensor_scale, (1,)),
        }
        if input_scale is not None:
            out["input_global_scale"] = _scalar(1.0 / input_scale, (1,))
        return out
    raise ValueError(f"unknown NVFP4 export format {fmt!r}; use one of {FORMATS}")


def quant_algo(weight_only: bool) -> str:
    """ModelOpt's name: NVFP4 (W4A4) or W4A16_NVFP4 (weight-only); both in vLLM's QUANT_ALGOS."""
    return "W4A16_NVFP4" if weight_only else "NVFP4"


def quantization_config(
    fmt: str, ignore: list[str], extra: dict[str, Any], weight_only: bool = False
) -> dict[str, Any]:
    """``quantization_config`` for config.json (``extra``: our provenance, kept alongside)."""
    if fmt == "modelopt":
        return {
            "quant_method": "modelopt",
            "quant_algo": quant_algo(weight_only),
            "group_size": BLOCK_SIZE,
            "kv_cache_quant_algo": None,
            "ignore": ignore,
            "nvfp4_titan": extra,
        }
    fp4 = {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "symmetric": True,
        "group_size": BLOCK_SIZE,
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": "torch.float8_e4m3fn",
    }
    group = {"targets": ["Linear"], "weights": {**fp4, "dynamic": False}}
    if not weight_only:  # compressed-tensors' NVFP4 scheme; NVFP4A16 has no input_activations
        group["input_activations"] = {**fp4, "dynamic": "local"}
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "nvfp4_titan": extra,
    }


def hf_quant_config(ignore: list[str], producer_version: str, weight_only: bool = False) -> dict[str, Any]:
    """ModelOpt's ``hf_quant_config.json`` (read by vLLM and TensorRT-LLM)."""
    return {
        "producer": {"name": "modelopt", "version": producer_version},
        "quantization": {
            "quant_algo": quant_algo(weight_only),
            "kv_cache_quant_algo": None,
            "group_size": BLOCK_SIZE,
            "exclude_modules": ignore,
        },
    }


def decode(fmt: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A reader's dequantized fp32 weight from one layer's tensors, by that reader's formula:
    vLLM's emulation fp4 * (weight_scale / (1 / weight_scale_2)); compressed-tensors'
    fp4 * (weight_scale / weight_global_scale)."""
    if fmt == "modelopt":
        values, s = e2m1_values(tensors["weight"]), tensors["weight_scale"].float()
        return scale_blocks(values, s / (1.0 / tensors["weight_scale_2"].float()))
    values, s = e2m1_values(tensors["weight_packed"]), tensors["weight_scale"].float()
    return scale_blocks(values, s / tensors["weight_global_scale"].float().reshape(()))


def export_problems(model: nn.Module, config: QATConfig) -> list[str]:
    """Why checkpoints of ``model`` trained with ``config`` could not be decoded by inference
    engines exactly as trained (an empty list: they can). ``model`` may be on the meta device and
    names its fused groups with ``fused_linear_groups()`` as for ``prepare``.

    Engines fuse q/k/v and gate/up into one GEMM of one precision with one weight tensor scale
    (vLLM's ModelOptNvFp4LinearMethod keeps the max ``weight_scale_2`` of a fused layer and
    refuses fused layers of mixed precision), tie ``lm_head`` to the float embedding when
    ``tie_word_embeddings`` is set, keep an untied ``lm_head`` in high precision (vLLM 0.22's
    ParallelLMHead registers ``lm_head.weight`` only: vLLM issues 44081 and 45102), and decode only
    power-of-two tensor scales as trained (the module docstring). The model names its output head
    with ``get_output_embeddings()``, as Hugging Face models do. The trainer checks this before any
    work, the converter again.
    """
    problems, split, separate = [], {}, []
    if config.tensor_scale == "amax":
        problems.append(
            "tensor_scale=amax: a tensor scale that is no power of two makes code x block scale x tensor scale "
            "longer than the bfloat16 weights compressed-tensors (transformers) and vLLM's emulation decode into, "
            "and vLLM quantizes inputs with the rounded 1 / input_scale: neither format decodes it as trained; "
            "use tensor_scale=pow2 (the default)"
        )
    for group in getattr(model, "fused_linear_groups", list)():
        chosen = [n for n in group if config.selects(n)]
        if chosen and len(chosen) < len(group):  # one line per kind of split, not per layer
            left = tuple(layer_pattern(n) for n in group if n not in chosen)
            split.setdefault((left, tuple(map(layer_pattern, group))), []).append(group[0])
        elif len(chosen) > 1 and not config.share_fused_amax:
            separate.append(group)
    for (left, group), firsts in split.items():
        problems.append(
            f"{', '.join(left)} excluded from QAT but not the rest of its fused group {list(group)} ({len(firsts)} "
            f"group(s)): engines fuse the group into one layer of one precision; include or exclude the whole group"
        )
    if separate:
        problems.append(
            f"share_fused_amax=false gives the {len(separate)} fused groups (q/k/v, gate/up; e.g. {separate[0]}) "
            f"separate weight tensor scales; engines keep one per fused layer (vLLM: the max), so the others "
            f"would decode 2-4x off"
        )
    uses: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(name.removesuffix(".weight"))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and config.selects(name)):
            continue
        if len(shared := uses[id(m.weight)]) > 1:
            problems.append(
                f"{name} shares its weight with {', '.join(s for s in shared if s != name)} (tied embeddings): a "
                f"quantized tied head cannot be exported; keep '{name}' in the QAT exclude patterns"
            )
        elif m is head:
            problems.append(
                f"{name} is the output head (lm_head): vLLM loads no NVFP4 lm_head for Llama (its ParallelLMHead "
                f"registers lm_head.weight only: vLLM issues 44081, 45102); keep '{name}' in the QAT exclude patterns"
            )
    return problems
