"""Training checkpoint (DCP, any world size) or HF directory -> NVFP4 inference checkpoint.

    python scripts/convert_to_nvfp4.py CHECKPOINT OUTPUT_DIR [--format modelopt|compressed-tensors|hf]

Streams one fused group of weights at a time from the DCP metadata and quantizes it with the
numerics of the QAT forward: the recipe's mixed-precision cast, the fused-group amax and the
recipe's QAT config, all read from the checkpoint. Writes into a temporary folder renamed
into place at the end: a failed conversion leaves no OUTPUT_DIR behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

import nvfp4
from models.llama3 import CheckpointError, ModelArgs, Transformer
from models.llama3 import state_dict_adapter as adapter
from models.llama3.args import model_args_from_json
from models.llama3.hf import (
    TOKENIZER_FILES,
    SafetensorsWriter,
    TensorReader,
    _cast,
    args_from_hf_config,
    copy_tokenizer_files,
    hf_config_from_args,
    read_config,
)
from nvfp4.export import (
    FORMATS,
    decode,
    export_problems,
    hf_quant_config,
    layer_tensors,
    quantization_config,
)
from parallel.parallelize import DTYPES
from training.checkpoint import CheckpointLoadError, damage, latest, step_number
from training.config import Config, ConfigError, load_config


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file or tensor."""


@dataclass
class Source:
    """Where the weights come from and how training quantized them."""

    path: Path
    args: ModelArgs
    qat: nvfp4.QATConfig
    cast: torch.dtype | None  # what the QAT forward saw (FSDP param dtype); None: as stored
    read: Callable[[str], torch.Tensor]  # our tensor name -> tensor
    names: list[str]
    config: Config | None = None
    tokenizer: Path | None = None  # the tokenizer file or folder the run names (HF: the folder)
    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "PTQ of a Hugging Face checkpoint"  # what the export is, for its metadata


def _dcp_step(path: Path) -> Path | None:
    if (path / ".metadata").is_file():
        if (why := damage(path)) is not None:
            raise ConvertError(f"{path} is damaged: {why}; convert another step")
        return path
    for folder in (path / "checkpoint", path):
        try:
            step = latest(folder)
        except CheckpointLoadError as e:
            raise ConvertError(str(e)) from None
        if step is not None:
            return step
    return None


class _MetadataOnceReader(dcp.FileSystemReader):
    """Reads ``.metadata`` once: ``dcp.load`` asks for it on every call, and the converter loads
    tensor by tensor (unpickling it each time cost 23 of 31 s for a 135M-parameter run)."""

    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata()
        return self._metadata


def _dcp_source(step: Path) -> Source:
    for need in ("config.toml", "model_args.json"):
        if not (step / need).is_file():
            raise ConvertError(f"{step}: no {need}; it was not written by train.py (convert a step-N folder of a run)")
    try:
        cfg = load_config(step / "config.toml")
    except ConfigError as e:
        raise ConvertError(f"{step}/config.toml: {e}") from None
    args = model_args_from_json((step / "model_args.json").read_text())
    reader = _MetadataOnceReader(str(step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = reader.read_metadata().state_dict_metadata

    def read(name: str) -> torch.Tensor:
        key = f"model.{name}"
        if key not in meta:
            raise ConvertError(f"{step}: has no tensor {key}; is it a checkpoint of this model?")
        m = meta[key]
        t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load({key: t}, storage_reader=reader, no_dist=True)
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            raise ConvertError(f"{step}: cannot read {key}: the checkpoint is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
        return t

    names = [k.removeprefix("model.") for k in meta if k.startswith("model.") and not k.endswith("input_amax")]
    src = Source(step, args, cfg.qat.nvfp4_config(), DTYPES[cfg.training.mixed_precision_param], read, names, cfg,
                 Path(cfg.model.tokenizer_path), method=_method(step, cfg))
    if cfg.qat.activation_scale == "static":
        src.input_amax = {k.removeprefix("model.").removesuffix(".input_amax"): read(k.removeprefix("model."))
                          for k in meta if k.endswith("input_amax")}
    return src


def _method(step: Path, cfg: Config) -> str:
    """QAT or PTQ, truthfully: a float run, or a step saved before QAT started, is exported by
    post-training quantization of its weights."""
    q = cfg.qat
    if not q.enable:
        return "PTQ: trained in float (qat.enable = false), quantized by the converter"
    n = step_number(step)
    if n is not None and n <= q.start_step:
        return f"PTQ: saved at {step.name}, before QAT started (qat.start_step = {q.start_step})"
    return f"QAT ({q.activation_scale} activation scales) from step {q.start_step + 1}"


def _hf_source(path: Path) -> Source:
    config = read_config(path)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"{path} is already quantized ({method}); convert the float checkpoint or the training run")
    args = args_from_hf_config(config, str(path / "config.json"))
    reader = TensorReader(path)

    def read(name: str) -> torch.Tensor:
        key = adapter.to_hf(name)
        if key not in reader.files:
            raise ConvertError(f"{path}: has no tensor {key}")
        return reader(key)

    names = [adapter.from_hf(k) for k in reader.files if not k.endswith("rotary_emb.inv_freq")]
    return Source(path, args, nvfp4.QATConfig(), None, read, names, None, path)


def resolve_source(path: Path) -> Source:
    """A DCP step folder, a run folder (its latest step) or a Hugging Face directory."""
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if (step := _dcp_step(path)) is not None:
        return _dcp_source(step)
    if (path / "config.json").is_file():
        return _hf_source(path)
    raise ConvertError(f"{path}: not a checkpoint (no DCP .metadata, no step-N folders, no config.json)")


def qat_groups(src: Source) -> list[list[str]]:
    """Module names of the linears QAT quantized, grouped as they share one weight amax."""
    with torch.device("meta"):
        model = Transformer(src.args)
    nvfp4.prepare(model, src.qat)
    names = {m: n for n, m in model.named_modules()}
    groups, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, nvfp4.NVFP4QATLinear) and name not in seen:
            group = [name] + [names[p] for p in m.amax_peers]
            seen.update(group)
            groups.append(group)
    return groups


def _weight(src: Source, module: str) -> torch.Tensor:
    w = _cast(src.read(f"{module}.weight"), src.cast)
    if not torch.isfinite(w).all():
        raise ConvertError(f"{src.path}: tensor {module}.weight holds NaN or Inf; refusing to export it")
    return w


def quantized_groups(src: Source):
    """Yield (module, weight as the forward saw it, NVFP4 weight) for every QAT linear."""
    for group in qat_groups(src):
        ws = {m: _weight(src, m) for m in group}
        amax = torch.stack([nvfp4.abs_max(w) for w in ws.values()]).max()
        for m, w in ws.items():
            yield m, w, nvfp4.quantize(w, amax, src.qat.tensor_scale)


def _calibration_windows(src: Source, data: Path | None, seq_len: int | None) -> torch.Tensor:
    from data.dataset import DataError, build_windows, load_documents
    from data.tokenizer import TokenizerError, load_tokenizer

    cfg = src.config
    if data is None and cfg is None:
        raise ConvertError("a Hugging Face source has no recipe: give --calibration-data (or --calibration-batches 0)")
    try:  # the loaders' messages name recipe keys; the converter's options are the fix here
        tok = load_tokenizer(_tokenizer_dir(src) if src.config is None else src.tokenizer)
        docs = load_documents(data or cfg.dataset.path, cfg.dataset.text_field if cfg else "text")
    except TokenizerError as e:
        raise ConvertError(f"calibration: {str(e).removesuffix('; set model.tokenizer_path')}; pass --tokenizer PATH "
                           "(relative paths in the run's config are taken from the current directory)") from None
    except DataError as e:
        raise ConvertError(f"calibration: {str(e).split('; set dataset.path')[0]}; pass --calibration-data PATH, "
                           "or --calibration-batches 0 to export no input_scale") from None
    seq = seq_len or (cfg.training.seq_len if cfg else 2048)
    w = build_windows(docs, tok, seq, cfg.dataset.validation_fraction if cfg else 0.05, cfg.training.seed if cfg else 0)
    return w.validation if len(w.validation) else w.train


def build_model(src: Source, qat: nvfp4.QATConfig | None) -> Transformer:
    """The whole model in memory with the weights as the forward saw them (cast), QAT
    prepared with ``qat`` if given; calibrated input amaxes loaded, others uncalibrated."""
    with torch.device("meta"):
        model = Transformer(src.args)
    if qat is not None:
        nvfp4.prepare(model, qat)
    state = {n: _cast(src.read(n), src.cast) for n in src.names}
    state.update({f"{k}.input_amax": v for k, v in src.input_amax.items()})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for m in nvfp4.qat_linears(model):
        if m.input_amax.is_meta:
            m.input_amax = torch.full((), -1.0)
        m._calibrated = bool(m.input_amax >= 0)
    return model


def calibrated_input_amax(src: Source, n_batches: int, batch_size: int, data: Path | None,
                          seq_len: int | None) -> dict[str, torch.Tensor]:
    """Input amaxes of every QAT linear over ``n_batches`` held-out batches (the model in memory)."""
    model = build_model(src, nvfp4.QATConfig(**{**src.qat.__dict__, "activation_scale": "static"}))
    windows = _calibration_windows(src, data, seq_len)[: n_batches * batch_size, :-1]
    nvfp4.calibrate(model, list(windows.split(batch_size)))
    return {n: m.input_amax for n, m in model.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}


def _ignored(src: Source, quantized: set[str]) -> list[str]:
    with torch.device("meta"):
        model = Transformer(src.args)
    return sorted(adapter.to_hf_module(n) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n not in quantized)


def _tokenizer_dir(src: Source) -> Path | None:
    if src.tokenizer is None:
        return None
    return src.tokenizer if src.tokenizer.is_dir() else src.tokenizer.parent


def _copy_tokenizer(src: Source, out: Path) -> list[str]:
    """Copy the tokenizer files (by their known names only) from where the run says; a run whose
    tokenizer cannot be found is an error, since engines cannot serve the export without it."""
    folder = _tokenizer_dir(src)
    if src.tokenizer is not None and src.tokenizer.is_file() and src.tokenizer.name not in TOKENIZER_FILES:
        folder = None  # not a tokenizer file: copy nothing from beside it
    has_files = folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES)
    if not has_files and src.config is not None:
        raise ConvertError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) at {src.tokenizer}, the run's "
            f"model.tokenizer_path (relative paths are taken from the current directory); pass --tokenizer PATH")
    return copy_tokenizer_files(folder, out)


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


def _input_amaxes(src: Source, o: Options) -> tuple[dict[str, torch.Tensor], str]:
    if src.qat.activation_scale == "none":
        return {}, "none: weight-only QAT (W4A16), inputs stay in high precision"
    if src.qat.activation_scale == "static" and src.input_amax:
        return src.input_amax, "static: calibrated during training and frozen"
    if o.calibration_batches == 0:
        return {}, "absent (--calibration-batches 0): only engines with dynamic activation scales can run it"
    amax = calibrated_input_amax(src, o.calibration_batches, o.calibration_batch_size, o.calibration_data,
                                 o.calibration_seq_len)
    data = o.calibration_data or (src.config.dataset.path if src.config else "?")
    return amax, f"calibrated by the converter over {o.calibration_batches} batches of {data}"


def check_exportable(src: Source) -> None:
    """Refuse, naming the checkpoint, what engines could not decode as trained: the QAT settings
    ``export_problems`` lists, and static input scales not calibrated or not finite."""
    with torch.device("meta"):
        model = Transformer(src.args)
    if not nvfp4.selected_linears(model, src.qat):
        raise ConvertError(f"{src.path}: its QAT config (include {list(src.qat.include)}, exclude "
                           f"{list(src.qat.exclude)}) selects no linear layer: there is nothing to quantize")
    if problems := export_problems(model, src.qat):
        raise ConvertError(f"{src.path}: cannot be exported as NVFP4 that engines decode as trained: "
                           f"{'; '.join(problems)}. Export it in float with --format hf")
    if src.qat.activation_scale != "static":
        return
    for name, amax in src.input_amax.items():
        if not torch.isfinite(amax):
            raise ConvertError(f"{src.path}: the calibrated input amax of {name} is {float(amax)}; "
                               "refusing to export a non-finite input_scale")
        if amax < 0:
            raise ConvertError(f"{src.path}: its static activation scales were never calibrated ({name}); "
                               f"{src.method.removeprefix('PTQ: ')}. Convert a step saved after QAT started")


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
        extra = {"method": src.method, "activation_scale": src.qat.activation_scale,
                 "tensor_scale": src.qat.tensor_scale, "input_scale": how, "source": str(src.path)}
    for name in src.names:
        if name.removesuffix(".weight") in quantized or (src.args.tie_word_embeddings and name == "output.weight"):
            continue
        t = src.read(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConvertError(f"{src.path}: tensor {name} holds NaN or Inf; refusing to export it")
        writer.add(adapter.to_hf(name), _cast(t, out_dtype))
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


def _special_token_ids(src: Source) -> dict[str, int]:
    """bos/eos/pad ids for config.json: a Hugging Face source's own; a run's EOS (documents are
    trained with EOS appended and no BOS, so no BOS is claimed)."""
    if src.config is None:
        hf = read_config(src.path)
        return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    from data.tokenizer import load_tokenizer

    return {"eos_token_id": load_tokenizer(src.tokenizer).eos_id}


def convert(source: Path, output: Path, o: Options, overwrite: bool = False,
            log: Callable[[str], None] = lambda s: None) -> Source:
    """Convert ``source`` into ``output`` atomically (nothing is left behind on failure)."""
    if o.fmt not in (*FORMATS, "hf"):
        raise ConvertError(f"--format {o.fmt}: use one of {(*FORMATS, 'hf')}")
    _check_output(source, output, overwrite)
    src = resolve_source(source)
    if o.tokenizer is not None:
        src.tokenizer = o.tokenizer
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output, source)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.convert-{os.getpid()}-", dir=output.parent))
        (tmp / _TMP_MARK).touch()
    except OSError as e:
        raise ConvertError(_unwritable(output, e)) from None
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    try:
        try:
            write_checkpoint(src, tmp, o, log)
        except (OSError, SafetensorError) as e:
            if not _is_write_failure(e):
                raise
            raise ConvertError(_unwritable(output, e)) from None
        (tmp / _TMP_MARK).unlink()
        _umask_permissions(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return src


def _is_write_failure(e: BaseException) -> bool:
    """A full disk, a quota, a read-only or forbidden output (not a source that cannot be read)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
    return any(s in str(e) for s in ("No space left", "Disk quota", "Read-only file system", "File too large"))


def _unwritable(output: Path, e: BaseException) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
    return (f"cannot write {output} ({type(e).__name__}: {reason}); nothing was written. Choose an output "
            "folder that is writable and has room for the checkpoint")


_TMP_MARK = ".nvfp4-convert-temporary"  # in every temporary folder: only those are ever removed


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside the source (--overwrite would delete the
    checkpoint or the whole run; keep_latest_k deletes a step with what lies inside it), that is
    a link or a file, or that --overwrite would replace though it is no converted checkpoint."""
    src, out = source.resolve(), output.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise ConvertError(f"output {output} {'is' if out == src else 'holds' if src.is_relative_to(out) else 'lies inside'} "
                           f"the checkpoint {source}; write the NVFP4 checkpoint to a folder outside it")
    if output.is_symlink():
        raise ConvertError(f"output {output} is a symbolic link; name a real folder")
    for p in (output, *output.parents):
        if p.exists() and not p.is_dir():
            raise ConvertError(f"output {output}: {p} is a file, not a folder; name a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConvertError(f"{output} exists and is not empty; pass --overwrite to replace it")
        if not (output / "config.json").is_file():
            raise ConvertError(f"{output} holds no config.json: it is not a converted checkpoint, and --overwrite "
                               "replaces only those; choose a new or empty folder")


def _remove_stale_temporaries(output: Path, source: Path) -> None:
    """Our temporary folders for ``output`` whose process is gone (SIGKILL, power loss)."""
    for tmp in output.parent.glob(f".{output.name}.convert-*-*"):
        pid = tmp.name.removeprefix(f".{output.name}.convert-").split("-")[0]
        ours = (tmp / _TMP_MARK).is_file() and not source.resolve().is_relative_to(tmp.resolve())
        if ours and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through convert's cleanup


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the output the permissions the user's umask gives."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


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
                q = nvfp4.NVFP4(tensors["weight_packed"], tensors["weight_scale"], 1.0 / tensors["weight_global_scale"].reshape(()))
                s_in = 1.0 / tensors["input_global_scale"].reshape(()) if "input_global_scale" in tensors else None
            parent, _, child = name.rpartition(".")
            s_in = s_in if act == "static" else None
            setattr(model.get_submodule(parent), child, nvfp4.NVFP4Linear(q, None, s_in, mode, weight_only=act == "none"))
        else:
            for suffix, t in tensors.items():
                setattr(model.get_submodule(name), suffix, torch.nn.Parameter(t, requires_grad=False))
    model.tie_weights()
    return model


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {low}")
        return int(text)
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="DCP step folder, training run folder, or HF directory")
    p.add_argument("output", type=Path, help="new (or empty) output directory")
    p.add_argument("--format", default="modelopt", choices=(*FORMATS, "hf"))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of unquantized tensors (default: the training param dtype)")
    p.add_argument("--calibration-batches", type=_at_least(0), default=8,
                   help="dynamic-mode checkpoints: batches that calibrate the exported input_scale (0: none)")
    p.add_argument("--calibration-batch-size", type=_at_least(1), default=4)
    p.add_argument("--calibration-data", type=Path, help="corpus for calibration (default: the recipe's dataset)")
    p.add_argument("--calibration-seq-len", type=_at_least(1))
    p.add_argument("--tokenizer", type=Path, help="tokenizer file or folder to copy (default: the run's model.tokenizer_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument("--verify", action="store_true", help="decode every weight again and compare; non-zero exit on mismatch")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    o = Options(a.format, DTYPES[a.dtype] if a.dtype else None, a.calibration_batches, a.calibration_batch_size,
                a.calibration_data, a.calibration_seq_len, tokenizer=a.tokenizer)
    try:
        src = convert(a.checkpoint, a.output, o, a.overwrite, log)
        print(f"wrote {a.output} ({a.format})")
        if a.verify and a.format != "hf":
            return 1 if verify(a.output, src, a.format) else 0
        return 0
    except (ConvertError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # convert's cleanup already ran: nothing was written
        print(f"interrupted: {a.output} was not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
