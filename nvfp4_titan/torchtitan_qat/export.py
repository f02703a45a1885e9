"""A torchtitan DCP checkpoint of an NVFP4 QAT run as the converter's ``Source``: torchtitan's
tensor names mapped to this project's (through torchtitan's own Hugging Face adapter, which also
undoes its q/k row permutation), its model config mapped to ``ModelArgs``, and the QAT config the
converter applied, in this project's module names.

Row permutations and splitting the fused ``wqkv`` into q/k/v leave the NVFP4 codes unchanged: blocks
run along in_features, and q, k and v share one tensor scale (``wqkv``'s amax is the max of theirs),
so the converter quantizes each weight exactly as the QAT forward did. Checked against torchtitan
0.3.0 ``models/llama3/state_dict_adapter.py`` (``to_hf``), ``models/common/attention.py``
(``FusedQKVLinear._split_qkv_on_save``: checkpoints hold wq/wk/wv) and
``components/checkpointer/dcp.py`` (model tensors at the top level of the DCP state dict).
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import torch
from torchtitan.models.common.rope import RoPE
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

import nvfp4
from nvfp4_titan.convert.source import ConvertError, Source, _MetadataOnceReader, load_tensor
from nvfp4_titan.models.llama3 import ModelArgs, Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.args import RopeScaling
from nvfp4_titan.torchtitan_qat.modules import QATLinear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def trainer_config(spec: str, overrides: tuple[str, ...] = ()):
    """The ``Trainer.Config`` that ``MODULE:FUNCTION`` returns (what ``--module M --config F`` trains),
    with torchtitan's ``overrides`` applied (``--override.imports`` entries: ``module.function`` or
    ``module.function={json kwargs}``).

    Raises ``ConvertError`` for a spec that is not ``module:function``, names nothing callable, or an
    override that cannot be applied."""
    module, _, function = spec.partition(":")
    if not module or not function:
        raise ConvertError(
            f"--torchtitan {spec!r}: give MODULE:FUNCTION, e.g. nvfp4_titan.torchtitan_qat.configs:debug"
        )
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConvertError(f"--torchtitan {spec!r}: {e}") from None
    config = fn()
    if overrides:
        from torchtitan.config.override import OverrideConfig, apply_overrides, parse_cli_imports

        try:
            if not apply_overrides(OverrideConfig(imports=parse_cli_imports(list(overrides))), config):
                raise ConvertError(f"--torchtitan-override {' '.join(overrides)}: replaced nothing in {spec}")
        except (ImportError, ValueError, TypeError) as e:
            raise ConvertError(f"--torchtitan-override {' '.join(overrides)}: {e}") from None
    return config


def model_args(model_config) -> ModelArgs:
    """``ModelArgs`` of a torchtitan Llama 3 ``Llama3Model.Config`` (RoPE: none or "llama" scaling).

    Raises ``ConvertError`` for a RoPE scaling this project's model does not compute."""
    layer = model_config.layers[0]
    attn = layer.attention
    rope: RoPE.Config = attn.rope
    if rope.scaling == "llama":
        scaling = RopeScaling(
            factor=rope.scaling_factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    elif rope.scaling == "none":
        scaling = None
    else:
        raise ConvertError(f"torchtitan RoPE scaling {rope.scaling!r} is not supported by the export (none, llama)")
    n_heads = attn.n_heads
    return ModelArgs(
        dim=model_config.dim,
        n_layers=len(model_config.layers),
        n_heads=n_heads,
        n_kv_heads=attn.n_kv_heads or n_heads,
        vocab_size=model_config.vocab_size,
        ffn_dim=layer.feed_forward.w1.out_features,
        norm_eps=model_config.norm.eps,
        rope_theta=rope.theta,
        rope_scaling=scaling,
        tie_word_embeddings=model_config.enable_weight_tying,
        max_seq_len=rope.max_seq_len,
        head_dim=attn.head_dim or model_config.dim // n_heads,
    )


def our_modules(fqn: str) -> list[str]:
    """This project's module names for a torchtitan linear (``wqkv`` is three)."""
    if fqn == "lm_head":
        return ["output"]
    m = re.fullmatch(r"(layers\.\d+\.attention)\.qkv_linear\.(wqkv|wq|wk|wv)", fqn)
    if m:
        prefix, name = m.groups()
        return [f"{prefix}.{w}" for w in ("wq", "wk", "wv")] if name == "wqkv" else [f"{prefix}.{name}"]
    return [fqn]


def qat_config(model_config) -> nvfp4.QATConfig:
    """The ``QATConfig`` of the converted ``model_config``, with the quantized linears named as in
    this project's model. Raises ``ConvertError`` when no linear was converted."""
    converted = list(model_config.traverse(QATLinear.Config))
    if not converted:
        raise ConvertError(
            "the torchtitan config converts no linear to NVFP4 QAT: add NVFP4QATConverter.Config() to its "
            "model_registry converters, or name the run's --override.imports with --torchtitan-override"
        )
    qat = converted[0][1].qat
    names = tuple(n for fqn, *_ in converted for n in our_modules(fqn))
    return nvfp4.QATConfig(
        include=names,
        exclude=(),
        activation_scale=qat.activation_scale,
        tensor_scale=qat.tensor_scale,
        share_fused_amax=qat.share_fused_amax,
    )


def latest_step(path: Path) -> Path:
    """``path`` if it is a DCP step, else the highest complete ``step-N`` of ``path/checkpoint`` or
    ``path`` (torchtitan's layout: ``dump_folder/checkpoint/step-N``; DCP writes ``.metadata`` last, so
    a step without it was interrupted). Raises ``ConvertError`` when there is none."""
    if (path / ".metadata").is_file():
        return path
    for folder in (path / "checkpoint", path):
        steps = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / ".metadata").is_file()]
        if steps:
            return max(steps, key=lambda p: int(p.name.removeprefix("step-")))
    raise ConvertError(
        f"{path}: not a DCP checkpoint (no .metadata, no complete step-N folder in it or its checkpoint/)"
    )


def _narrowed(step: Path, key: str, dtype: torch.dtype, used: str) -> str:
    return (
        f"{step}: {key} is stored in {dtype}, narrower than {used}: torchtitan's checkpoint.export_dtype "
        f"casts the last step's model-only save; convert a full step saved at checkpoint.interval, or train with "
        f"checkpoint.export_dtype = 'float32'"
    )


def torchtitan_source(path: Path, spec: str, overrides: tuple[str, ...] = ()) -> Source:
    """The DCP step (or the latest step of the run folder) ``path`` of a torchtitan run trained with
    ``spec`` (``MODULE:FUNCTION``) and ``overrides`` (its ``--override.imports``) as a ``Source`` in
    this project's tensor names.

    Raises ``ConvertError`` for a missing or damaged step or a checkpoint of another model."""
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    step = latest_step(path)
    config = trainer_config(spec, overrides)
    model_config = config.model_spec.model
    args = model_args(model_config)
    tt_adapter = Llama3StateDictAdapter(model_config, None)
    reader = _MetadataOnceReader(str(step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = reader.read_metadata().state_dict_metadata
    keys: dict[str, str] = {}  # our name -> torchtitan key
    for key, m in meta.items():
        if not hasattr(m, "size") or key.endswith(".input_amax"):
            continue
        try:
            hf = tt_adapter.to_hf({key: torch.empty(tuple(m.size), device="meta")})
        except KeyError:  # not a model tensor (train_state, lr_scheduler, ...)
            continue
        for hf_key in hf:
            keys[adapter.from_hf(hf_key)] = key
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        del shapes["output.weight"]
    expected = set(shapes)
    if missing := sorted(expected - set(keys)):
        raise ConvertError(
            f"{step}: has no tensor for {missing[0]} ({len(missing)} missing): is it a checkpoint of "
            f"{spec}'s model (flavor {config.model_spec.flavor})?"
        )

    def read(name: str) -> torch.Tensor:
        key = keys.get(name)
        if key is None:
            raise ConvertError(f"{step}: has no tensor for {name}")
        return next(iter(tt_adapter.to_hf({key: load_tensor(step, reader, key)}).values()))

    cast = _DTYPES[config.training.mixed_precision_param]
    for name, shape in shapes.items():
        m = meta[keys[name]]
        if tuple(m.size) != shape:
            raise ConvertError(f"{step}: {keys[name]} has shape {tuple(m.size)}, not {spec}'s model's")
        if m.properties.dtype not in (torch.float32, cast):
            raise ConvertError(_narrowed(step, keys[name], m.properties.dtype, f"the {cast} the QAT forward used"))
    qat = qat_config(model_config)
    amaxes = {key: load_tensor(step, reader, key) for key in meta if key.endswith(".input_amax")}
    input_amax = {}  # static: our module name -> the calibrated amax (a fused wqkv's is q's, k's and v's)
    for key, amax in amaxes.items():
        if qat.activation_scale != "static" and amax >= 0:
            raise ConvertError(
                f"{step}: {key} holds a calibrated amax: the run trained with static activation scales, but {spec}"
                f"{' with ' + ' '.join(overrides) if overrides else ''} gives {qat.activation_scale!r} ones; give "
                f"--torchtitan (and --torchtitan-override) as the run was trained"
            )
        if qat.activation_scale == "static":
            if amax.dtype != torch.float32:
                raise ConvertError(_narrowed(step, key, amax.dtype, "the float32 amax the QAT forward used"))
            if amax < 0:
                raise ConvertError(
                    f"{step}: {key} was never calibrated, as in a run trained with dynamic activation scales, but "
                    f"{spec} gives static ones; give --torchtitan (and --torchtitan-override) as the run was trained"
                )
            input_amax |= {name: amax for name in our_modules(key.removesuffix(".input_amax"))}
    if qat.activation_scale == "static" and (missing := sorted(set(qat.include) - set(input_amax))):
        raise ConvertError(f"{step}: has no calibrated input amax for {missing[0]} ({len(missing)} missing)")
    return Source(
        step,
        args,
        qat,
        cast,
        read,
        sorted(expected),
        None,
        Path(config.hf_assets_path),
        input_amax=input_amax,
        method=f"QAT in torchtitan ({qat.activation_scale} activation scales), {spec}",
        run=True,
    )
