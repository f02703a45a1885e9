"""The training run: recipe -> data -> model (meta) -> QAT prepare -> TP/FSDP -> init or
load -> loop with metrics, validation and DCP checkpoints."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import nvfp4
from nvfp4.export import export_problems
from nvfp4.fsdp import precompute_weight_scales
from nvfp4.sharded import local
from nvfp4_titan.data.dataset import DataError
from nvfp4_titan.data.loader import GlobalBatchLoader
from nvfp4_titan.data.packing import IGNORE, ExampleWindows
from nvfp4_titan.data.tokenizer import load_tokenizer
from nvfp4_titan.data.tokens import TokenFile, dataset_tokens, windows_from_tokens
from nvfp4_titan.models.llama3 import ModelArgs, Transformer, flavor
from nvfp4_titan.models.llama3.args import model_args_from_json, model_args_json
from nvfp4_titan.models.llama3.hf import (
    CheckpointError,
    args_from_hf_config,
    iter_hf_tensors,
    read_config,
    weight_files,
)
from nvfp4_titan.parallel import build_mesh, dp_rank, parallelize_llama, resolve_dims
from nvfp4_titan.training import checkpoint as ckpt
from nvfp4_titan.training.config import QAT, Config, ConfigError, load_config, to_toml, toml_value
from nvfp4_titan.training.distill import distillation_loss, teacher_fingerprint
from nvfp4_titan.training.loss import cross_entropy
from nvfp4_titan.training.metrics import MetricsLogger, flops_per_token, peak_flops, qat_health
from nvfp4_titan.training.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from nvfp4_titan.training.runtime import ScheduledGC, init_distributed, pick_device, setup_logging

log = logging.getLogger("nvfp4_titan")
TOKENIZE_TIMEOUT = datetime.timedelta(hours=24)  # how long the other ranks wait for the token cache's build
_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_dim", "tie_word_embeddings")


def _shape_diff(a: ModelArgs, b: ModelArgs) -> str:
    """The shape fields in which ``a`` and ``b`` differ ("field: a vs b; ..."), or ""."""
    return "; ".join(
        f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in _SHAPE_FIELDS if getattr(a, f) != getattr(b, f)
    )


def _check_dcp_source(path: Path, key: str, shapes: dict[str, torch.Size]) -> None:
    """A DCP step to load weights from: whole (every file its .metadata names) and of these shapes."""
    if (path / ".metadata").exists() and (why := ckpt.damage(path, run_step=False)) is not None:
        raise CheckpointError(f"{key}={path} is damaged: {why}")
    ckpt.check_model_shapes(path, shapes)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where it stopped."""


def model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    """The model's hyper-parameters: the flavor's, or with flavor "hf" the HF initial checkpoint's
    config.json; a named flavor is checked against an HF initial checkpoint; both against the
    tokenizer."""
    hf = None
    if cfg.checkpoint.initial_load_in_hf:
        path = Path(cfg.checkpoint.initial_load_path)
        try:
            hf = args_from_hf_config(read_config(path), str(path / "config.json"))
            weight_files(path)  # the weights are there: checked before the run folder is written
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.initial_load_path: {e}") from None
    if cfg.model.flavor == "hf":
        args = hf
    else:
        args = flavor(cfg.model.flavor)
        if hf is not None:
            if diff := _shape_diff(hf, args):
                raise ConfigError(
                    f"{path} is a checkpoint of another model shape than flavor {cfg.model.flavor!r} "
                    f'({diff}); set model.flavor to match it, or model.flavor = "hf" to '
                    "take the shape from its config.json"
                )
            args = args.with_(rope_theta=hf.rope_theta, rope_scaling=hf.rope_scaling, norm_eps=hf.norm_eps)
    args = args.with_(activation_checkpoint=cfg.training.activation_checkpoint)
    if vocab_size > args.vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.model.tokenizer_path} has {vocab_size} tokens, more than the model's "
            f"vocab_size {args.vocab_size}; use the flavor's tokenizer"
        )
    if cfg.training.seq_len > args.max_seq_len:
        raise ConfigError(f"training.seq_len={cfg.training.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    return args


def _check_folder_path(path: Path, key: str) -> None:
    """Refuse a folder path that is, or lies under, an existing file (mkdir would fail later)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under the file {p}"
                raise ConfigError(f"{key}={path} {where}: name a folder (created if missing)")
            return


class Trainer:
    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.step = 0
        self.stop_requested = False
        self.nonfinite_in_a_row = 0  # steps skipped for a non-finite loss or gradient, in a row
        self.skipped_steps = 0

    # ---- setup: everything that can fail on bad input happens before any file is written
    def setup(self) -> None:
        cfg = self.cfg
        _check_folder_path(Path(cfg.job.dump_folder), "job.dump_folder")
        _check_folder_path(Path(cfg.job.dump_folder) / cfg.checkpoint.folder, "checkpoint.folder")
        self.device = pick_device(cfg.training.device)
        self.rank, self.world = init_distributed(self.device)
        setup_logging(self.rank)
        p = cfg.parallelism
        dims = resolve_dims(
            self.world, p.data_parallel_shard_degree, p.tensor_parallel_degree, p.data_parallel_replicate_degree
        )
        self.mesh = build_mesh(dims, self.device.type)
        tokenizer = load_tokenizer(cfg.model.tokenizer_path)
        self.args = model_args(cfg, tokenizer.vocab_size)
        rank_in_dp, self.dp = dp_rank(self.mesh)  # over replicate x shard: each replica's shards see other data
        self._build_data(tokenizer, self.dp, rank_in_dp)
        self._build_model()
        self._build_teacher()
        self.folder = Path(cfg.job.dump_folder)
        self.ckpt_folder = self.folder / cfg.checkpoint.folder
        self.resume_from = ckpt.latest(self.ckpt_folder) if cfg.checkpoint.enable else None
        if self.resume_from is not None:
            ckpt.check_model_shapes(self.resume_from, self._param_shapes())
        elif cfg.checkpoint.initial_load_path and not cfg.checkpoint.initial_load_in_hf:
            _check_dcp_source(
                Path(cfg.checkpoint.initial_load_path), "checkpoint.initial_load_path", self._param_shapes()
            )
        self._with_readable_resume(self._check_resume)
        fresh = not self.folder.exists() or not any(self.folder.iterdir())
        self._make_run_folder()
        log.info(self._data_ready)  # now that every rank has its log file
        try:
            self._materialize()
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
            self._load_initial_state()
            self._load_teacher()
        except BaseException:  # e.g. weights holding NaN, found while loading them
            if fresh:
                self._remove_run_folder()
            raise

    def _with_readable_resume(self, load: Callable[[], Any]) -> Any:
        """``load()``, and when the checkpoint it resumes from proves unreadable (its files whole,
        their bytes changed) or holds another step than its name says, again from the newest whole
        step before it, named in a warning; the damaged step is set aside as ``step-N.damaged``
        (out of the way of resume and ``keep_latest_k``, never deleted)."""
        while True:
            try:
                return load()
            except ckpt.DamagedCheckpointError as e:
                if self.resume_from is None or e.path != self.resume_from:
                    raise
                previous = ckpt.previous_complete(e.path)
                if previous is None:
                    raise CheckpointError(
                        f"{e}; no older whole checkpoint in {e.path.parent}: restore it, move it away to start "
                        "over, or use another job.dump_folder"
                    ) from None
                aside = ckpt.set_aside(e.path).name if self.rank == 0 else "set aside"
                dist.barrier()
                log.warning(f"checkpoint {e.path} cannot be loaded: {e.reason}; using {previous.name} ({aside})")
                self.resume_from = previous
                self._check_resume()

    def _remove_run_folder(self) -> None:
        """Undo ``_make_run_folder`` for a run that failed before its first step: a bad initial
        load leaves no folder that looks like a run (rank 0 removes it; the ranks' open log files
        go with it)."""
        self.metrics.close()
        for h in logging.getLogger("nvfp4_titan").handlers:
            if isinstance(h, logging.FileHandler):
                h.close()
        if self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _build_data(self, tokenizer, dp: int, dp_rank: int) -> None:
        start = time.perf_counter()
        t, d = self.cfg.training, self.cfg.dataset
        tokens = self._tokens(tokenizer)
        m = tokens.manifest  # what the run trains on, recorded in every checkpoint (data.json)
        self.corpus = {
            "path": d.path,
            "n_docs": m["n_docs"],
            "n_tokens": m["n_tokens"],
            "tokens_sha256": m["sha256"]["tokens.bin"],
        }
        windows = windows_from_tokens(
            tokens, t.seq_len, d.validation_fraction, t.seed, tokenizer.vocab_size, d.train_on_prompt, d.long_examples
        )
        self._data_ready = ""
        if isinstance(windows.train, ExampleWindows):
            w, v = windows.train, windows.validation
            self._data_ready = (
                f"{d.format} examples packed into windows of {t.seq_len + 1} tokens: {w.n_examples} in {len(w)} "
                f"training windows ({w.fill():.1%} filled), {v.n_examples} in {len(v)} held out; longer than a "
                f"window (dataset.long_examples = {d.long_examples}): {w.dropped + v.dropped} dropped, "
                f"{w.truncated + v.truncated} truncated; "
            )
        global_batch = t.global_batch_size if t.global_batch_size != -1 else t.local_batch_size * dp
        try:
            self.loader = GlobalBatchLoader(windows.train, global_batch, t.local_batch_size, dp_rank, dp, t.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.global_batch = global_batch
        if t.epochs:
            t.steps = math.ceil(t.epochs * len(windows.train) / global_batch)
            self._data_ready += f"{t.epochs} epoch(s) of {len(windows.train)} windows: training.steps = {t.steps}; "
            self.cfg.check_steps()
        self.val_loader = None
        if self.cfg.validation.freq and len(windows.validation) < t.local_batch_size * dp:
            log.warning(
                f"validation is off: the held-out split has {len(windows.validation)} windows of "
                f"{t.seq_len + 1} tokens, fewer than one batch ({t.local_batch_size} x {dp} ranks); raise "
                "dataset.validation_fraction, or set validation.freq = 0 to silence this"
            )
        elif self.cfg.validation.freq:
            self.val_loader = GlobalBatchLoader(
                windows.validation, t.local_batch_size * dp, t.local_batch_size, dp_rank, dp, shuffle=False
            )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        self._data_ready += (
            f"data ready in {time.perf_counter() - start:.2f} s, peak RSS of this process {peak:.2f} GiB"
        )

    def _tokens(self, tokenizer) -> TokenFile:
        """The corpus's token file: the first rank of each node tokenizes it into the cache when
        needed (node-local or shared caches alike), every rank maps it."""
        d = self.cfg.dataset
        error, tokens = None, None
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            try:
                tokens = dataset_tokens(d.path, d.text_field, tokenizer, d)
            except DataError as e:  # every rank stops with the builder's message
                error = str(e)
        errors: list[str | None] = [None] * self.world
        # the build may outlast the default group's timeout (10 min under NCCL, 30 under gloo): the
        # other ranks wait for it on a gloo group of its own with a day's timeout
        wait = dist.new_group(backend="gloo", timeout=TOKENIZE_TIMEOUT) if self.world > 1 else None
        dist.all_gather_object(errors, error, group=wait)
        if wait is not None:
            dist.destroy_process_group(wait)
        if first := next((e for e in errors if e is not None), None):
            raise DataError(first)
        if tokens is None:  # the other ranks map what the builder made
            tokens = dataset_tokens(d.path, d.text_field, tokenizer, d, build=False)
        return tokens

    # Keys a resumed run must share with its checkpoint: they fix which windows the data order
    # draws and what the model computes; the data-parallel degree may change.
    _RESUME_KEYS = (
        "training.seq_len",
        "training.mixed_precision_param",
        "dataset.path",
        "dataset.format",
        "dataset.chat_template",
        "dataset.train_on_prompt",
        "dataset.long_examples",
        "dataset.text_field",
        "dataset.validation_fraction",
        "qat.enable",
        "qat.activation_scale",
        "qat.tensor_scale",
        "qat.share_fused_amax",
        "qat.block_scale_rule",
        "qat.start_step",
        "qat.loss",
        "qat.kl_weight",
        "qat.temperature",
    )

    def _check_resume(self) -> None:
        """Refuse, before any write, to continue a checkpoint with another seed, global batch,
        sequence length or QAT setting: one message naming each key and the flag that restores it."""
        t = self.cfg.training
        path = self._full_load_path()
        if path is None:
            return
        extra = ckpt.load_extra(path, self._extra_state())
        saved, stored_step = extra["dataloader"], int(extra["train_state"]["step"])
        if self.resume_from is not None and stored_step != ckpt.step_number(path):
            raise ckpt.DamagedCheckpointError(
                path, f"it holds step {stored_step} (renamed, or its files copied from another step)"
            )
        changed = {}  # key: (saved value, this run's value as said)
        if saved["seed"] != t.seed:
            changed["training.seed"] = (saved["seed"], t.seed)
        if saved["global_batch"] != self.global_batch:
            now = f"{self.global_batch}" + (
                f" = local_batch_size {t.local_batch_size} x data-parallel degree {self.dp}"
                if t.global_batch_size == -1
                else ""
            )
            changed["training.global_batch_size"] = (saved["global_batch"], now)
        if self.resume_from is not None and (path / "config.toml").is_file():
            before = load_config(path / "config.toml")
            for key in self._RESUME_KEYS:
                section, name = key.split(".")
                old, new = getattr(getattr(before, section), name), getattr(getattr(self.cfg, section), name)
                if old != new:
                    changed[key] = (old, new)
            # include/exclude by the linears they select: other patterns that select the same
            # linears (e.g. the default exclude, once ["output"]) change nothing
            q_old, q_new = (self._quantized(c.qat) for c in (before, self.cfg))
            if q_old != q_new:
                for key in ("qat.include", "qat.exclude"):
                    old, new = getattr(before.qat, key[4:]), getattr(self.cfg.qat, key[4:])
                    if old != new:
                        changed[key] = (old, new)
        if self.resume_from is not None and (path / "data.json").is_file():
            self._check_corpus(path, json.loads((path / "data.json").read_text()))
        if self.resume_from is not None and self.teacher is not None and (path / "teacher.json").is_file():
            before = json.loads((path / "teacher.json").read_text())
            if before["sha256"] != self.teacher_sha256:
                raise ConfigError(
                    f"{path} was distilled from the teacher {before['path']} (sha256 {before['sha256'][:12]}...); "
                    f"this run's teacher {self.teacher_path} differs (sha256 {self.teacher_sha256[:12]}...). "
                    "Resume with the same teacher (qat.teacher_path), or start a new run"
                )
        if changed:
            what = "; ".join(f"{k}={v[0]!r} (this run: {v[1]})" for k, v in changed.items())
            fix = " ".join(f"--{k}={toml_value(v[0])}" for k, v in changed.items())
            raise ConfigError(
                f"{path} was trained with {what}: continuing it would change which data the remaining steps "
                f"see or what the model computes. Resume with {fix}, or start a new run (another "
                f"job.dump_folder) with checkpoint.initial_load_path={path}"
            )

    def _check_corpus(self, path: Path, before: dict) -> None:
        """Refuse to continue a run whose corpus changed in place (same dataset.path, other
        tokens): its data order and held-out split would silently change."""
        if before["tokens_sha256"] == self.corpus["tokens_sha256"]:
            return
        now = self.corpus
        raise ConfigError(
            f"{path} was trained on {before['path']} as it was then ({before['n_docs']} documents, "
            f"{before['n_tokens']} tokens, sha256 {before['tokens_sha256'][:12]}...); dataset.path {now['path']} "
            f"now holds other text ({now['n_docs']} documents, {now['n_tokens']} tokens, sha256 "
            f"{now['tokens_sha256'][:12]}...): continuing would change which data the remaining steps see. "
            f"Resume on the corpus it was trained on, or start a new run (another job.dump_folder) with "
            f"checkpoint.initial_load_path={path}"
        )

    def _quantized(self, qat: QAT) -> list[str]:
        """The linears ``qat`` fake-quantizes in this model (none when QAT is off)."""
        if not qat.enable:
            return []
        with torch.device("meta"):
            return nvfp4.selected_linears(Transformer(self.args), qat.nvfp4_config())

    def _full_load_path(self) -> Path | None:
        """Where model, optimizer, data order and step come from: the checkpoint resumed, or an
        initial DCP load that is not weights-only; None for a fresh start or a weights-only load."""
        c = self.cfg.checkpoint
        if self.resume_from is not None:
            return self.resume_from
        if c.initial_load_path and not (c.initial_load_in_hf or c.initial_load_model_only):
            return Path(c.initial_load_path)
        return None

    def _build_model(self) -> None:
        with torch.device("meta"):
            self.model = Transformer(self.args)
        q = self.cfg.qat
        if q.enable and not nvfp4.selected_linears(self.model, q.nvfp4_config()):
            raise ConfigError(
                f"qat.enable = true but qat.include {q.include} and qat.exclude {q.exclude} select "
                "no linear layer (names like layers.0.attention.wq); fix the patterns or set qat.enable = false"
            )
        if q.enable and (bad := nvfp4.unquantizable_linears(self.model, q.nvfp4_config())):
            name, k = next(iter(bad.items()))
            raise ConfigError(
                f"{name} has in_features={k}, not a multiple of 16 (NVFP4 quantizes blocks of 16 along it; "
                f"{len(bad)} such linears): keep them in high precision with "
                f"qat.exclude = {toml_value(list(q.nvfp4_config().excluding(bad)))}"
            )
        if q.enable and not q.allow_unexportable and (problems := export_problems(self.model, q.nvfp4_config())):
            raise ConfigError(
                f"these QAT settings train a model that inference engines cannot run as trained: "
                f"{'; '.join(problems)}. Change them, or set qat.allow_unexportable = true for an "
                f"experiment whose checkpoints will not be exported"
            )
        if q.enable:
            nvfp4.prepare(self.model, q.nvfp4_config())
        t = self.cfg.training
        parallelize_llama(
            self.model,
            self.mesh,
            t.mixed_precision_param,
            t.mixed_precision_reduce,
            t.compile,
            nvfp4_all_gather=self.cfg.qat.fsdp_nvfp4_all_gather,
        )

    def _build_teacher(self) -> None:
        """QAD's teacher (qat.loss kl or mix): this model's shape in float, sharded like the
        student, on the meta device until ``_load_teacher``; its source checked before any write."""
        q, c, t = self.cfg.qat, self.cfg.checkpoint, self.cfg.training
        self.teacher = None
        if q.loss == "ce":
            return
        path = Path(q.teacher_path or c.initial_load_path)
        key = "qat.teacher_path" if q.teacher_path else "checkpoint.initial_load_path (the default teacher)"
        self.teacher_in_hf = (path / "config.json").is_file() if q.teacher_path else c.initial_load_in_hf
        if not (self.teacher_in_hf or (path / ".metadata").is_file()):
            raise ConfigError(
                f"{key}={path}: the teacher must be a Hugging Face folder (config.json) or a DCP "
                "step-N folder (.metadata)"
            )
        # The teacher's own hyper-parameters (rope, norm eps): its config, or its step's model_args.json.
        teacher_args = self.args
        if self.teacher_in_hf:
            try:
                teacher_args = args_from_hf_config(read_config(path), str(path / "config.json"))
                weight_files(path)
            except CheckpointError as e:
                raise ConfigError(f"{key}: the teacher {e}") from None
            if diff := _shape_diff(teacher_args, self.args):
                raise ConfigError(f"{key}={path}: the teacher has another shape than the model ({diff})")
        elif (path / "model_args.json").is_file():
            teacher_args = model_args_from_json((path / "model_args.json").read_text())
        with torch.device("meta"):
            self.teacher = Transformer(teacher_args.with_(activation_checkpoint="none"))
        if not self.teacher_in_hf:
            _check_dcp_source(path, key, {n: p.shape for n, p in self.teacher.named_parameters()})
        parallelize_llama(self.teacher, self.mesh, t.mixed_precision_param, t.mixed_precision_reduce, t.compile)
        self.teacher.requires_grad_(False)
        self.teacher_path = path
        sha = [teacher_fingerprint(path) if self.rank == 0 else None]
        dist.broadcast_object_list(sha, src=0)
        self.teacher_sha256 = sha[0]

    def _load_teacher(self) -> None:
        if self.teacher is None:
            return
        self.teacher.to_empty(device=self.device)
        if self.teacher_in_hf:
            shapes = {n: p.shape for n, p in self.teacher.named_parameters(remove_duplicate=False)}
            try:
                ckpt.load_full_tensors(self.teacher, iter_hf_tensors(self.teacher_path, self.teacher.args, shapes))
            except CheckpointError as e:
                raise CheckpointError(f"the teacher (qat.teacher_path or the initial weights): {e}") from None
        else:
            ckpt.load_model(self.teacher_path, self.teacher)
        self.teacher.eval()
        log.info(
            f"teacher of {self.cfg.qat.loss} distillation: {self.teacher_path} (sha256 {self.teacher_sha256[:12]}...)"
        )

    def _param_shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.model.named_parameters(remove_duplicate=False)}

    def _make_run_folder(self) -> None:
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "config.toml").write_text(to_toml(self.cfg))
        setup_logging(self.rank, self.folder / "logs")
        self.metrics = MetricsLogger(self.folder, self.cfg.metrics, self.rank, asdict(self.cfg))

    def _materialize(self) -> None:
        torch.manual_seed(self.cfg.training.seed)
        self.model.to_empty(device=self.device)
        self.model.init_weights(self.cfg.training.seed)
        for m in nvfp4.qat_linears(self.model):
            m.reset_calibration()

    def _extra_state(self) -> dict[str, Any]:
        return {
            "dataloader": self.loader.state_dict(),
            "train_state": {"step": self.step, "rng": torch.get_rng_state()},
        }

    def _load_initial_state(self) -> None:
        c = self.cfg.checkpoint
        if self._full_load_path() is not None:
            extra = self._with_readable_resume(
                lambda: ckpt.load(self._full_load_path(), self.model, self.optimizer, self._extra_state())
            )
            path = self._full_load_path()
            self.loader.load_state_dict(extra["dataloader"])
            self.step = int(extra["train_state"]["step"])
            if path == self.resume_from:  # an initial load starts its own random stream
                torch.set_rng_state(extra["train_state"]["rng"])
                log.info(f"resumed from {path} at step {self.step}")
            else:
                log.info(f"loaded initial weights from {path}")
        elif c.initial_load_path and c.initial_load_in_hf:
            ckpt.load_full_tensors(
                self.model, iter_hf_tensors(Path(c.initial_load_path), self.args, self._param_shapes())
            )
            log.info(f"loaded Hugging Face weights from {c.initial_load_path}")
        elif c.initial_load_path:
            ckpt.load_model(Path(c.initial_load_path), self.model)
            log.info(f"loaded initial weights from {c.initial_load_path}")

    # ---- the loop
    def run(self) -> int:
        self.setup()
        cfg, t = self.cfg, self.cfg.training
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        n_params = sum(p.numel() for p in self.model.parameters())
        fpt = flops_per_token(self.args, n_params, t.seq_len)
        peak = peak_flops(self.device)
        if self.step >= t.steps:
            log.info(
                f"nothing to train: the checkpoint is at step {self.step} and training.steps = {t.steps}; "
                "raise training.steps to train further"
            )
        log.info(
            f"{cfg.job.description or 'run'}: {self.args} | {n_params / 1e6:.1f}M parameters, world {self.world}, "
            f"QAT {'on' if cfg.qat.enable else 'off'}, {t.steps} steps of {self.global_batch} x {t.seq_len} tokens"
        )
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with ScheduledGC(t.gc_freq) as collector:
                while self.step < t.steps:
                    self.step += 1
                    self._prepare_qat()
                    loss, grad_norm, lr = self._train_step()
                    collector.tick()
                    window_tokens += self.global_batch * t.seq_len
                    if self.step % cfg.metrics.log_freq == 0 or self.step == t.steps:
                        dt = time.perf_counter() - window_start
                        values = self._metrics(loss, grad_norm, lr, window_tokens / dt, fpt, peak)
                        self.metrics.log(self.step, values)
                        window_tokens, window_start = 0, time.perf_counter()
                    if self.val_loader is not None and (self.step % cfg.validation.freq == 0 or self.step == t.steps):
                        if (val := self._validate()) is not None:
                            self.metrics.log(self.step, {"validation/loss": val})
                    if self._should_stop():
                        self._save()
                        log.info(f"stopped by signal after step {self.step}; resume by running the same command")
                        return 0
                    if cfg.checkpoint.enable and (self.step % cfg.checkpoint.interval == 0 or self.step == t.steps):
                        self._save()
        finally:
            self.metrics.close()
        return 0

    def _prepare_qat(self) -> None:
        if not self.cfg.qat.enable:
            return
        on = self.step > self.cfg.qat.start_step
        nvfp4.set_enabled(self.model, on)
        self._refresh_weight_scales()
        if on and nvfp4.needs_calibration(self.model):
            n = self.cfg.qat.calibration_batches
            c = self.loader.consumed
            batches = [(mb.inputs, mb.segments) for b in range(c, c + n) for mb in self.loader.batch(b)]
            batches = [tuple(t.to(self.device) if t is not None else None for t in mb) for mb in batches]
            try:
                nvfp4.calibrate(self.model, batches)
            except ValueError as e:  # a non-finite input amax: the run cannot go on
                raise TrainingError(
                    f"calibrating static activation scales at step {self.step}: {e}; nothing was saved. Check the "
                    "initial weights and the data"
                ) from None
            log.info(f"calibrated static activation scales on {n} batches")

    def _refresh_weight_scales(self) -> None:
        """NVFP4 all-gather: the weights' tensor scales, after each optimizer step (one all-reduce)."""
        if self.cfg.qat.fsdp_nvfp4_all_gather:
            precompute_weight_scales(self.model)

    def _train_step(self) -> tuple[float | None, float | None, float]:
        """One optimizer step: (loss, grad norm, lr); loss and grad norm are None for a global batch
        in which no label counts (every one a prompt, padding or an example's first token): that
        step is skipped and counted."""
        counted = self.loader.counted(self.loader.consumed)  # the whole global batch's: the token mean
        micro = self.loader.next()
        self._parts = {}
        if counted == 0:
            self.skipped_steps += 1
            log.warning(
                f"step {self.step}: no label of the global batch counts in the loss (only prompts or padding: "
                "dataset.long_examples = truncate can cut answers off); skipped, no optimizer step"
            )
            return None, None, lr_at(self.step, self.cfg.optimizer.lr, self.cfg.training.steps, self.cfg.lr_scheduler)
        tokens = counted / self.dp  # each data-parallel rank's share: FSDP averages the gradients
        loss_sum = torch.zeros((), device=self.device)
        q = self.cfg.qat
        for mb in micro:
            mb = mb.to(self.device)
            logits = self.model(mb.inputs, mb.segments)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(mb.inputs, mb.segments)
            loss_total, parts = distillation_loss(logits, teacher_logits, mb.labels, q.loss, q.kl_weight, q.temperature)
            loss = loss_total / tokens
            loss.backward()
            loss_sum += loss.detach()
            for k, v in parts.items():
                self._parts[k] = self._parts.get(k, 0) + v / tokens
        max_norm = self.cfg.training.max_norm or math.inf
        grad_norm = float(clip_grad_norm_(self.model.parameters(), max_norm))  # global: every rank decides alike
        lr = lr_at(self.step, self.cfg.optimizer.lr, self.cfg.training.steps, self.cfg.lr_scheduler)
        set_lr(self.optimizer, lr)
        dist.all_reduce(loss_sum)  # every rank of a TP group holds the same loss: mean over all
        loss_value = loss_sum.item() / self.world
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        else:
            self._skip_or_stop(loss_value, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, lr

    def _skip_or_stop(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is NaN or Inf never reaches the optimizer: skipped
        while ``training.skip_nonfinite_steps`` allows (Megatron's skipped iterations), else the run
        stops naming the step, the first parameter with a non-finite gradient and the last good
        checkpoint."""
        what = f"non-finite loss ({loss})" if not math.isfinite(loss) else f"non-finite gradient (norm {grad_norm})"
        first = self._first_nonfinite((n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None)
        where = f" (first non-finite gradient: {first})" if first else ""
        limit = self.cfg.training.skip_nonfinite_steps
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row > limit:
            self.optimizer.zero_grad(set_to_none=True)
            before = f"after {limit} skipped in a row (training.skip_nonfinite_steps), " if limit else ""
            raise TrainingError(
                f"{what} at step {self.step}{where}, {before}stopping; nothing of it was applied or saved. Last good "
                f"checkpoint: {self._last_checkpoint()}. Lower optimizer.lr or check the data and initial weights; "
                "training.skip_nonfinite_steps = N skips up to N such steps in a row"
            )
        self.skipped_steps += 1
        log.warning(
            f"{what} at step {self.step}{where}: skipped, no optimizer step ({self.nonfinite_in_a_row} in a row of at "
            f"most {limit}, training.skip_nonfinite_steps)"
        )

    def _first_nonfinite(self, named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
        """The name of the first tensor holding NaN or Inf, over every rank's shard (the same
        answer on every rank: one all-reduce), or None."""
        named = list(named)
        finite = torch.stack([torch.isfinite(local(t)).all() for _, t in named]) if named else torch.ones(0)
        bad = (~finite).nonzero()
        first = torch.tensor([int(bad[0]) if len(bad) else len(named)], device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        return named[int(first)][0] if int(first) < len(named) else None

    def _last_checkpoint(self) -> str:
        return str(ckpt.latest(self.ckpt_folder) or "none")

    def _metrics(
        self, loss: float | None, grad_norm: float | None, lr: float, tps: float, fpt: float, peak: float | None
    ) -> dict[str, float]:
        values = {
            **({"loss": loss, "grad_norm": grad_norm} if loss is not None else {}),  # None: a skipped empty batch
            "lr": lr,
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / self.world,
            "epoch": self.loader.epoch,
        }
        if peak is not None:
            values["mfu"] = fpt * tps / self.world / peak
            # Peak of this logging window, as TorchTitan reports it: since the start, the first
            # window's compilation and Triton autotuning would hide what training itself needs.
            values["mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.cfg.training.skip_nonfinite_steps or self.skipped_steps:
            values["skipped_steps"] = self.skipped_steps
        if self.cfg.qat.enable and self.step > self.cfg.qat.start_step:
            values.update(qat_health(self.model))
        if self._parts:  # QAD: this step's distillation terms, token means over the global batch
            names = sorted(self._parts)
            parts = torch.stack([self._parts[k] for k in names])
            dist.all_reduce(parts)
            for k, v in zip(names, (parts / self.world).tolist()):
                values[f"distill/{k}"] = v
        return values

    @torch.no_grad()
    def _validate(self) -> float | None:
        """The held-out loss, a token mean over the counted labels of every rank's batches; None
        when no label counts."""
        self._refresh_weight_scales()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss, counted labels
        for b in range(self.cfg.validation.steps):
            for mb in self.val_loader.batch(b % self.val_loader.batches_per_epoch):
                mb = mb.to(self.device)
                sums[0] += cross_entropy(self.model(mb.inputs, mb.segments), mb.labels)
                sums[1] += (mb.labels != IGNORE).sum()
        dist.all_reduce(sums)  # TP ranks add the same batch to both sums alike
        return sums[0].item() / sums[1].item() if sums[1].item() else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def _save(self) -> None:
        if not self.cfg.checkpoint.enable:
            return
        state = [(n, p) for n, p in self.model.named_parameters()]
        state += [
            (f"the optimizer's {k} of {n}", v)
            for n, p in self.model.named_parameters()
            for k, v in self.optimizer.state.get(p, {}).items()
            if torch.is_tensor(v)
        ]
        if (bad := self._first_nonfinite(state)) is not None:  # one isfinite pass, one all-reduce
            raise TrainingError(
                f"after step {self.step}, {bad} holds NaN or Inf: the checkpoint was not written. Last good "
                f"checkpoint: {self._last_checkpoint()}. Lower optimizer.lr or check the data and initial weights"
            )
        files = {
            "config.toml": to_toml(self.cfg),
            "model_args.json": model_args_json(self.args),
            "data.json": json.dumps(self.corpus),
        }
        if self.teacher is not None:
            files["teacher.json"] = json.dumps({"path": str(self.teacher_path), "sha256": self.teacher_sha256})
        path = ckpt.save(
            self.ckpt_folder,
            self.step,
            self.model,
            self.optimizer,
            self._extra_state(),
            self.cfg.checkpoint.keep_latest_k,
            files,
            self.rank,
        )
        log.info(f"saved checkpoint {path}")
