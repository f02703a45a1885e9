"""eval_ppl: strided windows score every token once (the end-to-end chain runs in
test_qat_experiment.py)."""

import importlib.util

import torch

from tests.integration.helpers import ROOT

spec = importlib.util.spec_from_file_location("eval_ppl", ROOT / "scripts" / "eval_ppl.py")
eval_ppl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_ppl)


def test_strided_windows_score_every_target_once():
    ids = torch.arange(100)
    seen = []
    for inp, tgt, first in eval_ppl.strided_windows(ids, seq_len=16, stride=6):
        assert torch.equal(inp + 1, tgt) and len(inp) <= 16
        seen += tgt[first:].tolist()
    assert seen == list(range(1, 100))
