"""Fine-tuning starts: from a Hugging Face directory and from a DCP step folder; wandb offline."""

import pytest
from safetensors.torch import load_file, save_file

from nvfp4_titan.convert import ConvertError, Options, convert_checkpoint
from nvfp4_titan.models.llama3 import FLAVORS, Transformer, to_hf
from tests.integration.helpers import FAST, losses, model_weights, train


def test_initial_loads_from_hf_and_dcp_start_where_training_left(tmp_path):
    base = tmp_path / "base"
    assert train(base, *FAST, "--training.steps=12", "--metrics.log_freq=1", "--checkpoint.interval=12").returncode == 0
    trained_loss = losses(base)[12]
    fresh_loss = losses(base)[1]

    # The trained weights as a Hugging Face directory.
    full = model_weights(base / "checkpoint" / "step-12")
    sd = {k: v for k, v in full.items() if not k.endswith("input_amax")}
    model = Transformer(FLAVORS["debug"])
    model.load_state_dict(sd, strict=True)
    to_hf(model, tmp_path / "hf")

    runs = {
        "hf": ["--checkpoint.initial_load_in_hf=true", f"--checkpoint.initial_load_path={tmp_path / 'hf'}"],
        "dcp": [f"--checkpoint.initial_load_path={base / 'checkpoint' / 'step-12'}"],
    }
    for name, extra in runs.items():
        r = train(tmp_path / name, *FAST, "--training.steps=2", "--metrics.log_freq=1", *extra)
        assert r.returncode == 0, r.stderr
        assert "loaded" in r.stdout
        first = losses(tmp_path / name)[1]  # a new run: step 1 sees the first global batch again
        assert abs(first - fresh_loss) > 1.0 and first < trained_loss + 0.5, (name, first, fresh_loss, trained_loss)


def test_wandb_offline_writes_a_local_run(tmp_path):
    dump = tmp_path / "run"
    r = train(
        dump,
        *FAST,
        "--training.steps=2",
        "--metrics.enable_wandb=true",
        "--checkpoint.enable=false",
        env={"WANDB_SILENT": "true"},
    )
    assert r.returncode == 0, r.stderr
    assert list((dump / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("role", ["initial", "teacher"])
def test_weights_holding_nan_are_named_and_leave_no_run_folder(tmp_path, role):
    """A Hugging Face folder whose weights hold a NaN, as the run's initial weights or as the
    teacher: one error naming the tensor, and no run folder left behind (the values are only
    seen while loading, after the run folder was made)."""
    model = Transformer(FLAVORS["debug"])
    model.init_weights(0)
    to_hf(model, tmp_path / "clean")
    to_hf(model, tmp_path / "poisoned")
    weights = load_file(tmp_path / "poisoned" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, tmp_path / "poisoned" / "model.safetensors", metadata={"format": "pt"})
    initial = tmp_path / ("poisoned" if role == "initial" else "clean")
    extra = [] if role == "initial" else ["--qat.loss=kl", f"--qat.teacher_path={tmp_path / 'poisoned'}"]
    dump = tmp_path / "run"
    r = train(
        dump,
        *FAST,
        "--training.steps=1",
        "--checkpoint.initial_load_in_hf=true",
        f"--checkpoint.initial_load_path={initial}",
        *extra,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.layers.1.mlp.up_proj.weight holds NaN or Inf" in r.stderr and "Traceback" not in r.stderr
    assert not dump.exists()
    # the converter names the tensor as the folder holds it too
    with pytest.raises(ConvertError, match=r"tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf"):
        convert_checkpoint(tmp_path / "poisoned", tmp_path / "out", Options(calibration_batches=0))
