"""train.py with NaN planted in one parameter's gradient, after backward and the gradient
reduction, on chosen steps and ranks: the fault a bad row or an overflow in backward leaves.

    PLANT_NAN_STEPS=3,4 PLANT_NAN_RANKS=1 python tests/integration/plant_nan.py --recipe ...

``PLANT_NAN_PARAM`` names the parameter (default layers.1.feed_forward.w2.weight); its first
local element becomes NaN on those ranks only, so the other ranks see finite local gradients.
``PLANT_NAN_INTO=weight`` plants it in the weight instead (after backward: the step's gradients
stay finite and the optimizer keeps the NaN), the fault that only the save-time check catches.
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import nvfp4_titan.training.trainer as trainer  # noqa: E402
from nvfp4.sharded import local  # noqa: E402

STEPS = {int(s) for s in os.environ["PLANT_NAN_STEPS"].split(",")}
RANKS = {int(r) for r in os.environ.get("PLANT_NAN_RANKS", "0").split(",")}
PARAM = os.environ.get("PLANT_NAN_PARAM", "layers.1.feed_forward.w2.weight")
INTO = os.environ.get("PLANT_NAN_INTO", "grad")
running: list = []
run, clip = trainer.Trainer.run, trainer.clip_grad_norm_


def run_and_remember(self):
    running.append(self)
    return run(self)


def clip_with_nan(params, max_norm):
    t = running[0]
    if t.step in STEPS and t.rank in RANKS:
        p = dict(t.model.named_parameters())[PARAM]
        local(p.grad if INTO == "grad" else p.detach()).view(-1)[0] = float("nan")
    return clip(params, max_norm)


trainer.Trainer.run, trainer.clip_grad_norm_ = run_and_remember, clip_with_nan
sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
