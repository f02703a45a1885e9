"""torchtitan trainer configs with this project's NVFP4 QAT (torchtitan 0.3.0 configs are Python
functions returning a ``Trainer.Config``; ``--module nvfp4_titan.torchtitan_qat.configs --config F``
trains function F):

- ``debug``: torchtitan's debug Llama (6 layers, dim 256) at this project's bundled tokenizer's
  vocabulary, on the bundled Shakespeare corpus (``data/assets``), 60 steps; ``debug_static``: the
  same with static activation scales; ``debug_nvfp4_all_gather``: with FSDP2 gathering the QAT
  weights as NVFP4.
- ``llama3_1b_qat``: ``recipes/llama3_1b_qat.toml`` (the Llama 3.2 1B shape from scratch on the
  bundled corpus and tokenizer, FSDP over every GPU, bf16 params, selective AC, compile, lr 3e-4 with
  30 warm-up steps, 300 steps of 4 x 2048 tokens per GPU); ``llama3_1b_bf16``: its float twin.
- ``llama3_3b_qat``: the NVFP4 QAT fine-tune of ``recipes/llama3_3b_qat.toml`` (Llama-3.2-3B from a local
  Hugging Face folder, FSDP x TP 2, bf16 params, selective AC, compile, lr 2e-5 with 50 warm-up steps
  and cosine decay to 0.1x, 1000 steps of 64 x 2048 tokens).
- ``llama3_3b_bf16``: the same run without QAT, its float twin.

Every config sets ``parallelism.spmd_backend = "partial_dtensor"``: under tensor parallelism the QAT
linears need their weight shards as DTensors (``QATLinear.parallelize`` refuses the others).
"""

from __future__ import annotations

from pathlib import Path

from datasets import load_dataset
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.validate import Validator
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader
from torchtitan.models.llama3 import model_registry
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from nvfp4_titan.torchtitan_qat.converter import NVFP4QATConverter

JSONL = "jsonl"
"""A local JSON-lines corpus with a "text" field, as this project's recipes read (``dataset_path``
names the file); registered in torchtitan's ``DATASETS``, whose ``c4_test`` wants a folder."""
DATASETS[JSONL] = DatasetConfig(
    path="data/assets/shakespeare.jsonl",
    loader=lambda path: load_dataset("json", data_files=path, split="train"),
    sample_processor=lambda sample: sample["text"],
)
DEBUG_VOCAB = 8192  # data/assets/tokenizer.json
LLAMA_3B = "checkpoints/Llama-3.2-3B"  # a local Hugging Face folder, as recipes/llama3_3b_qat.toml


def _set_vocab(spec: ModelSpec, vocab: int) -> ModelSpec:
    model = spec.model
    model.vocab_size = vocab
    model.tok_embeddings.num_embeddings = vocab
    model.lm_head.out_features = vocab
    return spec


def _trainer(spec: ModelSpec, **fields) -> Trainer.Config:
    return Trainer.Config(
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=spec.model.vocab_size)),
        model_spec=spec,
        **fields,
    )


def debug_spec(**qat) -> ModelSpec:
    """torchtitan's debug Llama at the bundled tokenizer's vocabulary, converted with
    ``NVFP4QATConverter.Config(**qat)``."""
    return _set_vocab(model_registry("debugmodel", converters=[NVFP4QATConverter.Config(**qat)]), DEBUG_VOCAB)


def debug(**qat) -> Trainer.Config:
    """torchtitan's debug Llama with NVFP4 QAT (by default dynamic activation scales, pow2 tensor
    scales; ``qat``: ``NVFP4QATConverter.Config`` fields)."""
    return _trainer(
        debug_spec(**qat),
        hf_assets_path="data/assets",
        dump_folder="outputs/torchtitan_debug",
        optimizer=default_adamw(lr=1e-3),
        training=TrainingConfig(local_batch_size=8, seq_len=128, steps=60, mixed_precision_param="float32"),
        dataloader=HuggingFaceTextDataLoader.Config(dataset=JSONL),
        metrics=MetricsProcessor.Config(log_freq=5),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(enable=True, interval=20),
    )


def debug_static() -> Trainer.Config:
    """``debug`` with static activation scales, calibrated by the launcher on the first 4 batches."""
    return debug(activation_scale="static")


def debug_nvfp4_all_gather() -> Trainer.Config:
    """``debug`` with FSDP2 all-gathering the QAT weights as NVFP4 (eager, without torchtitan's CUDA graph
    of each step, whose replays would not recompute the tensor scales; set up by the launcher)."""
    config = debug(fsdp_nvfp4_all_gather=True)
    config.training.disable_cuda_graphs = True
    return config


def _llama3(flavor: str, converters: list, **fields) -> Trainer.Config:
    """A Llama 3 ``flavor`` run as this project's recipes set it: bf16 params, fp32 reductions,
    FSDP over every GPU, selective activation checkpointing, compile, seq 2048, local batch 4."""
    spec = model_registry(flavor, converters=converters)
    training = {"local_batch_size": 4, "seq_len": 2048, "mixed_precision_param": "bfloat16"}
    return _trainer(
        spec,
        training=TrainingConfig(**training, mixed_precision_reduce="float32", **fields.pop("training")),
        dataloader=HuggingFaceTextDataLoader.Config(dataset=JSONL),
        compile=CompileConfig(enable=True, components=["model"]),
        activation_checkpoint=SelectiveAC.Config(),
        **fields,
    )


def _llama3_1b(converters: list) -> Trainer.Config:
    return _llama3(
        "1B",
        converters,
        hf_assets_path="data/assets",
        dump_folder="outputs/torchtitan_llama3_1b",
        training={"steps": 300},
        optimizer=default_adamw(lr=3e-4),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=30),
        metrics=MetricsProcessor.Config(log_freq=10),
        parallelism=ParallelismConfig(data_parallel_shard_degree=-1, spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(enable=True, interval=100),
    )


def llama3_1b_qat() -> Trainer.Config:
    """``recipes/llama3_1b_qat.toml`` in torchtitan: the Llama 3.2 1B shape from scratch with NVFP4 QAT
    on the bundled corpus and tokenizer."""
    return _llama3_1b([NVFP4QATConverter.Config(model_compile_enabled=True)])


def llama3_1b_bf16() -> Trainer.Config:
    """The float twin of ``llama3_1b_qat``."""
    return _llama3_1b([])


def _llama3_3b(converters: list) -> Trainer.Config:
    return _llama3(
        "3B",
        converters,
        hf_assets_path=LLAMA_3B,
        dump_folder="outputs/torchtitan_llama3_3b",
        training={"global_batch_size": 64, "steps": 1000, "max_norm": 1.0},
        optimizer=default_adamw(lr=2e-5, weight_decay=0.0),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=50, decay_type="cosine", min_lr_factor=0.1),
        metrics=MetricsProcessor.Config(log_freq=10, enable_wandb=True),
        parallelism=ParallelismConfig(
            data_parallel_shard_degree=-1, tensor_parallel_degree=2, spmd_backend="partial_dtensor"
        ),
        checkpoint=CheckpointManager.Config(
            enable=True,
            interval=200,
            keep_latest_k=2,
            initial_load_path=str(Path(LLAMA_3B).resolve()),  # torchtitan wants it absolute
            initial_load_in_hf=True,
        ),
        validator=Validator.Config(freq=100, steps=4),
    )


def llama3_3b_qat() -> Trainer.Config:
    """``recipes/llama3_3b_qat.toml`` in torchtitan: NVFP4 QAT fine-tune of Llama-3.2-3B."""
    return _llama3_3b([NVFP4QATConverter.Config(model_compile_enabled=True)])


def llama3_3b_bf16() -> Trainer.Config:
    """The float twin of ``llama3_3b_qat`` (no converter), for throughput and quality baselines."""
    return _llama3_3b([])
