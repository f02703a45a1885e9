"""The export contract: what the converter writes, engines decode as trained, or it refuses with a
reason; its metadata says truthfully what the export is; it never destroys or leaks anything;
a compressed-tensors export loads and runs in transformers with default arguments."""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import nvfp4
from nvfp4_titan.convert import (
    ConvertError,
    Options,
    VerifyError,
    check_exportable,
    cli,
    convert_checkpoint,
    resolve_source,
    write,
)
from nvfp4_titan.models.llama3 import FLAVORS, Transformer, to_hf
from tests.integration.helpers import FAST, ROOT, train

EOS = Tokenizer.from_file(str(ROOT / "data" / "assets" / "tokenizer.json")).token_to_id("<|end_of_text|>")
COMMON = [
    *FAST,
    "--training.steps=2",
    "--training.global_batch_size=8",
    "--lr_scheduler.warmup_steps=0",
    "--checkpoint.interval=2",
    "--checkpoint.keep_latest_k=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    made = {
        "qat": [],
        "float": ["--qat.enable=false"],
        "separate_amax": ["--qat.share_fused_amax=false", "--qat.allow_unexportable=true"],
        "static_late": [
            "--qat.activation_scale=static",
            "--qat.start_step=3",
            "--training.steps=4",
            "--qat.calibration_batches=1",
        ],
    }
    for name, extra in made.items():
        r = train(tmp / name, *COMMON, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    return {name: tmp / name for name in made}


def _metadata(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]["nvfp4_titan"]


def test_unexportable_settings_train_only_when_asked_and_are_refused_for_export(runs, tmp_path):
    with pytest.raises(ConvertError, match="share_fused_amax=false .* --format hf"):
        convert_checkpoint(runs["separate_amax"], tmp_path / "out", Options(calibration_batches=1))
    assert not (tmp_path / "out").exists()
    convert_checkpoint(runs["separate_amax"], tmp_path / "float", Options(fmt="hf"))  # the float model exports


def _with_config_line(runs, tmp_path, pattern: str, line: str):
    """A copy of the qat run whose config.toml has ``line`` in place of the line ``pattern`` matches."""
    run = tmp_path / "run"
    shutil.copytree(runs["qat"], run)
    toml = run / "checkpoint" / "step-2" / "config.toml"
    text, n = re.subn(pattern, line, toml.read_text(), flags=re.M)
    assert n == 1
    toml.write_text(text)
    return run


def test_amax_tensor_scales_are_refused_for_export(runs, tmp_path):
    """No stored scale lets compressed-tensors or vLLM decode a non-power-of-two tensor scale as
    trained (test_convert.py shows their decoders differ): a run trained with it under
    qat.allow_unexportable exports in float only."""
    run = _with_config_line(runs, tmp_path, r'^tensor_scale = "pow2"$', 'tensor_scale = "amax"')
    for fmt in ("modelopt", "compressed-tensors"):
        with pytest.raises(ConvertError, match=r"tensor_scale=amax: .*Export it in float with --format hf"):
            convert_checkpoint(run, tmp_path / "out", Options(fmt=fmt, calibration_batches=0))
        assert not (tmp_path / "out").exists()
    convert_checkpoint(run, tmp_path / "float", Options(fmt="hf"))


def _corrupt_down_projections(monkeypatch):
    """The writer stores wrong codes for the (256, 768) down projections (what --verify is for)."""
    layer_tensors = write.layer_tensors

    def corrupted(fmt, q, s_in):
        tensors = layer_tensors(fmt, q, s_in)
        if q.packed.shape == (256, 384):
            tensors["weight"] = tensors["weight"] ^ 1  # the low bit of every even element's code
        return tensors

    monkeypatch.setattr(write, "layer_tensors", corrupted)


def test_a_failed_verify_writes_nothing_and_keeps_the_old_output(runs, tmp_path, monkeypatch, capsys):
    old = tmp_path / "old"
    convert_checkpoint(runs["qat"], old, Options(calibration_batches=0))
    before = _tree(old)
    _corrupt_down_projections(monkeypatch)
    message = r"--verify: 4 quantized weights of .* decode differently .*; nothing was written"
    with pytest.raises(VerifyError, match=message):
        convert_checkpoint(runs["qat"], tmp_path / "new", Options(calibration_batches=0, verify=True))
    with pytest.raises(VerifyError, match=message):
        convert_checkpoint(runs["qat"], old, Options(calibration_batches=0, verify=True), overwrite=True)
    assert _tree(old) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folder either
    capsys.readouterr()
    assert cli.main([str(runs["qat"]), str(tmp_path / "cli"), "--verify", "--calibration-batches=0", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "4 mismatches" in out and err.startswith("error: --verify: 4 quantized weights")
    assert not (tmp_path / "cli").exists()


def test_static_scales_of_a_step_before_qat_are_refused(runs, tmp_path):
    step2, step4 = (runs["static_late"] / "checkpoint" / f"step-{n}" for n in (2, 4))
    with pytest.raises(
        ConvertError, match=r"never calibrated .*saved at step-2, before QAT started \(qat.start_step = 3\)"
    ):
        convert_checkpoint(step2, tmp_path / "early", Options())
    convert_checkpoint(step4, tmp_path / "late", Options())
    assert _metadata(tmp_path / "late")["input_scale"].startswith("static: calibrated during training")
    assert _metadata(tmp_path / "late")["method"] == "QAT (static activation scales) from step 4"


def test_non_finite_static_input_amax_is_refused(runs):
    src = resolve_source(runs["static_late"])
    check_exportable(src)
    src.input_amax["layers.1.feed_forward.w2"] = torch.tensor(float("nan"))
    with pytest.raises(ConvertError, match="input amax of layers.1.feed_forward.w2 is nan"):
        check_exportable(src)


def test_a_quantized_untied_head_is_refused(tmp_path):
    """vLLM loads no NVFP4 lm_head for Llama: an untied head is exported in high precision only."""
    to_hf(Transformer(FLAVORS["debug"].with_(n_layers=1, tie_word_embeddings=False)), tmp_path / "hf")
    src = resolve_source(tmp_path / "hf")
    check_exportable(src)  # the default QAT config keeps the head in high precision
    src.qat = nvfp4.QATConfig(exclude=())
    with pytest.raises(ConvertError, match=r"output is the output head \(lm_head\): vLLM loads no NVFP4 lm_head"):
        check_exportable(src)
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", Options(calibration_batches=0))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


def test_hf_shapes_nvfp4_cannot_quantize_export_with_the_suggested_exclude(runs, tmp_path):
    """PTQ of a Hugging Face model whose intermediate_size (760) is no multiple of 16: refused with
    the --exclude that fixes it, which exports it (down_proj in high precision) and passes --verify;
    --exclude keeps the export contract, and a training run is exported with its own QAT config."""
    to_hf(Transformer(FLAVORS["debug"].with_(n_layers=1, ffn_dim=760)), tmp_path / "hf")
    with pytest.raises(ConvertError) as refused:
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", Options(calibration_batches=0))
    message = str(refused.value)
    assert message.endswith(
        "layers.0.feed_forward.w2 (model.layers.0.mlp.down_proj) has in_features=760, not a multiple of 16 (NVFP4 "
        "quantizes blocks of 16 along it; 1 such linears): keep them in high precision with "
        "--exclude output lm_head '*.output' '*.lm_head' 'layers.*.feed_forward.w2'"
    )
    assert not (tmp_path / "out").exists()
    suggested = shlex.split(message.split("with ")[-1])
    cli_args = [str(tmp_path / "hf"), str(tmp_path / "out"), "--calibration-batches=0", "--verify", *suggested]
    assert cli.main(cli_args) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (256, 760)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8
    with pytest.raises(ConvertError, match=r"layers.\*.attention.wk excluded from QAT but not the rest of its fused"):
        convert_checkpoint(
            tmp_path / "hf", tmp_path / "split", Options(calibration_batches=0, exclude=(*suggested[1:], "*.wk"))
        )
    with pytest.raises(ConvertError, match=r"--exclude chooses what PTQ of a Hugging Face folder quantizes; .*run"):
        convert_checkpoint(runs["qat"], tmp_path / "run", Options(calibration_batches=0, exclude=("output",)))
    assert not (tmp_path / "split").exists() and not (tmp_path / "run").exists()


def test_metadata_says_qat_or_ptq(runs, tmp_path):
    convert_checkpoint(runs["float"], tmp_path / "float", Options(calibration_batches=1))
    convert_checkpoint(runs["qat"], tmp_path / "qat", Options(calibration_batches=1))
    assert _metadata(tmp_path / "float")["method"].startswith("PTQ: trained in float (qat.enable = false)")
    assert _metadata(tmp_path / "qat")["method"] == "QAT (dynamic activation scales) from step 1"


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_output_equal_to_holding_or_inside_the_source_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["qat"], run)
    step = run / "checkpoint" / "step-2"
    before = _tree(run)
    for source, output in ((step, step), (run, run), (step, run), (step, step / "nvfp4"), (run, step)):
        with pytest.raises(ConvertError, match="write the NVFP4 checkpoint to a folder outside it"):
            convert_checkpoint(source, output, Options(calibration_batches=1), overwrite=True)
    assert _tree(run) == before


def test_outputs_that_are_no_converted_checkpoint_are_never_replaced(runs, tmp_path):
    data = tmp_path / "assets"  # e.g. the run's own tokenizer and corpus folder
    data.mkdir()
    (data / "corpus.jsonl").write_text('{"text": "keep me"}\n')
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "link").symlink_to(data)
    hf = tmp_path / "hf_model"  # a float Hugging Face model: it has a config.json too
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (hf / "NOTES.md").write_text("keep me")
    for output, message in (
        (data, "is not a checkpoint this converter wrote"),
        (hf, r"is not a checkpoint this converter wrote \(no nvfp4_titan.json\)"),
        (tmp_path / "a_file", "is a file, not a folder"),
        (tmp_path / "a_file" / "sub", "is a file, not a folder"),
        (tmp_path / "link", "is a symbolic link"),
        (
            Path("/sys/nvfp4-titan-test-out"),
            r"cannot write /sys/nvfp4-titan-test-out \(\w+Error: .*nothing was written",
        ),
    ):
        with pytest.raises(ConvertError, match=message):
            convert_checkpoint(runs["qat"], output, Options(calibration_batches=0), overwrite=True)
    assert (data / "corpus.jsonl").read_text() == '{"text": "keep me"}\n' and (
        tmp_path / "a_file"
    ).read_text() == "keep me"
    assert (hf / "NOTES.md").read_text() == "keep me"
    convert_checkpoint(runs["qat"], tmp_path / "out", Options(calibration_batches=0))
    convert_checkpoint(
        runs["qat"], tmp_path / "out", Options(calibration_batches=0), overwrite=True
    )  # a converted one: replaced


def test_a_source_named_like_a_temporary_folder_survives(runs, tmp_path):
    source = tmp_path / ".victim.convert-999999999-abc"  # the name of a dead conversion's temporary
    shutil.copytree(runs["qat"], source)
    convert_checkpoint(source, tmp_path / "victim", Options(calibration_batches=0))
    assert (source / "checkpoint" / "step-2" / ".metadata").is_file()


def test_an_nvfp4_export_is_no_source(runs, tmp_path):
    convert_checkpoint(runs["qat"], tmp_path / "once", Options(calibration_batches=0))
    with pytest.raises(ConvertError, match="is already quantized \\(modelopt\\)"):
        convert_checkpoint(tmp_path / "once", tmp_path / "twice", Options(calibration_batches=0))


def test_a_config_that_quantizes_nothing_is_refused(runs, tmp_path):
    run = _with_config_line(runs, tmp_path, r"^exclude = \[.*\]$", 'exclude = ["*"]')
    with pytest.raises(ConvertError, match="selects no linear layer: there is nothing to quantize"):
        convert_checkpoint(run, tmp_path / "out", Options(calibration_batches=0))


@pytest.mark.parametrize(
    "option", ["--calibration-batch-size=0", "--calibration-batches=-1", "--calibration-seq-len=0"]
)
def test_calibration_options_out_of_range(runs, tmp_path, option):
    cli = [sys.executable, "scripts/convert_to_nvfp4.py", str(runs["qat"]), str(tmp_path / "out"), option]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "give a whole number >=" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def _with_tokenizer_path(runs, tmp_path, tokenizer_path: str):
    run = tmp_path / "run"
    shutil.copytree(runs["qat"], run)
    toml = run / "checkpoint" / "step-2" / "config.toml"
    text = toml.read_text().replace(
        'tokenizer_path = "data/assets/tokenizer.json"', f'tokenizer_path = "{tokenizer_path}"'
    )
    toml.write_text(text)
    return run


@pytest.mark.parametrize("named", ["/etc/hostname", "beside_a_tokenizer"])
def test_only_tokenizer_files_are_copied(runs, tmp_path, named):
    if named == "beside_a_tokenizer":  # a config naming another file of a folder that holds one
        (tmp_path / "tok").mkdir()
        shutil.copy(ROOT / "data" / "assets" / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
        (tmp_path / "tok" / "secret.txt").write_text("not for the export")
        named = str(tmp_path / "tok" / "secret.txt")
    run = _with_tokenizer_path(runs, tmp_path, named)
    with pytest.raises(ConvertError, match=f"no tokenizer files .* at {named}.*--tokenizer"):
        convert_checkpoint(run, tmp_path / "out", Options(calibration_batches=0))
    assert not (tmp_path / "out").exists()


def test_relative_tokenizer_path_from_another_directory(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["qat"], run)
    monkeypatch.chdir(tmp_path)  # the run's tokenizer_path is relative to the repository root
    for batches in (0, 1):  # copying the tokenizer, and calibrating with it
        with pytest.raises(ConvertError, match="data/assets/tokenizer.json.*pass --tokenizer"):
            convert_checkpoint(run, tmp_path / "out", Options(calibration_batches=batches))
    tok = ROOT / "data" / "assets" / "tokenizer.json"
    convert_checkpoint(run, tmp_path / "out", Options(calibration_batches=0, tokenizer=tok))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == EOS


def test_output_permissions_follow_the_umask_and_stale_temporaries_go(runs, tmp_path):
    stale = tmp_path / ".out.convert-999999999-abc"  # a conversion killed by SIGKILL (no such pid)
    stale.mkdir()
    (stale / ".nvfp4-convert-temporary").touch()  # the converter's mark in its temporaries
    old = os.umask(0o022)
    try:
        convert_checkpoint(runs["qat"], tmp_path / "out", Options(calibration_batches=0))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in (tmp_path / "out").iterdir())
    assert not stale.exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_conversion_leaves_nothing(runs, tmp_path, sig, code):
    out = tmp_path / "out"
    cli = [sys.executable, "scripts/convert_to_nvfp4.py", str(runs["qat"]), str(out), "--calibration-batches=64"]
    # SIGINT as a terminal sends it: a suite started in the background (`cmd &` in a script) hands
    # its children SIGINT ignored, and Python then keeps ignoring it
    p = subprocess.Popen(
        cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.convert-*")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "finished before it could be interrupted"
    p.send_signal(sig)
    assert p.wait(60) == code
    assert "Traceback" not in p.stderr.read()
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_compressed_tensors_export_of_an_fp32_run_runs_in_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    shutil.copy(ROOT / "data" / "assets" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = tmp_path / "ct"
    convert_checkpoint(
        runs["qat"],
        out,
        Options(fmt="compressed-tensors", calibration_batches=1, tokenizer=tmp_path / "tokenizer.json"),
    )
    assert (out / "chat_template.jinja").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["eos_token_id"] == EOS
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # default arguments
    with torch.no_grad():
        logits = model(torch.randint(0, 8192, (1, 16))).logits
    assert logits.shape == (1, 16, 8192) and torch.isfinite(logits).all()


def test_a_tokenizer_larger_than_the_model_is_refused_for_calibration(runs, tmp_path):
    """--tokenizer names the tokenizer to copy and calibrate with: one with more tokens than the
    model's vocabulary would index past the embedding (it ended in an IndexError traceback)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "data" / "assets" / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConvertError, match=r"has 8202 tokens, more than the model's vocab_size 8192: pass the"):
        convert_checkpoint(
            runs["qat"], tmp_path / "out", Options(calibration_batches=1, tokenizer=tmp_path / "tokenizer.json")
        )
    assert not (tmp_path / "out").exists()
