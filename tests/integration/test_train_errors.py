"""Bad input to train.py: one clear error, exit code 2, no traceback, no run folder."""

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, models

from nvfp4_titan.models.llama3 import FLAVORS, Transformer, to_hf
from tests.integration.helpers import FAST, train


def _big_tokenizer(path):
    vocab = {f"w{i}": i for i in range(9000)} | {"<|end_of_text|>": 9000}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path))
    return path


def _hf_of_other_shape(path):
    to_hf(Transformer(FLAVORS["debug"].with_(n_layers=1)), path)
    return path


def _hf_args(path, **changes) -> list[str]:
    """train.py arguments that start from a Hugging Face folder of the debug flavor with ``changes``."""
    to_hf(Transformer(FLAVORS["debug"].with_(n_layers=1, **changes)), path)
    return ["--model.flavor=hf", f"--checkpoint.initial_load_path={path}", "--checkpoint.initial_load_in_hf=true"]


def _dcp_of_other_shape(path):
    torch.manual_seed(0)
    model = Transformer(FLAVORS["debug"].with_(dim=128, n_heads=4, n_kv_heads=2))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    return path


CASES = {
    "malformed_toml": (
        lambda tmp: ["--recipe", str(_write(tmp / "bad.toml", "[training]\nsteps = = 3\n"))],
        r"bad.toml: malformed TOML.*line 2, column",
    ),
    "unknown_key": (lambda tmp: ["--training.step=3"], "unknown key training.step; did you mean 'steps'"),
    "wrong_type": (lambda tmp: ["--training.steps=ten"], "training.steps must be int"),
    "missing_data": (lambda tmp: [f"--dataset.path={tmp}/nowhere.jsonl"], "nowhere.jsonl does not exist"),
    "tokenizer_too_big": (
        lambda tmp: [f"--model.tokenizer_path={_big_tokenizer(tmp / 'tok.json')}"],
        "has 9001 tokens, more than the model's vocab_size 8192",
    ),
    "hf_of_other_shape": (
        lambda tmp: [
            f"--checkpoint.initial_load_path={_hf_of_other_shape(tmp / 'hf')}",
            "--checkpoint.initial_load_in_hf=true",
        ],
        r"another model shape.*n_layers: 1 vs 4",
    ),
    "dcp_of_other_shape": (
        lambda tmp: [f"--checkpoint.initial_load_path={_dcp_of_other_shape(tmp / 'dcp')}"],
        r"has shape \(8192, 128\), this model needs \(8192, 256\)",
    ),
    "nvfp4_all_gather_compiled": (
        lambda tmp: ["--qat.fsdp_nvfp4_all_gather=true", "--training.compile=true"],
        "fsdp_nvfp4_all_gather works in eager mode only",
    ),
    "tp_not_dividing_world": (
        lambda tmp: ["--parallelism.tensor_parallel_degree=2"],
        "tensor_parallel_degree=2 does not divide the world size 1",
    ),
    # Settings whose checkpoints engines could not decode as trained (the export contract).
    "separate_fused_amax": (
        lambda tmp: ["--qat.share_fused_amax=false"],
        r"share_fused_amax=false gives the 8 fused groups .* qat.allow_unexportable",
    ),
    "fused_group_in_part": (
        lambda tmp: ['--qat.exclude=["output", "*.wk"]'],
        r"layers.\*.attention.wk excluded from QAT but not the rest of its fused group \[.*\] \(4 group",
    ),
    "qat_selects_nothing": (lambda tmp: ['--qat.exclude=["*"]'], r"selects? no linear layer"),
    "amax_tensor_scale": (
        lambda tmp: ["--qat.tensor_scale=amax"],
        r"tensor_scale=amax: .*neither format decodes it as trained; use tensor_scale=pow2 .*qat.allow_unexportable",
    ),
    "in_features_not_a_multiple_of_16": (
        lambda tmp: _hf_args(tmp / "hf", ffn_dim=760),
        r"layers.0.feed_forward.w2 has in_features=760, not a multiple of 16 \(NVFP4 quantizes blocks of 16 along "
        r"it; 1 such linears\): keep them in high precision with qat.exclude = "
        r"\[\"output\", \"lm_head\", \"\*.output\", \"\*.lm_head\", \"layers.\*.feed_forward.w2\"\]$",
    ),
    "quantized_untied_head": (
        lambda tmp: [*_hf_args(tmp / "hf", tie_word_embeddings=False), "--qat.exclude=[]"],
        r"output is the output head \(lm_head\): vLLM loads no NVFP4 lm_head .*45102\); keep 'output' in the QAT "
        r"exclude patterns\. .*qat.allow_unexportable",
    ),
    "quantized_tied_head": (
        lambda tmp: ["--qat.exclude=[]"],
        r"output shares its weight with tok_embeddings \(tied embeddings\)",
    ),
    "recipe_not_utf8": (
        lambda tmp: ["--recipe", str(_write_bytes(tmp / "latin1.toml", b'[job]\ndescription = "caf\xe9"\n'))],
        r"latin1.toml is not UTF-8 text \(byte 24\)",
    ),
    "unknown_flavor": (lambda tmp: ["--model.flavor=foo"], r"model.flavor='foo': choose one of \['1B'"),
    "cuda_without_gpu": (lambda tmp: ["--training.device=cuda"], "training.device=cuda but no CUDA device is visible"),
    "negative_eps": (lambda tmp: ["--optimizer.eps=-1.0"], "optimizer.eps must be > 0"),
    "negative_weight_decay": (lambda tmp: ["--optimizer.weight_decay=-100.0"], "optimizer.weight_decay must be >= 0"),
    "infinite_lr": (lambda tmp: ["--optimizer.lr=inf"], r"optimizer.lr = inf: must be a finite number"),
    "recipe_is_a_folder": (lambda tmp: ["--recipe", str(tmp)], r"recipe .* is a folder; name a .toml file"),
    "empty_dataset_path": (lambda tmp: ["--dataset.path="], "dataset.path must name a corpus file or folder"),
    "seed_out_of_range": (lambda tmp: ["--training.seed=100000000000000"], r"training.seed must be in \[0, 2\*\*32\)"),
    "nan_max_norm": (lambda tmp: ["--training.max_norm=nan"], r"training.max_norm = nan: must be a finite number"),
    "dump_folder_is_a_file": (lambda tmp: [f"--job.dump_folder={_write(tmp / 'taken', 'x')}"], r"taken is a file"),
    "dump_folder_under_a_file": (
        lambda tmp: [f"--job.dump_folder={_write(tmp / 'taken', 'x') / 'run'}"],
        r"run lies under the file .*taken",
    ),
}


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(tmp_path, case):
    make_args, message = CASES[case]
    args = make_args(tmp_path)
    dump = tmp_path / "run"
    if args[0] == "--recipe":
        r = train(dump, *FAST, recipe=args[1])
    else:
        r = train(dump, *FAST, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert re.search(message, lines[0]), lines[0]
    assert not dump.exists()  # no partial output


def test_non_finite_calibration_stops_naming_the_linear(tmp_path):
    """Initial weights whose attention scores overflow give the output projection an Inf input
    amax: calibration stops the run there (it would train every step on NaN outputs). The run has
    started, so it exits 1 as a stopped run does, with no checkpoint written."""
    torch.manual_seed(0)
    model = Transformer(FLAVORS["debug"].with_(n_layers=1))
    model.init_weights(0)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.mul_(1e30)
        model.layers[0].attention.wk.weight.mul_(1e30)
    to_hf(model, tmp_path / "hf")
    hf = [f"--checkpoint.initial_load_path={tmp_path / 'hf'}", "--checkpoint.initial_load_in_hf=true"]
    static = ["--qat.activation_scale=static", "--qat.calibration_batches=1", "--lr_scheduler.warmup_steps=0"]
    r = train(tmp_path / "run", *FAST, *hf, *static, "--model.flavor=hf", "--training.steps=1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        "error: calibrating static activation scales at step 1: layers.0.attention.wo: input amax inf is not finite: "
        "a calibration input held NaN or Inf (its static activation scale would make every output NaN); nothing "
        "was saved. Check the initial weights and the data"
    ]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_the_suggested_exclude_trains_a_model_of_unquantizable_shape(tmp_path):
    """The qat.exclude that the in_features error suggests, given as the user would, trains."""
    hf, run = _hf_args(tmp_path / "hf", ffn_dim=760), tmp_path / "run"
    r = train(run, *FAST, *hf, "--training.steps=1", "--lr_scheduler.warmup_steps=0")
    suggested = re.search(r"qat.exclude = (\[.*\])$", r.stderr.strip()).group(1)
    r = train(run, *FAST, *hf, "--training.steps=1", "--lr_scheduler.warmup_steps=0", f"--qat.exclude={suggested}")
    assert r.returncode == 0, r.stderr[-3000:]
