"""convert_to_nvfp4: sharded and single-process checkpoints, exact codes, exact logits,
independent readers (compressed-tensors, vLLM's formula), bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

import nvfp4
import nvfp4.export
from nvfp4_titan.convert import ConvertError, Options, convert_checkpoint, load_nvfp4_model
from nvfp4_titan.models.llama3 import FLAVORS, Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from tests.integration.helpers import FAST, ROOT, model_weights, train

COMMON = [
    *FAST,
    "--training.steps=2",
    "--training.global_batch_size=8",
    "--training.local_batch_size=4",
    "--lr_scheduler.warmup_steps=0",
    "--checkpoint.interval=2",
]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    single = tmp / "single"
    assert train(single, *COMMON).returncode == 0
    static = tmp / "static"
    assert train(static, *COMMON, "--qat.activation_scale=static", "--qat.calibration_batches=2").returncode == 0
    weight_only = tmp / "weight_only"
    assert train(weight_only, *COMMON, "--qat.activation_scale=none").returncode == 0
    four_over_six = tmp / "four_over_six"
    assert train(four_over_six, *COMMON, "--qat.block_scale_rule=four_over_six").returncode == 0
    sharded = tmp / "fsdp2xtp2"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "train.py",
        "--recipe",
        "recipes/debug_cpu.toml",
        f"--job.dump_folder={sharded}",
        *COMMON,
        "--parallelism.data_parallel_shard_degree=2",
        "--parallelism.tensor_parallel_degree=2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {
        "single": single,
        "static": static,
        "weight_only": weight_only,
        "four_over_six": four_over_six,
        "fsdp2xtp2": sharded,
    }


def _consolidated(run) -> dict[str, torch.Tensor]:
    return model_weights(run / "checkpoint" / "step-2")


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _qat_model(weights: dict[str, torch.Tensor], config: nvfp4.QATConfig) -> Transformer:
    model = Transformer(FLAVORS["debug"])
    nvfp4.prepare(model, config)
    model.load_state_dict(weights, strict=False)
    for m in nvfp4.qat_linears(model):
        m._calibrated = m.config.activation_scale == "static"
    return model


TOKENS = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run", ["single", "fsdp2xtp2"])
def test_codes_are_quantize_of_consolidated_weights_and_logits_are_exact(runs, run, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(runs[run], out, Options(calibration_batches=2))
    weights = _consolidated(runs[run])
    got = _tensors(out)
    model = Transformer(FLAVORS["debug"])
    for group in model.fused_linear_groups() + [
        [f"layers.{i}.attention.wo", f"layers.{i}.feed_forward.w2"] for i in range(4)
    ]:
        members = [[m] for m in group] if group[0].endswith("wo") else [group]
        for g in members:
            amax = torch.stack([weights[f"{m}.weight"].abs().max() for m in g]).max()
            for m in g:
                q = nvfp4.quantize(weights[f"{m}.weight"], amax)
                hf = adapter.to_hf_module(m)
                assert torch.equal(got[f"{hf}.weight"], q.packed), m
                assert torch.equal(got[f"{hf}.weight_scale"].view(torch.uint8), q.block_scale.view(torch.uint8)), m
                assert torch.equal(got[f"{hf}.weight_scale_2"], q.tensor_scale), m
                assert got[f"{hf}.input_scale"].dtype == torch.float32
    with torch.no_grad():
        want = _qat_model(weights, nvfp4.QATConfig())(TOKENS)
        conv = load_nvfp4_model(out)(TOKENS)
    assert torch.equal(conv, want)


def test_static_scales_are_exported_and_logits_exact(runs, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(runs["static"], out, Options())
    weights = _consolidated(runs["static"])
    got = _tensors(out)
    s = nvfp4.tensor_scale(weights["layers.2.feed_forward.w2.input_amax"])
    assert torch.equal(got["model.layers.2.mlp.down_proj.input_scale"], s)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["nvfp4_titan"]["input_scale"].startswith("static")
    with torch.no_grad():
        want = _qat_model(weights, nvfp4.QATConfig(activation_scale="static"))(TOKENS)
        conv = load_nvfp4_model(out)(TOKENS)
    assert torch.equal(conv, want)


def test_weight_only_exports_w4a16_and_logits_exact(runs, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    convert_checkpoint(runs["weight_only"], tmp_path / "mo", Options())
    convert_checkpoint(runs["weight_only"], tmp_path / "ct", Options(fmt="compressed-tensors"))
    got = _tensors(tmp_path / "mo")
    assert not [k for k in got if k.endswith("input_scale")]
    hq = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "W4A16_NVFP4"
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    qc.pop("nvfp4_titan")
    assert QuantizationConfig.model_validate(qc).config_groups["group_0"].input_activations is None
    weights = _consolidated(runs["weight_only"])
    with torch.no_grad():
        want = _qat_model(weights, nvfp4.QATConfig(activation_scale="none"))(TOKENS)
        for fmt in ("mo", "ct"):
            assert torch.equal(load_nvfp4_model(tmp_path / fmt)(TOKENS), want), fmt


def test_independent_readers_decode_identical_weights(runs, tmp_path):
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    weights = _consolidated(runs["single"])
    convert_checkpoint(runs["single"], tmp_path / "mo", Options(calibration_batches=1))
    convert_checkpoint(runs["single"], tmp_path / "ct", Options(fmt="compressed-tensors", calibration_batches=1))
    mo, ct = _tensors(tmp_path / "mo"), _tensors(tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    qc.pop("nvfp4_titan")
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    for i in range(4):
        group = [f"layers.{i}.attention.{w}" for w in ("wq", "wk", "wv")]
        amax = torch.stack([weights[f"{m}.weight"].abs().max() for m in group]).max()
        for m in group:
            want = nvfp4.fake_quantize(weights[f"{m}.weight"], amax)
            hf = adapter.to_hf_module(m)
            # compressed-tensors' own decompressor (bf16 out: exact, values have <= 6 bits)
            sd = {k.removeprefix(hf + "."): v for k, v in ct.items() if k.startswith(hf + ".")}
            dec = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(dec.float(), want), m
            # vLLM's emulation formula on the modelopt layout: fp4 * (weight_scale / (1 / weight_scale_2))
            packed = mo[f"{hf}.weight"]
            codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).long()
            fp4 = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
            scale = mo[f"{hf}.weight_scale"].float() / (1.0 / mo[f"{hf}.weight_scale_2"])
            assert torch.equal((fp4.reshape(fp4.shape[0], -1, 16) * scale[..., None]).flatten(1), want), m
    hq = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["group_size"] == 16 and hq["exclude_modules"] == ["lm_head"]


def _decoded_by_readers(ct: dict, mo: dict, hf: str, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear's weight decoded by compressed-tensors' own decompressor and by vLLM's emulation
    formula on the modelopt layout, fp4 * (weight_scale / (1 / weight_scale_2))."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor

    sd = {k.removeprefix(hf + "."): v for k, v in ct.items() if k.startswith(hf + ".")}
    dec = NVFP4PackedCompressor.decompress(sd, scheme)["weight"].float()  # bf16: exact, <= 6 bits
    packed = mo[f"{hf}.weight"]
    codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).long()
    fp4 = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = mo[f"{hf}.weight_scale"].float() / (1.0 / mo[f"{hf}.weight_scale_2"])
    return dec, (fp4.reshape(fp4.shape[0], -1, 16) * scale[..., None]).flatten(1)


def test_four_over_six_run_exports_its_block_scales_decoded_bitwise_by_every_reader(runs, tmp_path):
    """A run trained with qat.block_scale_rule = four_over_six: both layouts hold the rule's codes
    and block scales (nvfp4.quantize of the consolidated weights, the fused group's amax), readers
    decode them bitwise, logits equal the QAT model's, --verify passes; converting it with another
    rule is refused and writes nothing."""
    from compressed_tensors.quantization import QuantizationConfig

    rule = "four_over_six"
    weights = _consolidated(runs[rule])
    convert_checkpoint(runs[rule], tmp_path / "mo", Options(calibration_batches=1, verify=True))
    convert_checkpoint(runs[rule], tmp_path / "ct", Options(fmt="compressed-tensors", calibration_batches=1))
    mo, ct = _tensors(tmp_path / "mo"), _tensors(tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc.pop("nvfp4_titan")["block_scale_rule"] == rule
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    chose_four = 0
    for i in range(4):
        group = [f"layers.{i}.feed_forward.{w}" for w in ("w1", "w3")]
        amax = torch.stack([weights[f"{m}.weight"].abs().max() for m in group]).max()
        for m in group:
            q = nvfp4.quantize(weights[f"{m}.weight"], amax, block_scale_rule=rule)
            amax_rule = nvfp4.quantize(weights[f"{m}.weight"], amax)
            chose_four += int((q.block_scale.view(torch.uint8) != amax_rule.block_scale.view(torch.uint8)).sum())
            hf = adapter.to_hf_module(m)
            assert torch.equal(mo[f"{hf}.weight"], q.packed) and torch.equal(ct[f"{hf}.weight_packed"], q.packed), m
            assert torch.equal(mo[f"{hf}.weight_scale"].view(torch.uint8), q.block_scale.view(torch.uint8)), m
            assert torch.equal(mo[f"{hf}.weight_scale_2"], q.tensor_scale), m
            for decoded in _decoded_by_readers(ct, mo, hf, scheme):
                assert torch.equal(decoded, nvfp4.dequantize(q)), m
    assert chose_four > 0
    with torch.no_grad():
        want = _qat_model(weights, nvfp4.QATConfig(block_scale_rule=rule))(TOKENS)
        for fmt in ("mo", "ct"):
            assert torch.equal(load_nvfp4_model(tmp_path / fmt)(TOKENS), want), fmt
    with pytest.raises(ConvertError, match="trained with block_scale_rule 'four_over_six'"):
        convert_checkpoint(runs[rule], tmp_path / "other", Options(block_scale_rule="amax"))
    assert not (tmp_path / "other").exists()


def test_ptq_of_a_hugging_face_folder_with_the_four_over_six_rule(runs, tmp_path):
    """--block-scale-rule four_over_six quantizes a float Hugging Face folder with the rule: the
    codes and block scales of nvfp4.quantize, --verify passes; the default stays amax."""
    hf_dir = tmp_path / "hf"
    convert_checkpoint(runs["single"], hf_dir, Options(fmt="hf"))
    cli = [sys.executable, "scripts/convert_to_nvfp4.py", str(hf_dir), "--verify", "--calibration-batches=0"]
    r = subprocess.run(
        [*cli, str(tmp_path / "ptq"), "--block-scale-rule", "four_over_six"], cwd=ROOT, text=True, capture_output=True
    )
    assert r.returncode == 0 and "0 mismatches" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([*cli, str(tmp_path / "ptq_amax")], cwd=ROOT, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got, default = _tensors(tmp_path / "ptq"), _tensors(tmp_path / "ptq_amax")
    w = _tensors(hf_dir)["model.layers.1.self_attn.o_proj.weight"]  # what PTQ quantizes
    for rule, out in (("four_over_six", got), ("amax", default)):
        q = nvfp4.quantize(w, block_scale_rule=rule)
        assert torch.equal(out["model.layers.1.self_attn.o_proj.weight"], q.packed), rule
        assert torch.equal(
            out["model.layers.1.self_attn.o_proj.weight_scale"].view(torch.uint8), q.block_scale.view(torch.uint8)
        )
    meta = json.loads((tmp_path / "ptq" / "config.json").read_text())["quantization_config"]["nvfp4_titan"]
    assert meta["block_scale_rule"] == "four_over_six" and meta["method"].startswith("PTQ")


def test_readers_decode_amax_tensor_scales_differently_from_training():
    """Why the export contract refuses tensor_scale = "amax": compressed-tensors' own decompressor
    and vLLM's formula decode other weights than the QAT forward used, whatever scale is stored
    (the decompressor's bfloat16 cannot hold them), where pow2 scales decode bitwise (above)."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = nvfp4.export.quantization_config("compressed-tensors", [], {})
    qc.pop("nvfp4_titan")
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        q = nvfp4.quantize(torch.randn(256, 256, generator=g) * 0.02, tensor_scale_mode="amax")
        want = nvfp4.dequantize(q)  # what the QAT forward multiplies
        ct = NVFP4PackedCompressor.decompress(nvfp4.export.layer_tensors("compressed-tensors", q, None), scheme)
        assert not torch.equal(ct["weight"].float(), want)
        assert not torch.equal(want.bfloat16().float(), want)  # no stored global scale could fix it
        assert not torch.equal(nvfp4.export.decode("modelopt", nvfp4.export.layer_tensors("modelopt", q, None)), want)


def test_cli_verify_and_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    cli = [
        sys.executable,
        "scripts/convert_to_nvfp4.py",
        str(runs["single"]),
        str(out),
        "--verify",
        "--calibration-batches=1",
    ]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "0 mismatches" in r.stdout and r.stdout.count(" yes") == 28
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not empty; pass --overwrite" in r.stderr
    assert subprocess.run(cli + ["--overwrite", "--format=hf"], cwd=ROOT, capture_output=True).returncode == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _bad(tmp_path, runs, kind):
    step = tmp_path / "step"
    if kind == "not_a_checkpoint":
        step.mkdir()
        (step / "notes.txt").write_text("hi")
        return step, "not a checkpoint"
    if kind == "other_model":
        step.mkdir()
        (step / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
        return step, "not a Llama"
    shutil.copytree(runs["single"] / "checkpoint" / "step-2", step)
    if kind == "corrupt_shard":
        shard = next(step.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:1000])
        return step, r"step is damaged: __0_0.distcp is truncated \(1000 of \d+ bytes\); convert another step"
    weights = {"model": _consolidated(runs["single"])}
    weights["model"]["layers.1.feed_forward.w3.weight"][0, 0] = float("nan")
    for f in step.glob("*.distcp"):
        f.unlink()
    dcp.save(weights, checkpoint_id=str(step), no_dist=True)
    return step, "layers.1.feed_forward.w3.weight holds NaN"


@pytest.mark.parametrize("kind", ["not_a_checkpoint", "other_model", "corrupt_shard", "non_finite"])
def test_bad_input_leaves_nothing_behind(runs, tmp_path, kind):
    src, message = _bad(tmp_path, runs, kind)
    out = tmp_path / "out"
    with pytest.raises((ConvertError, ValueError), match=message):
        convert_checkpoint(src, out, Options(calibration_batches=1))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
