"""Fine-tuning starts: from a Hugging Face directory and from a DCP step folder; wandb offline."""

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
