"""Read and write Hugging Face Llama checkpoints (config.json + safetensors), streaming.

``from_hf`` builds the model on the meta device and assigns one tensor at a time, so an
8B model is never held twice; ``to_hf`` writes one shard at a time.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.models.llama3.args import ROPE_TYPES, ModelArgs, RopeScaling
from nvfp4_titan.models.llama3.model import Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",  # an Instruct model's chat template (transformers >= 4.45 saves it apart)
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints stored this buffer


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the fix."""


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None


def _rope_scaling(cfg: dict, rope: dict, head_dim: int, source: str) -> RopeScaling | None:
    """RopeScaling of an HF rope dict, defaults resolved as transformers 5.24 resolves them
    (``modeling_rope_utils.py``: ``_compute_{linear_scaling,dynamic_ntk,yarn,longrope,llama3}_parameters``)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope_type={rope_type!r} is not supported; use one of {('default', *ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported (1.0)")

    def need(key: str):
        if rope.get(key) is None:
            raise CheckpointError(f"{source}: rope_type={rope_type!r} needs rope_scaling.{key}")
        return rope[key]

    max_pos = cfg.get("max_position_embeddings", 131072)
    original = int(
        rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos
    )
    if rope_type in ("linear", "dynamic"):
        return RopeScaling(rope_type=rope_type, factor=float(need("factor")))
    if rope_type == "llama3":
        return RopeScaling(
            factor=float(need("factor")),
            low_freq_factor=float(need("low_freq_factor")),
            high_freq_factor=float(need("high_freq_factor")),
            original_max_position_embeddings=int(need("original_max_position_embeddings")),
        )
    if rope_type == "yarn":
        original = int(need("original_max_position_embeddings"))
        factor = float(rope.get("factor") or max_pos / original)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rope.get("attention_factor")
        if attention is None:
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return RopeScaling(
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            truncate=bool(rope.get("truncate", True)),
            attention_factor=float(attention),
        )
    factor = float(rope.get("factor") or max_pos / original)  # longrope
    short, long = need("short_factor"), need("long_factor")
    for key, fs in (("short_factor", short), ("long_factor", long)):
        if len(fs) != head_dim // 2:
            raise CheckpointError(f"{source}: rope_scaling.{key} has {len(fs)} factors, head_dim / 2 = {head_dim // 2}")
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        rope_type="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=float(attention),
        short_factor=tuple(map(float, short)),
        long_factor=tuple(map(float, long)),
    )


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs of any Llama-architecture HF config (``LlamaForCausalLM``): shapes, GQA,
    head_dim, tied or untied embeddings, rms eps, rope theta and every rope type transformers'
    Llama accepts (transformers 4.x ``rope_scaling`` + ``rope_theta``, or 5.x ``rope_parameters``).

    Raises:
        CheckpointError: not a Llama, or a feature this model lacks (attention or MLP bias, an
            activation other than SiLU, partial rotary); the message names the key.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    try:
        return _args_from_hf_config(cfg, source)
    except CheckpointError:
        raise
    except (TypeError, AttributeError, ValueError) as e:  # a value of the wrong type
        raise CheckpointError(f"{source}: malformed ({type(e).__name__}: {e})") from None


def _args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise CheckpointError(
            f"{source}: model_type={cfg.get('model_type')!r}, architectures={archs}: "
            "not a Llama (LlamaForCausalLM) checkpoint"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported by this Llama model (no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (silu)")
    ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    missing = [k for k in ints if type(cfg.get(k)) is not int or cfg[k] < 1]
    missing += [
        k
        for k in ("num_key_value_heads", "head_dim")
        if cfg.get(k) is not None and (type(cfg[k]) is not int or cfg[k] < 1)
    ]
    if missing:
        said = ", ".join(f"{k} = {cfg.get(k)!r}" for k in missing)
        raise CheckpointError(f"{source}: {said}: {'each' if len(missing) > 1 else 'it'} must be a positive integer")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    try:
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(cfg, rope, head_dim, source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings", 131072),
            head_dim=head_dim,
        )
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _rope_scaling_json(rs: RopeScaling) -> dict:
    """HF ``rope_scaling`` of ``rs``: the keys its type reads."""
    out = {"rope_type": rs.rope_type}
    for k in rs.fields_used():
        v = getattr(rs, k)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for ``LlamaForCausalLM`` in the layout published Llama 3 checkpoints use."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if args.rope_scaling is None else _rope_scaling_json(args.rope_scaling),
        "tie_word_embeddings": args.tie_word_embeddings,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it; every file checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {k: path / v for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors weights (only safetensors are read)")
    files = {}
    for f in shards:
        for key in _open(f).keys():
            files[key] = f
    return files


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


class TensorReader:
    """Tensors of a Hugging Face directory by HF name; each safetensors file opened once."""

    def __init__(self, path: Path) -> None:
        self.files = weight_files(path)  # HF name -> file
        self._handles: dict[Path, Any] = {}

    def __call__(self, key: str) -> torch.Tensor:
        f = self.files[key]
        if f not in self._handles:
            self._handles[f] = _open(f)
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:  # a truncated or corrupt shard
            raise CheckpointError(f"{f}: cannot read tensor {key} ({e})") from None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, _, pname = name.rpartition(".")
    setattr(model.get_submodule(module), pname, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def iter_hf_tensors(path: Path, model_args: ModelArgs, expected: dict[str, torch.Size]):
    """Yield (our name, tensor) for every tensor of the HF checkpoint at ``path``, one at a
    time, checked against ``expected`` shapes and for finiteness; then check nothing is missing.
    """
    tied = model_args.tie_word_embeddings
    loaded: set[str] = {"output.weight"} if tied else set()
    read = TensorReader(path)
    for key, f in sorted(read.files.items(), key=lambda kv: kv[1]):  # file by file
        if key.endswith(_IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue
        try:
            name = adapter.from_hf(key)
        except KeyError:
            raise CheckpointError(f"{f.name}: tensor {key} is not part of a Llama model") from None
        t = read(key)
        if tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{f.name}: tensor {key} has shape {tuple(t.shape)}, but config.json implies {tuple(expected[name])}"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{f.name}: tensor {key} holds NaN or Inf values")
        loaded.add(name)
        yield name, t
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {[adapter.to_hf(m) for m in missing][:8]}")


def load_hf_tensors(model: Transformer, path: Path, dtype: torch.dtype | None) -> None:
    """Stream every tensor of the HF checkpoint at ``path`` into ``model`` (meta or real)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, t in iter_hf_tensors(path, model.args, expected):
        _assign(model, name, t if dtype is None else t.to(dtype))
    model.tie_weights()


def from_hf(path: str | Path, dtype: torch.dtype | None = torch.float32) -> Transformer:
    """A ``Transformer`` with the weights of the local HF Llama directory ``path`` (on CPU).

    ``dtype=None`` keeps the stored dtype.
    """
    path = Path(path)
    args = args_from_hf_config(read_config(path), str(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(args)
    load_hf_tensors(model, path, dtype)
    return model


class SafetensorsWriter:
    """Streams named tensors into ~``max_shard_bytes`` safetensors shards (one in memory at a
    time); ``close`` names them ``model-0000i-of-0000n`` and writes the index (or a single
    ``model.safetensors``)."""

    def __init__(self, out: Path, max_shard_bytes: int = 5 * 2**30) -> None:
        self.out, self.max_bytes = out, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if self.buffer and self.size + n > self.max_bytes:
            self._flush()
        self.buffer[name] = t
        self.size += n
        self.total += n

    def _flush(self) -> None:
        save_file(self.buffer, str(self.out / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (fname, keys) in enumerate(zip(names, self.shards)):
            (self.out / f"shard-{i}.tmp").rename(self.out / fname)
            weight_map.update(dict.fromkeys(keys, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


def copy_tokenizer_files(src: Path | None, out: Path) -> list[str]:
    """Copy the tokenizer files (``TOKENIZER_FILES``, by name only) that folder ``src`` holds into
    ``out``; their names. None or a folder without them copies nothing."""
    if src is None:
        return []
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in copied:
        shutil.copy2(src / n, out / n)
    return copied


def to_hf(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``model`` as an HF Llama directory at ``path`` (must be absent or empty).

    ``dtype=None`` keeps the parameters' dtype. Tokenizer files are copied from
    ``tokenizer_dir`` when it has them.
    """
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if model.args.tie_word_embeddings:
        sd.pop("output.weight")
    out_dtype = dtype or model.tok_embeddings.weight.dtype
    (out / "config.json").write_text(json.dumps(hf_config_from_args(model.args, out_dtype), indent=2))
    writer = SafetensorsWriter(out, max_shard_bytes)
    for k, v in sd.items():
        writer.add(adapter.to_hf(k), _cast(v, dtype))
    writer.close()
    copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir else None, out)
