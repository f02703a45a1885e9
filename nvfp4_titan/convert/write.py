"""The writer: a ``Source`` -> NVFP4 (ModelOpt or compressed-tensors) or float Hugging Face
checkpoint. Streams one fused group of weights at a time and quantizes it with the numerics of the
QAT forward: the recipe's mixed-precision cast, the fused-group amax and the recipe's QAT config,
all read from the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import nvfp4
from nvfp4.export import (
    FORMATS,
    export_problems,
    hf_quant_config,
    layer_tensors,
    quantization_config,
)
from nvfp4_titan.convert.calibrate import calibrated_input_amax
from nvfp4_titan.convert.output import MARKER, atomic_folder, check_output
from nvfp4_titan.convert.read import VerifyError, verify
from nvfp4_titan.convert.source import (
    ConvertError,
    Source,
    qat_groups,
    quantized_groups,
    read_finite,
    resolve_source,
    tokenizer_dir,
)
from nvfp4_titan.models.llama3 import Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.hf import (
    TOKENIZER_FILES,
    SafetensorsWriter,
    _cast,
    copy_tokenizer_files,
    hf_config_from_args,
    read_config,
)


@dataclass
class Options:
    fmt: str = "modelopt"
    dtype: torch.dtype | None = None
    calibration_batches: int = 8
    calibration_batch_size: int = 4
    calibration_data: Path | None = None
    calibration_seq_len: int | None = None
    max_shard_bytes: int = 5 * 2**30
    tokenizer: Path | None = None  # instead of the run's model.tokenizer_path
    torchtitan: str | None = None  # MODULE:FUNCTION of a torchtitan run's config (the source is its DCP)
    torchtitan_overrides: tuple[str, ...] = ()  # that run's --override.imports entries
    verify: bool = False  # decode every quantized weight again before the output is put in place
    exclude: tuple[str, ...] | None = None  # a Hugging Face source's QAT exclude patterns (PTQ); None: the default
    block_scale_rule: str | None = None  # a Hugging Face source's weight block scale rule (PTQ); None: amax


def _ignored(src: Source, quantized: set[str]) -> list[str]:
    with torch.device("meta"):
        model = Transformer(src.args)
    return sorted(
        adapter.to_hf_module(n)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n not in quantized
    )


def _copy_tokenizer(src: Source, out: Path) -> list[str]:
    """Copy the tokenizer files (by their known names only) from where the run says; a run whose
    tokenizer cannot be found is an error, since engines cannot serve the export without it."""
    folder = tokenizer_dir(src)
    if src.tokenizer is not None and src.tokenizer.is_file() and src.tokenizer.name not in TOKENIZER_FILES:
        folder = None  # not a tokenizer file: copy nothing from beside it
    has_files = folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES)
    if not has_files and src.run:
        named_by = "model.tokenizer_path" if src.config is not None else "hf_assets_path"
        raise ConvertError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) at {src.tokenizer}, the run's "
            f"{named_by} (relative paths are taken from the current directory); pass --tokenizer PATH"
        )
    return copy_tokenizer_files(folder, out)


def _input_amaxes(src: Source, o: Options) -> tuple[dict[str, torch.Tensor], str]:
    if src.qat.activation_scale == "none":
        return {}, "none: weight-only QAT (W4A16), inputs stay in high precision"
    if src.qat.activation_scale == "static" and src.input_amax:
        return src.input_amax, "static: calibrated during training and frozen"
    if o.calibration_batches == 0:
        return {}, "absent (--calibration-batches 0): only engines with dynamic activation scales can run it"
    amax = calibrated_input_amax(
        src, o.calibration_batches, o.calibration_batch_size, o.calibration_data, o.calibration_seq_len
    )
    data = o.calibration_data or (src.config.dataset.path if src.config else "?")
    return amax, f"calibrated by the converter over {o.calibration_batches} batches of {data}"


def check_exportable(src: Source) -> None:
    """Refuse, naming the checkpoint, what engines could not decode as trained: a QAT config that
    selects no linear or one NVFP4 cannot quantize (``in_features`` not a multiple of 16: the fix
    named as ``--exclude`` patterns for a Hugging Face source), the QAT settings ``export_problems``
    lists, and static input scales not calibrated or not finite."""
    with torch.device("meta"):
        model = Transformer(src.args)
    if not nvfp4.selected_linears(model, src.qat):
        raise ConvertError(
            f"{src.path}: its QAT config (include {list(src.qat.include)}, exclude "
            f"{list(src.qat.exclude)}) selects no linear layer: there is nothing to quantize"
        )
    if bad := nvfp4.unquantizable_linears(model, src.qat):
        name, k = next(iter(bad.items()))
        fix = "exclude them in the run's QAT config"
        if not src.run:
            fix = f"keep them in high precision with --exclude {shlex.join(src.qat.excluding(bad))}"
        raise ConvertError(
            f"{src.path}: {name} ({adapter.to_hf_module(name)}) has in_features={k}, not a multiple of 16 (NVFP4 "
            f"quantizes blocks of 16 along it; {len(bad)} such linears): {fix}"
        )
    if problems := export_problems(model, src.qat):
        raise ConvertError(
            f"{src.path}: cannot be exported as NVFP4 that engines decode as trained: "
            f"{'; '.join(problems)}. Export it in float with --format hf"
        )
    if src.qat.activation_scale != "static":
        return
    for name, amax in src.input_amax.items():
        if not torch.isfinite(amax):
            raise ConvertError(
                f"{src.path}: the calibrated input amax of {name} is {float(amax)}; "
                "refusing to export a non-finite input_scale"
            )
        if amax < 0:
            raise ConvertError(
                f"{src.path}: its static activation scales were never calibrated ({name}); "
                f"{src.method.removeprefix('PTQ: ')}. Convert a step saved after QAT started"
            )


def write_checkpoint(src: Source, out: Path, o: Options, log: Callable[[str], None]) -> None:
    """Write the converted checkpoint into the empty folder ``out``."""
    out_dtype = o.dtype or src.cast
    writer = SafetensorsWriter(out, o.max_shard_bytes)
    quantized: set[str] = set()
    extra = {}
    if o.fmt != "hf":
        check_exportable(src)
        log(f"method: {src.method}")
        amaxes, how = _input_amaxes(src, o)
        log(f"input scales: {how}")
        groups = qat_groups(src)
        total = sum(map(len, groups))
        for module, _, q in quantized_groups(src):
            s_in = nvfp4.tensor_scale(amaxes[module], src.qat.tensor_scale) if module in amaxes else None
            for suffix, t in layer_tensors(o.fmt, q, s_in).items():
                writer.add(f"{adapter.to_hf_module(module)}.{suffix}", t)
            quantized.add(module)
            log(f"[{len(quantized)}/{total}] {module}")
        extra = {
            "method": src.method,
            "activation_scale": src.qat.activation_scale,
            "tensor_scale": src.qat.tensor_scale,
            "block_scale_rule": src.qat.block_scale_rule,
            "input_scale": how,
            "source": str(src.path),
        }
    for name in src.names:
        if name.removesuffix(".weight") in quantized or (src.args.tie_word_embeddings and name == "output.weight"):
            continue
        writer.add(adapter.to_hf(name), _cast(read_finite(src, name), out_dtype))
    writer.close()
    # Engines and transformers run NVFP4 checkpoints in 16 bits (compressed-tensors' forward fails
    # on fp32 activations): an fp32 run keeps its float tensors, and config.json says bfloat16.
    run_dtype = out_dtype or torch.bfloat16
    if o.fmt != "hf" and run_dtype not in (torch.bfloat16, torch.float16):
        run_dtype = torch.bfloat16
    cfg = hf_config_from_args(src.args, run_dtype)
    if o.fmt != "hf":
        ignore = _ignored(src, quantized)
        weight_only = src.qat.activation_scale == "none"
        cfg["quantization_config"] = quantization_config(o.fmt, ignore, extra, weight_only)
        if o.fmt == "modelopt":
            hq = hf_quant_config(ignore, "nvfp4-titan", weight_only)
            (out / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
    _copy_tokenizer(src, out)
    cfg.update(_special_token_ids(src))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    marker = {"writer": "nvfp4-titan", "format": o.fmt, "source": str(src.path), "method": extra.get("method")}
    (out / MARKER).write_text(json.dumps(marker, indent=2))


def _special_token_ids(src: Source) -> dict[str, int]:
    """bos/eos/pad ids for config.json: a Hugging Face source's own; a run's EOS (documents are
    trained with EOS appended and no BOS, so no BOS is claimed)."""
    if src.config is None and (src.path / "config.json").is_file():
        hf = read_config(src.path)
        return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    from nvfp4_titan.data.tokenizer import load_tokenizer

    return {} if src.tokenizer is None else {"eos_token_id": load_tokenizer(src.tokenizer).eos_id}


def convert_checkpoint(
    source: Path, output: Path, o: Options, overwrite: bool = False, log: Callable[[str], None] = lambda s: None
) -> Source:
    """Convert ``source`` into ``output`` atomically (nothing is left behind on failure). With
    ``o.verify`` the NVFP4 weights are decoded from the written files (``verify``, its table
    printed) before the output is put in place: ``VerifyError`` on a mismatch, and an existing
    ``output`` is left as it was."""
    if o.fmt not in (*FORMATS, "hf"):
        raise ConvertError(f"--format {o.fmt}: use one of {(*FORMATS, 'hf')}")
    check_output(source, output, overwrite)
    if o.torchtitan:
        from nvfp4_titan.torchtitan_qat.export import torchtitan_source  # needs the torchtitan extra

        src = torchtitan_source(source, o.torchtitan, o.torchtitan_overrides)
    else:
        src = resolve_source(source)
    if o.tokenizer is not None:
        src.tokenizer = o.tokenizer
    if o.exclude is not None:
        if src.run:
            raise ConvertError(
                f"--exclude chooses what PTQ of a Hugging Face folder quantizes; {source} is a training run's "
                "checkpoint, exported as it trained (its QAT config)"
            )
        src.qat = dataclasses.replace(src.qat, exclude=o.exclude)
    if o.block_scale_rule is not None:
        if src.run and o.block_scale_rule != src.qat.block_scale_rule:
            raise ConvertError(
                f"--block-scale-rule {o.block_scale_rule}: {source} trained with block_scale_rule "
                f"{src.qat.block_scale_rule!r} and is exported with the block scales it trained with; drop the "
                "option (it chooses the rule of PTQ of a Hugging Face folder)"
            )
        src.qat = dataclasses.replace(src.qat, block_scale_rule=o.block_scale_rule)
    with atomic_folder(output, source) as tmp:
        write_checkpoint(src, tmp, o, log)
        if o.verify and o.fmt != "hf" and (bad := verify(tmp, src, o.fmt)):
            raise VerifyError(
                f"--verify: {bad} quantized weights of {output} decode differently from the QAT forward's "
                "(the rows marked NO in the table it printed); nothing was written"
            )
    return src
