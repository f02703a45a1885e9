"""Llama 3: logits parity with transformers, HF round trip, flavors, bad checkpoints."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import nvfp4
from nvfp4_titan.models.llama3 import (
    FLAVORS,
    CheckpointError,
    ModelArgs,
    Transformer,
    flavor,
    from_hf,
    to_hf,
)
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from tests.unit.test_qat import QuantizeCounter

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 32,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
}
# Every rope type of transformers' Llama; the sequences of the parity test (20 and 40 tokens)
# straddle the 32 positions where dynamic and longrope switch behaviour.
CONFIGS = {
    "gqa_untied_llama3_rope": dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}
    ),
    "gqa_tied_llama3_rope": dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "rope_theta": 50000.0}
    ),
    "mha_tied_default_rope": dict(
        num_key_value_heads=4, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    "head_dim_24_linear_rope": dict(
        num_key_value_heads=2,
        head_dim=24,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ),
    "dynamic_rope": dict(
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "yarn_rope": dict(
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "yarn_rope_mscale": dict(
        num_key_value_heads=1,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "rope_theta": 20000.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.8,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
    ),
    "longrope": dict(num_key_value_heads=2, rope_parameters=LONGROPE),
}


def _hf_dir(tmp_path: Path, name: str, **save_kw) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    shape = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    cfg = LlamaConfig(**{**shape, **CONFIGS[name]})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's 0.02 init, so logits are not tiny
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path, **save_kw)
    return path, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    path, ref = _hf_dir(tmp_path, name)
    ours = from_hf(path).eval()
    for seq in (20, 40):
        tokens = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = ref(tokens).logits
            got = ours(tokens)
        assert got.shape == want.shape == (2, seq, 96)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, seq)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["gqa_untied_llama3_rope", "gqa_tied_llama3_rope"])
def test_round_trip_is_byte_identical_sharded_and_not(tmp_path, name):
    path, _ = _hf_dir(tmp_path, name)
    (path / "tokenizer.json").write_text("{}")
    to_hf(from_hf(path, dtype=None), tmp_path / "one", tokenizer_dir=path)
    to_hf(from_hf(tmp_path / "one", dtype=None), tmp_path / "many", max_shard_bytes=20_000)
    assert (tmp_path / "one" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    src = _tensors(path)
    for out in ("one", "many"):
        got = _tensors(tmp_path / out)
        assert got.keys() == src.keys()
        for k in src:
            assert got[k].dtype == src[k].dtype
            assert got[k].numpy().tobytes() == src[k].numpy().tobytes(), k


def test_bf16_round_trip_and_dtype_cast(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_untied_llama3_rope")
    to_hf(from_hf(path), tmp_path / "bf16", dtype=torch.bfloat16)
    m = from_hf(tmp_path / "bf16", dtype=None)
    assert m.output.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    to_hf(m, tmp_path / "again")
    a, b = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_written_config_reads_back_and_transformers_agrees(tmp_path, name):
    """to_hf's config.json keeps every rope setting: our reader gets the same ModelArgs back and
    transformers, reading our folder, computes the same logits as the original model."""
    path, ref = _hf_dir(tmp_path, name)
    ours = from_hf(path)
    to_hf(ours, tmp_path / "out")
    assert from_hf(tmp_path / "out").args == ours.args
    again = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, ref(tokens).logits)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_type='su'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"rope_scaling": {**LONGROPE, "short_factor": [1.0, 2.0]}}, "short_factor has 2 factors"),
        ({"num_attention_heads": 5}, "divisible"),
        ({"intermediate_size": None}, "intermediate_size"),
        ({"num_key_value_heads": "2"}, "num_key_value_heads = '2': it must be a positive integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers = True: it must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers = 0: it must be a positive integer"),
        ({"hidden_size": -8, "vocab_size": 0}, "hidden_size = -8, vocab_size = 0: each must be a positive integer"),
        ({"rope_scaling": {"rope_type": "linear", "factor": [2]}}, "malformed (TypeError"),
        ({"rope_scaling": [1, 2]}, "malformed"),
    ],
)
def test_unsupported_config_named(tmp_path, change, key):
    path, _ = _hf_dir(tmp_path, "mha_tied_default_rope")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config.json: .*{re.escape(key)}"):
        from_hf(path)


PUBLISHED = {"1B": (1.236, 3), "3B": (3.213, 3), "8B": (8.03, 2), "70B": (70.6, 1)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_flavor_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = Transformer(flavor(name))
    n = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    want, digits = PUBLISHED[name]
    assert round(n / 1e9, digits) == want, n


def test_3b_flavor_hyperparameters():
    a = FLAVORS["3B"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == (3072, 28, 24, 8, 8192, 128256)
    assert a.tie_word_embeddings and a.rope_theta == 500000.0 and a.rope_scaling.factor == 32.0
    with pytest.raises(ValueError, match="unknown Llama 3 flavor"):
        flavor("3b")


def test_meta_build_prepare_materialize_and_fused_groups(monkeypatch):
    with torch.device("meta"):
        model = Transformer(FLAVORS["debug"].with_(n_layers=2))
    nvfp4.prepare(model)
    model.to_empty(device="cpu")
    model.init_weights()
    for m in nvfp4.qat_linears(model):
        m.reset_calibration()
    assert len(nvfp4.qat_linears(model)) == 2 * 7
    assert type(model.output) is torch.nn.Linear  # the head stays in high precision
    assert model.output.weight is model.tok_embeddings.weight
    wq = model.layers[0].attention.wq
    assert {p.weight.shape[0] for p in wq.amax_peers} == {128}  # wk, wv
    counter = QuantizeCounter(monkeypatch)  # q/k/v and gate/up quantize their input once
    loss = model(torch.randint(0, 8192, (2, 32))).float().logsumexp(-1).mean()
    assert counter.calls == [4, 2, 3, 2] * 2  # per layer: x + wq/wk/wv, x + wo, x + w1/w3, x + w2
    loss.backward()
    assert torch.isfinite(loss) and all(m.weight.grad is not None for m in nvfp4.qat_linears(model))
    for group in model.fused_linear_groups():
        for name in group:
            adapter.to_hf_module(name)  # every fused member has an HF name


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    args = FLAVORS["debug"].with_(n_layers=2, vocab_size=256)
    grads = {}
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = Transformer(args.with_(activation_checkpoint=ac))
        model(torch.arange(64).reshape(2, 32) % 256).float().square().mean().backward()
        grads[ac] = [p.grad for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[mode]))


def test_model_args_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="activation_checkpoint"):
        ModelArgs(activation_checkpoint="some")


# ---- bad checkpoints ------------------------------------------------------------------


def test_other_architecture_rejected(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_tied_llama3_rope")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json.*not a Llama"):
        from_hf(path)


def test_missing_shard_named(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_untied_llama3_rope")
    to_hf(from_hf(path), tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        from_hf(tmp_path / "sharded")


def test_shape_mismatch_names_tensor(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_untied_llama3_rope")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape"):
        from_hf(path)


def test_non_finite_tensor_named(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_untied_llama3_rope")
    f = path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight holds NaN or Inf"):
        from_hf(path)


def test_corrupt_shard_named(tmp_path):
    path, _ = _hf_dir(tmp_path, "gqa_untied_llama3_rope")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(path)


def test_to_hf_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        to_hf(Transformer(FLAVORS["debug"].with_(n_layers=1)), tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_init_weights_draws_each_parameter_from_its_own_seed():
    args = FLAVORS["debug"].with_(n_layers=3, tie_word_embeddings=False)
    a, b, c = Transformer(args), Transformer(args), Transformer(args)
    a.init_weights(seed=5)
    b.init_weights(seed=5)
    c.init_weights(seed=6)
    p, q, r = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(p[n], q[n]) for n in p)  # same seed: the same model
    assert not any(torch.equal(p[n], r[n]) for n in p if not n.endswith("norm.weight"))
    assert not torch.equal(p["layers.0.attention.wk.weight"], p["layers.0.attention.wv.weight"])  # same shape
    assert all(torch.equal(t, torch.ones_like(t)) for n, t in p.items() if n.endswith("norm.weight"))
    # TorchTitan's Llama init: std 0.02, output projections (wo, w2, w3) 0.02 / sqrt(2 (layer + 1)),
    # the untied head dim^-0.5 truncated at 3 std.
    std = {n: float(t.detach().std()) for n, t in p.items()}
    assert abs(std["tok_embeddings.weight"] - 0.02) < 0.0005 and abs(std["layers.2.attention.wq.weight"] - 0.02) < 0.001
    for layer in range(3):
        want = 0.02 / math.sqrt(2 * (layer + 1))
        for name in ("attention.wo", "feed_forward.w2", "feed_forward.w3"):
            assert abs(std[f"layers.{layer}.{name}.weight"] / want - 1) < 0.05, (layer, name)
    head = p["output.weight"].detach()
    assert abs(std["output.weight"] * args.dim**0.5 - 0.986) < 0.02 and float(head.abs().max()) <= 3 * args.dim**-0.5
