"""torchtitan's Llama with ``NVFP4QATConverter`` trains with this project's NVFP4 numerics: its QAT
forward is bit for bit the deployed model's, and every linear quantizes its weight to the codes and
scales this project's model quantizes the same weight to (after torchtitan's own checkpoint split and
Hugging Face permutation)."""

from __future__ import annotations

import pytest
import torch
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

import nvfp4
from nvfp4_titan.models.llama3 import Transformer
from nvfp4_titan.models.llama3 import state_dict_adapter as adapter
from nvfp4_titan.torchtitan_qat import configs, launch
from nvfp4_titan.torchtitan_qat.configs import DEBUG_VOCAB
from nvfp4_titan.torchtitan_qat.export import model_args
from tests_torchtitan.helpers import build, model_config, qat_linears, row_maps


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))


def test_converter_swaps_every_linear_but_the_head():
    model = build(model_config())
    names = set(qat_linears(model))
    assert len(names) == 6 * 5  # wqkv, wo, w1, w2, w3 in each of 6 layers
    assert "lm_head" not in names and type(model.lm_head) is not nvfp4.NVFP4QATLinear
    ffn = model.layers["0"].feed_forward
    assert ffn.w1.amax_peers == (ffn.w3,) and ffn.w3.amax_peers == (ffn.w1,) and ffn.w2.amax_peers == ()


@pytest.mark.parametrize("qat", [{}, {"tensor_scale": "amax"}, {"activation_scale": "none"}], ids=str)
def test_qat_forward_equals_deployed(qat):
    """The QAT logits equal, bit for bit, those of the same model with every QAT linear converted to
    the deployed ``NVFP4Linear`` (``nvfp4.convert``: stored codes and scales, no fake quantization)."""
    model = build(model_config(**qat))
    tokens = _tokens(DEBUG_VOCAB)
    with torch.no_grad():
        trained = model(tokens)
        nvfp4.convert(model)
        assert not qat_linears(model) and any(isinstance(m, nvfp4.NVFP4Linear) for m in model.modules())
        deployed = model(tokens)
    assert torch.equal(trained, deployed)


def _this_projects_model(tt: torch.nn.Module, cfg) -> Transformer:
    """This project's Llama holding ``tt``'s weights as the converter maps them (torchtitan's own
    checkpoint split and Hugging Face adapter, then this project's names), QAT prepared."""
    state = {k: v for k, v in tt.state_dict().items() if not k.endswith("input_amax")}
    hf = Llama3StateDictAdapter(cfg, None).to_hf(state)
    ours = Transformer(model_args(cfg))
    nvfp4.prepare(ours, nvfp4.QATConfig())
    missing, unexpected = ours.load_state_dict({adapter.from_hf(k): v for k, v in hf.items()}, strict=False)
    assert not unexpected and all(k.endswith("input_amax") for k in missing)
    return ours


def test_codes_scales_and_outputs_equal_this_projects_model():
    """Every torchtitan QAT linear quantizes its weight to the codes, block scales and tensor scale
    that this project's model quantizes the same rows to (wqkv as q, k, v of one fused group; w1 and w3
    sharing one amax), and its output rows equal this project's linears' on the same input."""
    cfg = model_config()
    tt = build(cfg, seed=1)
    ours = _this_projects_model(tt, cfg)
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, y):
            inputs[name], outputs[name] = args[0], y

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in qat_linears(tt).items()]
    with torch.no_grad():
        tt(_tokens(DEBUG_VOCAB, seed=1))
    for h in hooks:
        h.remove()
    checked = 0
    for fqn, rows_of in row_maps(cfg).items():
        q = qat_linears(tt)[fqn].quantized_weight()
        for name, rows in rows_of.items():
            mine = ours.get_submodule(name)
            r = mine.quantized_weight()
            assert torch.equal(q.packed[rows], r.packed), name
            assert torch.equal(q.block_scale[rows].view(torch.uint8), r.block_scale.view(torch.uint8)), name
            assert torch.equal(q.tensor_scale, r.tensor_scale), name
            with torch.no_grad():
                assert torch.equal(outputs[fqn][..., rows], mine(inputs[fqn])), name
            checked += 1
    assert checked == 6 * 7


@pytest.mark.parametrize(
    "qat,message",
    [
        ({"activation_scale": "static", "calibration_batches": 0}, "calibration_batches = 0: give a whole number"),
        ({"activation_scale": "static", "calibration_batches": "2"}, "calibration_batches = '2': give a whole"),
        ({"activation_scale": "static", "calibration_batches": True}, "calibration_batches = True: give a whole"),
        ({"share_fused_amax": False}, "fuses q, k and v into one linear"),
        ({"include": ["nothing.*"]}, "select no linear"),
        ({"tensor_scale": "e8m0"}, "tensor_scale='e8m0'"),
        ({"fsdp_nvfp4_all_gather": "yes"}, "fsdp_nvfp4_all_gather = 'yes': give true or false"),
    ],
    ids=[
        "no_calibration_batches",
        "calibration_batches_str",
        "calibration_batches_bool",
        "unshared_qkv",
        "nothing",
        "bad_scale",
        "all_gather_str",
    ],
)
def test_settings_it_cannot_train_as_deployed_are_refused(qat, message):
    with pytest.raises(ValueError, match=message):
        model_config(**qat)


def test_share_fused_amax_false_without_qkv_trains_gate_and_up_apart():
    cfg = model_config(share_fused_amax=False, exclude=["lm_head", "*.qkv_linear.*"])
    ffn = build(cfg).layers["0"].feed_forward
    assert ffn.w1.amax_peers == () and ffn.w3.amax_peers == ()


def test_an_uncalibrated_static_model_names_the_launcher():
    model = build(model_config(activation_scale="static"))
    with pytest.raises(RuntimeError, match=r"before calibration: train with `-m nvfp4_titan\.torchtitan_qat\.launch`"):
        model(torch.zeros(1, 16, dtype=torch.long))


def test_an_unsharded_nvfp4_all_gather_model_builds_as_the_plain_one():
    """torchtitan makes a seed checkpoint without parallelizing: nothing to gather, the same weights."""
    plain, wrapped = build(model_config()), build(model_config(fsdp_nvfp4_all_gather=True))
    want, got = plain.state_dict(), wrapped.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(t, want[k]) for k, t in got.items())


def test_nvfp4_all_gather_under_cuda_graphs_is_refused(monkeypatch):
    """A CUDA graph replay runs no Python: the tensor scales would not be recomputed after a step."""
    with torch.device("meta"):
        model = model_config(fsdp_nvfp4_all_gather=True).build()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match=r"set training.disable_cuda_graphs = true"):
        launch._check_cuda_graphs(model, disabled=False)
    launch._check_cuda_graphs(model, disabled=True)
    with torch.device("meta"):
        launch._check_cuda_graphs(model_config().build(), disabled=False)  # no all-gather asked for
    assert configs.debug_nvfp4_all_gather().training.disable_cuda_graphs
