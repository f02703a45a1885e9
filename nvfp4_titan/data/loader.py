"""Global batches that depend on the seed only, sliced per data-parallel rank; resumable.

Global batch b takes ``global_batch`` windows from a per-epoch seeded permutation; rank r
of D takes its contiguous 1/D of them, split into micro-batches for gradient accumulation.
The whole state is the number of global batches consumed.
"""

from __future__ import annotations

from typing import Any

import torch

from nvfp4_titan.data.packing import Batch


class GlobalBatchLoader:
    def __init__(
        self,
        windows: torch.Tensor,
        global_batch: int,
        local_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        per_rank, rem = divmod(global_batch, dp_size)
        if rem or per_rank % local_batch:
            raise ValueError(
                f"global batch {global_batch} is not a multiple of local batch {local_batch} x "
                f"data-parallel degree {dp_size}"
            )
        if len(windows) < global_batch:
            raise ValueError(
                f"the corpus packs into {len(windows)} windows, fewer than one global batch "
                f"({global_batch}); use more data, a shorter seq_len or a smaller batch"
            )
        self.windows = windows
        self.global_batch, self.local_batch = global_batch, local_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = len(windows) // global_batch
        self.consumed = 0

    def _global_indices(self, b: int) -> torch.Tensor:
        epoch, i = divmod(b, self.batches_per_epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.windows), generator=g)
        else:
            order = torch.arange(len(self.windows))
        return order[i * self.global_batch : (i + 1) * self.global_batch]

    def _read(self, idx: torch.Tensor) -> Batch:
        if isinstance(self.windows, torch.Tensor):  # windows packed in memory (build_windows)
            return Batch.from_windows(self.windows[idx])
        return self.windows.batch(idx)

    def batch(self, b: int) -> list[Batch]:
        """This rank's micro-batches (each ``local_batch`` rows) of global batch b."""
        per_rank = self.global_batch // self.dp_size
        idx = self._global_indices(b)[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return self._read(idx).split(self.local_batch)

    def counted(self, b: int) -> int:
        """Labels the loss counts in the whole global batch b (every rank's): the token mean's
        denominator, the same on every rank without communication."""
        idx = self._global_indices(b)
        if isinstance(self.windows, torch.Tensor):
            return len(idx) * (self.windows.shape[1] - 1)
        return self.windows.counted(idx)

    def next(self) -> list[Batch]:
        out = self.batch(self.consumed)
        self.consumed += 1
        return out

    @property
    def epoch(self) -> float:
        return self.consumed / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["global_batch"] != self.global_batch:
            raise ValueError(
                f"data-loader state was saved with seed {state['seed']} and global batch "
                f"{state['global_batch']}; this run has {self.seed} and {self.global_batch}"
            )
        self.consumed = int(state["consumed"])
