"""Recipe schema: one dataclass per TOML section, every key typed, defaulted and documented.

Defaults, then the recipe TOML, then ``--section.key=value`` overrides. Unknown keys,
wrong types and impossible values fail before any work, naming the key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import nvfp4
from nvfp4.format import BlockScaleRule, TensorScaleMode
from nvfp4.qat.config import ActivationScale
from nvfp4_titan.models.llama3.args import FLAVORS
from nvfp4_titan.training.distill import DistillLoss


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


@dataclass
class Job:
    dump_folder: str = "outputs/debug_cpu"
    """Run folder: resolved config, metrics.jsonl, TensorBoard logs, checkpoints."""
    description: str = ""
    """Free text describing the run; printed at start."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family. Only llama3 exists."""
    flavor: str = "debug"
    """debug | 80M | 1B | 3B | 8B | 70B (nvfp4_titan/models/llama3/args.py), or hf: the shape of the
    Hugging Face checkpoint at checkpoint.initial_load_path (any Llama-architecture config.json)."""
    tokenizer_path: str = "data/assets/tokenizer.json"
    """A tokenizer.json, a Llama 3 tiktoken tokenizer.model, or a folder holding one."""


@dataclass
class Training:
    local_batch_size: int = 8
    """Sequences per micro-batch on each rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1: local_batch_size x data-parallel
    degree. A multiple of that product: the rest is gradient accumulation."""
    seq_len: int = 128
    """Tokens per sequence."""
    steps: int = 60
    """Optimizer steps to train (see epochs)."""
    epochs: float = 0
    """> 0: train this many passes over the training windows instead, training.steps being set
    to epochs x windows / global batch, rounded up, once the data is read (the log says it)."""
    max_norm: float = 1.0
    """Gradient clipping by global L2 norm; 0 disables it."""
    skip_nonfinite_steps: int = 0
    """Steps in a row whose loss or gradient norm is NaN or Inf that are skipped (no optimizer
    step; each logged with the first parameter whose gradient is non-finite and counted in the
    metric skipped_steps), as Megatron skips them; one more stops the run, naming the step, that
    parameter and the last good checkpoint. 0: stop at the first. The count restarts at a resume."""
    seed: int = 0
    """Seed for initialization and data order (the global batches depend on it alone)."""
    mixed_precision_param: Literal["float32", "bfloat16"] = "float32"
    """dtype that parameters are cast to for forward/backward (FSDP2 MixedPrecisionPolicy)."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """dtype of gradient reduction."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    """none | selective (recompute MLPs) | full (recompute blocks)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    gc_freq: int = 50
    """Python's cyclic garbage collection every gc_freq steps (generation 1) instead of at
    random allocations, as TorchTitan's training.gc_freq (a collection pauses the host, long
    after torch.compile); 0: automatic."""


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Only AdamW."""
    lr: float = 1e-3
    """Peak learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms or biases)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 5
    """Linear warmup from lr/(warmup_steps+1) to lr."""
    decay_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to lr x min_lr_factor over the steps after warmup."""
    min_lr_factor: float = 0.1
    """Final learning rate as a fraction of lr."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """HSDP: replicas of the FSDP-sharded model (typically one per node: FSDP's all-gathers stay
    inside a replica, only the gradient all-reduce crosses replicas). 1: plain FSDP."""
    data_parallel_shard_degree: int = -1
    """FSDP2 degree (within a replica); -1: the world size divided by the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor-parallel degree (Megatron-style colwise/rowwise linears)."""


@dataclass
class QAT:
    enable: bool = True
    """Fake-quantize the selected linears' weights and inputs to NVFP4."""
    include: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns of linear names to quantize (layers.0.attention.wq)."""
    exclude: list[str] = field(default_factory=lambda: list(nvfp4.QATConfig.exclude))
    """Patterns kept in high precision even if included: by default the output head (named
    output here, lm_head in Hugging Face models); nvfp4.QATConfig's default."""
    activation_scale: ActivationScale = "dynamic"
    """dynamic: each input's own amax; static: calibrated over calibration_batches, frozen;
    none: weight-only QAT (W4A16), inputs stay in high precision."""
    tensor_scale: TensorScaleMode = "pow2"
    """pow2: per-tensor scale rounded up to 2**k (every engine decodes the same bits); amax: amax/2688
    (torchao, ModelOpt PTQ), which no engine decodes as trained: needs allow_unexportable."""
    share_fused_amax: bool = True
    """One weight amax for q/k/v and for gate/up, as inference engines fuse them."""
    block_scale_rule: BlockScaleRule = "amax"
    """How each weight block's e4m3 scale is chosen: amax (block amax mapped to 6, engines' rule) or
    four_over_six (per block the scale mapping it to 4 where that has the smaller squared error;
    nvfp4.QATConfig.block_scale_rule). Weights only; exported as trained; a resume keeps it."""
    calibration_batches: int = 4
    """Training batches that calibrate static activation scales at start_step."""
    start_step: int = 0
    """Train in float before this step, with QAT from it on (0: from the start)."""
    fsdp_nvfp4_all_gather: bool = False
    """FSDP2 all-gathers QAT weights as NVFP4 (4.5 bits/element instead of 16), quantized
    before the gather with one batched amax all-reduce per step; same numerics. Eager only.
    Off by default: within a node and under HSDP it is slower (measured 0.75x over NVLink); it is
    predicted to pay only for FSDP across nodes on a network below ~20 GB/s per rank
    (docs/distributed.md, "When FP4 on the wire pays")."""
    allow_unexportable: bool = False
    """Accept settings whose checkpoints engines cannot decode as trained (share_fused_amax =
    false, part of a fused q/k/v or gate/up group excluded, a quantized output head, tied or not,
    tensor_scale = amax): for experiments only; the converter refuses to export such checkpoints
    as NVFP4."""
    loss: DistillLoss = "ce"
    """ce: cross-entropy on the labels (QAT); kl: quantization-aware distillation (QAD), the KL
    divergence from the frozen float teacher's output distribution; mix: (1 - kl_weight) ce +
    kl_weight kl (nvfp4_titan/training/distill.py)."""
    kl_weight: float = 0.5
    """Weight of the KL term with loss = "mix", in [0, 1]."""
    temperature: float = 1.0
    """Softmax temperature of teacher and student in the KL term (scaled by its square)."""
    teacher_path: str = ""
    """The teacher of kl/mix: a Hugging Face folder or a DCP step-N folder of this model's shape;
    empty: checkpoint.initial_load_path (the run's initial weights). Loaded once, frozen, never
    quantized, sharded like the student; not saved in checkpoints (a resume checks its sha256)."""

    def nvfp4_config(self) -> nvfp4.QATConfig:
        """The ``nvfp4.QATConfig`` these keys describe (training, conversion, evaluation)."""
        return nvfp4.QATConfig(
            include=tuple(self.include),
            exclude=tuple(self.exclude),
            activation_scale=self.activation_scale,
            tensor_scale=self.tensor_scale,
            share_fused_amax=self.share_fused_amax,
            block_scale_rule=self.block_scale_rule,
        )


@dataclass
class Dataset:
    path: str = "data/assets/shakespeare.jsonl"
    """Local corpus: a jsonl/json/parquet/txt file or a folder of them (never downloaded)."""
    format: Literal["text", "chat", "sharegpt", "alpaca"] = "text"
    """text: documents (text_field) tokenized, EOS after each, packed back to back into windows
    (pretraining). chat ({"messages": [{"role", "content"}]}), sharegpt ({"conversations":
    [{"from", "value"}]}) or alpaca ({"instruction", "input", "output"}) rows: one example each,
    rendered with the chat template, packed whole into windows where positions restart and
    attention never crosses an example; the loss counts the assistant turns (train_on_prompt)."""
    chat_template: str = ""
    """Chat formats: "" renders with the tokenizer folder's own template (chat_template.jinja or
    tokenizer_config.json, as transformers); "plain" (base models): the turns' text as it is, BOS
    first and EOS after each answer; or the path of a jinja2 template file."""
    train_on_prompt: bool = False
    """Chat formats: count system and user tokens in the loss too (axolotl's train_on_inputs)."""
    long_examples: Literal["drop", "truncate"] = "drop"
    """Chat formats: an example longer than training.seq_len + 1 tokens is dropped (a cut
    conversation may lose its whole answer) or truncated to that length; the log counts both."""
    text_field: str = "text"
    """Field holding the document text (format text; jsonl/json/parquet)."""
    validation_fraction: float = 0.05
    """Share of documents (chat formats: examples) held out for validation (split whole, seeded)."""
    cache_dir: str = ""
    """Where the corpus is tokenized once and memory-mapped by every rank and later run (keyed by
    corpus files and tokenizer); empty: $XDG_CACHE_HOME/nvfp4-titan or ~/.cache/nvfp4-titan."""
    num_proc: int = 0
    """Processes that tokenize the corpus into the cache (parts of 16 MiB of text each; a killed
    build resumes from its finished parts); 0: every core this process may use (CPU affinity)."""


@dataclass
class Validation:
    freq: int = 20
    """Validate every freq steps and at the end; 0 disables it."""
    steps: int = 2
    """Global batches of held-out data per validation."""


@dataclass
class Checkpoint:
    enable: bool = True
    """Save DCP checkpoints and resume from the latest one in the run folder."""
    folder: str = "checkpoint"
    """Folder of step-N checkpoints, relative to job.dump_folder."""
    interval: int = 20
    """Save every interval steps (and always at the end and on SIGTERM/SIGINT)."""
    keep_latest_k: int = 2
    """Keep this many newest checkpoints; 0 keeps all."""
    initial_load_path: str = ""
    """Weights to start from when the run folder has no checkpoint: a DCP step folder or,
    with initial_load_in_hf, a local Hugging Face directory."""
    initial_load_in_hf: bool = False
    """initial_load_path is a Hugging Face directory (config.json + safetensors)."""
    initial_load_model_only: bool = True
    """From a DCP initial_load_path, load the model only (not optimizer, schedule, data, step)."""


@dataclass
class Metrics:
    log_freq: int = 5
    """Log loss, grad norm, lr, tokens/s, memory and QAT health every log_freq steps."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files under <dump_folder>/tb."""
    enable_wandb: bool = False
    """Log to Weights & Biases (off cleanly when the package is missing)."""
    wandb_project: str = "nvfp4-titan"
    """W&B project name."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline never touches the network; online needs a configured login."""


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    qat: QAT = field(default_factory=QAT)
    dataset: Dataset = field(default_factory=Dataset)
    validation: Validation = field(default_factory=Validation)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)

    def validate(self) -> None:
        """Cross-key rules; each failure names the key and the fix."""
        for section in fields(self):
            for f in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section.name}.{f.name} = {value}: must be a finite number")
        t = self.training
        checks = [
            (t.local_batch_size > 0, "training.local_batch_size must be > 0"),
            (t.global_batch_size == -1 or t.global_batch_size > 0, "training.global_batch_size must be > 0 or -1"),
            (t.seq_len > 0, "training.seq_len must be > 0"),
            (t.steps > 0, "training.steps must be > 0"),
            (t.epochs >= 0, "training.epochs must be >= 0 (0: train training.steps)"),
            (t.max_norm >= 0, "training.max_norm must be >= 0 (0 disables clipping)"),
            (t.skip_nonfinite_steps >= 0, "training.skip_nonfinite_steps must be >= 0 (0: stop at the first)"),
            (t.gc_freq >= 0, "training.gc_freq must be >= 0 (0: automatic garbage collection)"),
            (0 <= t.seed < 2**32, "training.seed must be in [0, 2**32)"),
            (self.job.dump_folder.strip() != "", "job.dump_folder must name a folder (empty: the current directory)"),
            (self.dataset.path.strip() != "", "dataset.path must name a corpus file or folder"),
            # the optimizer's fp32 arithmetic takes lr as a float32 (1e39 stopped AdamW with a traceback)
            (0 < self.optimizer.lr < 3.4e38, "optimizer.lr must be > 0 and below float32's largest value"),
            (self.optimizer.eps > 0, "optimizer.eps must be > 0"),
            (self.optimizer.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
            (0 <= self.optimizer.beta1 < 1 and 0 <= self.optimizer.beta2 < 1, "optimizer betas must be in [0, 1)"),
            (0 <= self.lr_scheduler.min_lr_factor <= 1, "lr_scheduler.min_lr_factor must be in [0, 1]"),
            (self.parallelism.tensor_parallel_degree >= 1, "parallelism.tensor_parallel_degree must be >= 1"),
            (
                self.parallelism.data_parallel_replicate_degree >= 1,
                "parallelism.data_parallel_replicate_degree must be >= 1 (1: no replication)",
            ),
            (
                self.parallelism.data_parallel_shard_degree == -1 or self.parallelism.data_parallel_shard_degree >= 1,
                "parallelism.data_parallel_shard_degree must be >= 1 or -1",
            ),
            (self.qat.calibration_batches > 0, "qat.calibration_batches must be > 0"),
            (
                not self.qat.fsdp_nvfp4_all_gather or (self.qat.enable and self.qat.start_step == 0),
                "qat.fsdp_nvfp4_all_gather needs qat.enable = true and qat.start_step = 0",
            ),
            (
                not (self.qat.fsdp_nvfp4_all_gather and t.compile),
                "qat.fsdp_nvfp4_all_gather works in eager mode only: set training.compile = false",
            ),
            (0 <= self.dataset.validation_fraction < 1, "dataset.validation_fraction must be in [0, 1)"),
            (self.dataset.num_proc >= 0, "dataset.num_proc must be >= 0 (0: every core this process may use)"),
            (
                self.validation.freq >= 0 and self.validation.steps > 0,
                "validation.freq must be >= 0, validation.steps > 0",
            ),
            (self.checkpoint.interval > 0, "checkpoint.interval must be > 0"),
            (self.checkpoint.keep_latest_k >= 0, "checkpoint.keep_latest_k must be >= 0"),
            (
                not self.checkpoint.initial_load_in_hf or self.checkpoint.initial_load_path,
                "checkpoint.initial_load_in_hf needs checkpoint.initial_load_path",
            ),
            (self.metrics.log_freq > 0, "metrics.log_freq must be > 0"),
            (0 <= self.qat.kl_weight <= 1, "qat.kl_weight must be in [0, 1]"),
            (self.qat.temperature > 0, "qat.temperature must be > 0"),
            (
                self.qat.loss == "ce" or self.qat.teacher_path or self.checkpoint.initial_load_path,
                f"qat.loss={self.qat.loss!r} distils from a teacher: set qat.teacher_path, or "
                "checkpoint.initial_load_path (the default teacher: the run's initial weights)",
            ),
            (self.model.name == "llama3", f"model.name={self.model.name!r}: only 'llama3' exists"),
            (
                self.model.flavor in FLAVORS or self.model.flavor == "hf",
                f"model.flavor={self.model.flavor!r}: choose one of {sorted(FLAVORS)}, or 'hf' (the shape of "
                "the Hugging Face checkpoint at checkpoint.initial_load_path)",
            ),
            (
                self.model.flavor != "hf" or self.checkpoint.initial_load_in_hf,
                "model.flavor='hf' takes the model's shape from a Hugging Face checkpoint: set "
                "checkpoint.initial_load_path to its folder and checkpoint.initial_load_in_hf = true",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if not t.epochs:  # else once the data fixes the steps
            self.check_steps()

    def check_steps(self) -> None:
        """The rules that involve training.steps (ConfigError naming the key)."""
        t = self.training
        if not 0 <= self.lr_scheduler.warmup_steps <= t.steps:
            raise ConfigError(f"lr_scheduler.warmup_steps must be in [0, training.steps={t.steps}]")
        if not 0 <= self.qat.start_step < t.steps:
            raise ConfigError(f"qat.start_step must be in [0, training.steps={t.steps})")


# ---- docs, parsing, overrides ------------------------------------------------------


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(options)}"


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = list(typing.get_args(typ))
        if value not in choices:
            hint = _suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}={value!r} is not one of {choices}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str) and (type(value) is not typ):
        raise ConfigError(f"{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(config: Config, data: dict[str, Any], source: str) -> None:
    sections = {f.name: f for f in fields(config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]{_suggest(section, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        obj = getattr(config, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}{_suggest(key, list(hints))}")
            setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """``--section.key=value`` or ``--section.key value`` -> nested dict (TOML value syntax)."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --training.steps=10")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):  # the next option is no value
                raise ConfigError(f"{arg} needs a value: --{name}=VALUE or --{name} VALUE")
            value, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        out.setdefault(section, {})[key] = _parse_value(value)
        i += 1
    return out


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe TOML <- overrides, validated."""
    config = Config()
    if recipe is not None:
        path = Path(recipe)
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder; name a .toml file (e.g. recipes/debug_cpu.toml)")
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))  # BOM: editors add it
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save the recipe as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: malformed TOML: {e}") from None
        _apply(config, data, str(path))
    _apply(config, parse_overrides(overrides or []), "command line")
    config.validate()
    return config


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (reloads to an equal Config)."""
    lines = []
    for section in fields(config):
        lines.append(f"[{section.name}]")
        obj = getattr(config, section.name)
        lines += [f"{f.name} = {toml_value(getattr(obj, f.name))}" for f in fields(obj)]
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """Every recipe key with its type, default and documentation."""
    out = ["Recipe keys (TOML [section] key = value, or --section.key=value):", ""]
    for section in fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        assert is_dataclass(cls)
        docs = field_docs(cls)
        out.append(f"[{section.name}]")
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            out.append(f"  {f.name} = {toml_value(default)}")
            out += [f"      {line}" for line in docs.get(f.name, "").splitlines()]
        out.append("")
    return "\n".join(out)
