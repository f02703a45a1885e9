"""What the converter reads: a DCP step of a training run (any world size) or a Hugging Face
folder, as a ``Source`` (model arguments, QAT config, the forward's cast, a tensor reader), and the
weights of the QAT linears quantized exactly as the QAT forward quantized them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

import nvfp4
from nvfp4_titan.models.llama3 import ModelArgs, Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.args import model_args_from_json
from nvfp4_titan.models.llama3.hf import (
    CheckpointError,
    TensorReader,
    _cast,
    args_from_hf_config,
    read_config,
)
from nvfp4_titan.parallel.parallelize import DTYPES
from nvfp4_titan.training import safe_dcp
from nvfp4_titan.training.checkpoint import damage, latest, step_number
from nvfp4_titan.training.config import Config, ConfigError, load_config
from nvfp4_titan.training.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError


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
    run: bool = False  # a training run's checkpoint (train.py, torchtitan): its tokenizer must be found


def _dcp_step(path: Path) -> Path | None:
    if (path / ".metadata").is_file():
        if (why := damage(path)) is not None:
            raise ConvertError(f"{path} is damaged: {why}; convert another step")
        return path
    for folder in (path / "checkpoint", path):
        try:
            step = latest(folder)
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
        if step is not None:
            return step
    return None


class _MetadataOnceReader(SafeFileSystemReader):
    """Reads ``.metadata`` once: ``dcp.load`` asks for it on every call, and the converter loads
    tensor by tensor (unpickling it each time cost 23 of 31 s for a 135M-parameter run)."""

    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata()
        return self._metadata


def load_tensor(step: Path, reader: _MetadataOnceReader, key: str) -> torch.Tensor:
    """The tensor ``key`` of the DCP step ``step``, read alone (in its stored dtype, on the CPU).
    Raises ``ConvertError`` when the step's files cannot give it (truncated or corrupt)."""
    m = reader.read_metadata().state_dict_metadata[key]
    t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safe_dcp.load({key: t}, step, reader, no_dist=True)
    except UnsafeCheckpointError as e:
        raise ConvertError(str(e)) from None
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise ConvertError(
            f"{step}: cannot read {key}: the checkpoint is truncated or corrupt ({str(e).splitlines()[0][:200]})"
        ) from None
    return t


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
        return load_tensor(step, reader, key)

    names = [k.removeprefix("model.") for k in meta if k.startswith("model.") and not k.endswith("input_amax")]
    src = Source(
        step,
        args,
        cfg.qat.nvfp4_config(),
        DTYPES[cfg.training.mixed_precision_param],
        read,
        names,
        cfg,
        Path(cfg.model.tokenizer_path),
        method=_method(step, cfg),
        run=True,
    )
    if cfg.qat.activation_scale == "static":
        src.input_amax = {
            k.removeprefix("model.").removesuffix(".input_amax"): read(k.removeprefix("model."))
            for k in meta
            if k.endswith("input_amax")
        }
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


def stored_name(src: Source, name: str) -> str:
    """A tensor's name as the source's files hold it (Hugging Face names in an HF folder)."""
    return adapter.to_hf(name) if src.config is None else name


def read_finite(src: Source, name: str) -> torch.Tensor:
    """The tensor ``name`` as stored; ``ConvertError`` naming it when it holds NaN or Inf (before
    calibration or quantization hides which tensor it was)."""
    t = src.read(name)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ConvertError(f"{src.path}: tensor {stored_name(src, name)} holds NaN or Inf; refusing to export it")
    return t


def _weight(src: Source, module: str) -> torch.Tensor:
    return _cast(read_finite(src, f"{module}.weight"), src.cast)


def quantized_groups(src: Source):
    """Yield (module, weight as the forward saw it, NVFP4 weight) for every QAT linear."""
    for group in qat_groups(src):
        ws = {m: _weight(src, m) for m in group}
        amax = torch.stack([nvfp4.amax(w) for w in ws.values()]).max()
        for m, w in ws.items():
            yield m, w, nvfp4.quantize(w, amax, src.qat.tensor_scale, src.qat.block_scale_rule)


def build_model(src: Source, qat: nvfp4.QATConfig | None) -> Transformer:
    """The whole model in memory with the weights as the forward saw them (cast), QAT
    prepared with ``qat`` if given; calibrated input amaxes loaded, others uncalibrated.
    Raises ``ConvertError`` naming a tensor that holds NaN or Inf."""
    with torch.device("meta"):
        model = Transformer(src.args)
    if qat is not None:
        nvfp4.prepare(model, qat)
    state = {n: _cast(read_finite(src, n), src.cast) for n in src.names}
    state.update({f"{k}.input_amax": v for k, v in src.input_amax.items()})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for m in nvfp4.qat_linears(model):
        if m.input_amax.is_meta:
            m.input_amax = torch.full((), -1.0)
        m._calibrated = bool(m.input_amax >= 0)
    return model


def tokenizer_dir(src: Source) -> Path | None:
    if src.tokenizer is None:
        return None
    return src.tokenizer if src.tokenizer.is_dir() else src.tokenizer.parent
