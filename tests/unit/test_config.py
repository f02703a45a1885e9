"""Recipe parsing: defaults, TOML, overrides, and clear errors for bad input."""

from pathlib import Path

import pytest

from nvfp4_titan.training.config import Config, ConfigError, help_text, load_config, to_toml

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.job.dump_folder and cfg.training.steps > 0


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "debug_cpu.toml",
        "llama3_1b_qat.toml",
        "llama3_3b_qat.toml",
        "llama3_8b_qat.toml",
        "smollm2_135m_qad_chat.toml",
    } <= names


def test_overrides_beat_recipe_and_defaults(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('[training]\nsteps = 7\nseq_len = 64\n[qat]\nexclude = ["output", "layers.0.*"]\n')
    cfg = load_config(r, ["--training.steps=9", "--optimizer.lr", "2e-4", "--qat.activation_scale=static"])
    assert cfg.training.steps == 9 and cfg.training.seq_len == 64
    assert cfg.optimizer.lr == 2e-4 and cfg.qat.activation_scale == "static"
    assert cfg.qat.exclude == ["output", "layers.0.*"]
    assert cfg.training.local_batch_size == Config().training.local_batch_size


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["--training.steps=30", '--job.description=a "quoted" run'])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg


def test_malformed_toml_names_line_and_column(tmp_path):
    r = tmp_path / "bad.toml"
    r.write_text("[training]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: malformed TOML.*line 2, column"):
        load_config(r)


def test_unknown_key_suggests_closest(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text("[training]\nstep = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key training.step; did you mean 'steps'"):
        load_config(r)
    with pytest.raises(ConfigError, match=r"unknown section \[trainig\]; did you mean 'training'"):
        load_config(None, ["--trainig.steps=3"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("--training.steps=ten", "training.steps must be int"),
        ("--training.compile=1", "training.compile must be true or false"),
        ("--qat.activation_scale=dynamc", r"not one of \['dynamic', 'static', 'none'\]; did you mean 'dynamic'"),
        ("--qat.include=layers", "qat.include must be a list of strings"),
        ("--training.steps=0", "training.steps must be > 0"),
        ("--training.gc_freq=-1", "training.gc_freq must be >= 0"),
        ("--lr_scheduler.warmup_steps=100", r"warmup_steps must be in \[0, training.steps=60\]"),
        ("--checkpoint.initial_load_in_hf=true", "needs checkpoint.initial_load_path"),
        ("--model.flavor=hf", "model.flavor='hf' takes the model's shape from a Hugging Face checkpoint"),
        ("--model.flavor=2B", r"model.flavor='2B': choose one of .*or 'hf'"),
        ("--qat.loss=kd", r"qat.loss='kd' is not one of \['ce', 'kl', 'mix'\]"),
        ("--qat.kl_weight=1.5", r"qat.kl_weight must be in \[0, 1\]"),
        ("--qat.temperature=0", "qat.temperature must be > 0"),
        ("--dataset.num_proc=-1", r"dataset.num_proc must be >= 0 \(0: every core"),
    ],
)
def test_bad_values_rejected_naming_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_an_override_without_a_value_is_refused_not_fed_the_next_option():
    """``--training.steps --training.seq_len=64`` took the next option as the value, and a later
    ``--training.steps=2`` then replaced it: the seq_len override was dropped without a word."""
    for argv in (["--training.steps", "--training.seq_len=64", "--training.steps=2"], ["--training.steps"]):
        with pytest.raises(ConfigError, match=r"--training.steps needs a value: --training.steps=VALUE"):
            load_config(None, argv)
    assert load_config(None, ["--training.steps", "7", "--training.seq_len", "64"]).training.steps == 7


def test_help_lists_every_key_with_its_doc():
    text = help_text()
    for section in ("job", "training", "qat", "checkpoint", "metrics"):
        assert f"[{section}]" in text
    assert "global_batch_size = -1" in text and "gradient accumulation" in text
    assert 'activation_scale = "dynamic"' in text


def test_nvfp4_all_gather_needs_qat_from_the_start():
    with pytest.raises(ConfigError, match="fsdp_nvfp4_all_gather needs qat.enable = true and qat.start_step = 0"):
        load_config(None, ["--qat.fsdp_nvfp4_all_gather=true", "--qat.start_step=5"])


def test_scheduled_gc_collects_every_freq_ticks_and_restores_automatic():
    """Inside: automatic collection off, a generation-1 collection at every freq-th tick;
    after: automatic again. freq 0 leaves collection automatic."""
    import gc

    from nvfp4_titan.training.runtime import ScheduledGC

    starts = []
    callback = lambda phase, info: starts.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        with ScheduledGC(2) as collector:
            assert not gc.isenabled()
            starts.clear()
            for _ in range(5):
                collector.tick()
            assert starts == [1, 1]
    finally:
        gc.callbacks.remove(callback)
    assert gc.isenabled()
    with ScheduledGC(0):
        assert gc.isenabled()


def test_recipe_with_a_byte_order_mark_loads(tmp_path):
    """Windows editors save UTF-8 with a BOM; tomllib alone calls it an invalid statement."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 7\n")
    assert load_config(path).training.steps == 7
