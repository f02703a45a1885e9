"""``nvfp4_titan.torchtitan_qat.launch`` (torchtitan's trainer), then, on every rank after training:
each QAT linear's weight amax is the unsharded weight's (with its fused peers'), and its per-shard
NVFP4 quantization (this rank's shard, global tensor scale) joined across the ranks equals the
quantization of the unsharded weight, computed here from the gathered weight (``nvfp4.quantize``).
Writes into the dump folder, for rank N: ``shard_check.rankN.txt`` (the number of linears checked, or
the first mismatch), ``batches.rankN.txt`` (a sha256 of each trained batch's tokens, one line per
step) and ``input_amax.rankN.pt`` (every QAT linear's input amax, by name)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard

import nvfp4
from nvfp4_titan.torchtitan_qat import launch
from tests.distributed.harness import cat_nvfp4, gather_nvfp4


def check(model: torch.nn.Module) -> str:
    """ "N" (linears checked) or the first linear whose amax or joined shard codes differ. Every rank
    runs every collective whatever it finds, so that a mismatch is reported rather than a hang."""
    problems = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nvfp4.NVFP4QATLinear)}
    for name, m in linears.items():
        w = m.weight
        q = m.quantized_weight()
        if isinstance(w, DTensor):
            sharded = [(p.dim, w.device_mesh.get_group(i)) for i, p in enumerate(w.placements) if isinstance(p, Shard)]
            for dim, group in sharded:  # one sharded mesh axis in these runs
                q = cat_nvfp4(gather_nvfp4(q, group), dim)
        full = [w.full_tensor() if isinstance(w, DTensor) else w] + [
            p.weight.full_tensor() if isinstance(p.weight, DTensor) else p.weight for p in m.amax_peers
        ]
        amax = torch.stack([f.detach().abs().max() for f in full]).max()
        if not torch.equal(m.weight_amax(), amax):  # pow2 tensor scales could hide a shard's own amax
            problems.append(f"{name}: weight amax {float(m.weight_amax())} is not the unsharded {float(amax)}")
        want = nvfp4.quantize(full[0].detach(), amax, m.config.tensor_scale)
        same = (
            torch.equal(q.packed, want.packed)
            and torch.equal(q.block_scale.view(torch.uint8), want.block_scale.view(torch.uint8))
            and torch.equal(q.tensor_scale, want.tensor_scale)
        )
        if not same:
            problems.append(f"{name}: joined shard codes differ from the unsharded weight's")
    return problems[0] if problems else str(len(linears))


def main() -> None:
    launch.patch_torchtitan()
    from torchtitan.trainer import Trainer

    train, step = Trainer.train, Trainer.forward_backward_step
    trained: list[str] = []

    def record_then_step(self, *, input_dict, labels, global_valid_tokens):
        trained.append(hashlib.sha256(input_dict["input"].cpu().numpy().tobytes()).hexdigest())
        return step(self, input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)

    def train_then_check(self):
        train(self)
        model = self.model_parts[0]
        dump, rank = Path(self.config.dump_folder), torch.distributed.get_rank()
        (dump / f"shard_check.rank{rank}.txt").write_text(check(model))
        (dump / f"batches.rank{rank}.txt").write_text("".join(f"{h}\n" for h in trained))
        amax = {
            re.sub(r"(_checkpoint_wrapped_module|_orig_mod)\.", "", n): m.input_amax.clone()  # the module's own name
            for n, m in model.named_modules()
            if isinstance(m, nvfp4.NVFP4QATLinear)
        }
        torch.save(amax, dump / f"input_amax.rank{rank}.pt")

    Trainer.train, Trainer.forward_backward_step = train_then_check, record_then_step
    from torchtitan.train import main as titan_main

    titan_main()


if __name__ == "__main__":
    main()
