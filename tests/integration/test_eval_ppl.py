"""eval_ppl: strided windows score every token once (the end-to-end chain runs in
test_qat_experiment.py)."""

import pytest
import torch

from nvfp4_titan.evaluate import strided_windows
from scripts import eval_ppl


def test_strided_windows_score_every_target_once():
    ids = torch.arange(100)
    seen = []
    for inp, tgt, first in strided_windows(ids, seq_len=16, stride=6):
        assert torch.equal(inp + 1, tgt) and len(inp) <= 16
        seen += tgt[first:].tolist()
    assert seen == list(range(1, 100))


def test_held_out_of_scores_another_model_on_the_runs_split(tmp_path, capsys):
    """The converted checkpoint, which carries no recipe, scored on its run's validation split
    (--held-out-of) gives exactly the run's figure; without it, it asks for --data."""
    from nvfp4_titan.convert import Options, convert_checkpoint
    from tests.integration.helpers import FAST, train

    run = tmp_path / "run"
    assert train(run, *FAST, "--training.steps=2", "--checkpoint.interval=2").returncode == 0
    convert_checkpoint(run, tmp_path / "nvfp4", Options(calibration_batches=1))
    figures = []
    for argv in ([str(run)], [str(tmp_path / "nvfp4"), "--held-out-of", str(run)]):
        assert eval_ppl.main([*argv, "--seq-len=256", "--stride=256", "--batch-size=16"]) == 0
        figures.append(capsys.readouterr().out.split(":", 1)[1])
    assert figures[0] == figures[1] and "token_ppl" in figures[0]
    assert eval_ppl.main([str(tmp_path / "nvfp4")]) == 2
    assert "give --data" in capsys.readouterr().err
    assert eval_ppl.main([str(run), "--held-out-of", str(tmp_path / "nvfp4")]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert eval_ppl.main([str(run), "--seq-len=4096"]) == 2
    assert "exceeds the model's max_seq_len 2048" in capsys.readouterr().err
    for bad, said in (
        (["--stride=0"], "got --stride 0 and --seq-len 512"),
        (["--stride=600", "--seq-len=512"], "got --stride 600 and --seq-len 512"),
        (["--seq-len=1"], "need --seq-len >= 2 and --batch-size >= 1 (got 1 and 4)"),
    ):
        with pytest.raises(SystemExit):
            eval_ppl.main([str(run), *bad])
        assert said in capsys.readouterr().err
    assert eval_ppl.main([str(run), "--seq-len=64"]) == 0  # the stride follows: half of it
    assert "token_ppl" in capsys.readouterr().out
    (tmp_path / "other.jsonl").write_text('{"body": "text under another field"}\n')
    for bad, fix in (  # the loaders' hints name recipe keys; eval_ppl's fix is one of its flags
        ([f"--data={tmp_path / 'missing.jsonl'}"], "does not exist; pass --data PATH"),
        ([f"--data={tmp_path / 'other.jsonl'}"], "no field 'text'; its fields are ['body'] (pass --text-field NAME)"),
        ([f"--tokenizer={tmp_path / 'missing.json'}"], "does not exist; pass --tokenizer PATH"),
    ):
        assert eval_ppl.main([str(run), *bad]) == 2
        err = capsys.readouterr().err
        assert fix in err and "dataset." not in err and "model.tokenizer_path" not in err, err
