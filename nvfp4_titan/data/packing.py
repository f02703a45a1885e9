"""Batches of packed sequences, and chat-type examples packed whole into windows.

A ``Batch`` is what the model trains on: inputs, labels (``IGNORE`` where the loss does not count)
and, for packed examples, each token's segment (its example within the row), from which the
model restarts positions and masks attention (``Transformer.forward``).

``ExampleWindows`` packs the examples of a chat-type token file (``nvfp4_titan.data.tokens``)
into windows of ``seq_len + 1`` tokens, the way torchtune's ``PackedDataset`` and axolotl's
``sample_packing`` do: examples in a seeded order, each placed whole in the current window while
it fits, else a new window is opened; the rest of a window is padding (its own segment, never
counted). An example longer than a window is dropped (the default: a cut conversation may lose
its whole answer) or truncated to the window (``long_examples``); both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from nvfp4_titan.data.tokens import TokenFile

IGNORE = -100  # the label of a position the loss skips: torch's cross_entropy ignore_index, as HF's labels
LongExamples = Literal["drop", "truncate"]


@dataclass
class Batch:
    """``inputs`` [B, S] int64 token ids; ``labels`` [B, S] int64, the next token or ``IGNORE``;
    ``segments`` [B, S] int64 (packed examples: each token's example within its row, equal ids
    contiguous) or None (each row one causal sequence)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor | None = None

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> Batch:
        """Rows of ``seq_len + 1`` tokens, every next token counted (plain text)."""
        return cls(windows[:, :-1], windows[:, 1:])

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of ``rows`` rows."""
        parts = [t.split(rows) if t is not None else None for t in (self.inputs, self.labels, self.segments)]
        segs = parts[2] or [None] * len(parts[0])
        return [Batch(x, y, s) for x, y, s in zip(parts[0], parts[1], segs)]

    def to(self, device: torch.device | str) -> Batch:
        seg = self.segments.to(device) if self.segments is not None else None
        return Batch(self.inputs.to(device), self.labels.to(device), seg)

    def counted(self) -> int:
        """Labels the loss counts."""
        return int((self.labels != IGNORE).sum())


class ExampleWindows:
    """The examples ``doc_ids`` of a chat-type ``TokenFile``, packed (module docstring) into
    windows of ``seq_len + 1`` tokens; ``batch(idx)`` reads windows ``idx`` from the memory map.

    ``seed`` orders the examples before packing (the loader then shuffles windows per epoch);
    ``train_on_prompt`` counts every token of an example, not only its assistant turns (axolotl's
    ``train_on_inputs``); a label is never counted across an example boundary or in padding.

    Raises ValueError for ``long_examples`` other than drop / truncate.
    """

    def __init__(
        self,
        tf: TokenFile,
        doc_ids: np.ndarray,
        seq_len: int,
        vocab_size: int,
        seed: int = 0,
        train_on_prompt: bool = False,
        long_examples: LongExamples = "drop",
    ) -> None:
        if long_examples not in ("drop", "truncate"):
            raise ValueError(f"long_examples={long_examples!r}: use drop or truncate")
        self.tf, self.width, self.vocab_size = tf, seq_len + 1, vocab_size
        self.train_on_prompt = train_on_prompt
        self.pad_id = int(tf.manifest["eos_id"])  # any id: padding is never counted nor attended to
        order = np.asarray(doc_ids, dtype=np.int64)
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).numpy()]
        lengths = (tf.offsets[order + 1] - tf.offsets[order]).tolist()
        self.dropped = self.truncated = 0
        docs, used, bounds, fill = [], [], [0], 0
        for d, n in zip(order.tolist(), lengths):
            if n > self.width:
                if long_examples == "drop":
                    self.dropped += 1
                    continue
                n, self.truncated = self.width, self.truncated + 1
            if fill + n > self.width:
                bounds.append(len(docs))
                fill = 0
            docs.append(d)
            used.append(n)
            fill += n
        if docs:
            bounds.append(len(docs))
        self.docs, self.used = np.asarray(docs, np.int64), np.asarray(used, np.int64)
        self.bounds = np.asarray(bounds, np.int64)  # window w holds examples bounds[w]:bounds[w + 1]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_examples(self) -> int:
        return len(self.docs)

    def fill(self) -> float:
        """Share of window tokens that are examples (the rest is padding)."""
        return float(self.used.sum()) / max(1, len(self) * self.width)

    def _windows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int64, counted uint8, segments int64), each [len(idx), width]."""
        tokens = np.full((len(idx), self.width), self.pad_id, dtype=np.int64)
        counted = np.zeros((len(idx), self.width), dtype=np.uint8)
        segments = np.empty((len(idx), self.width), dtype=np.int64)
        for row, w in enumerate(idx):
            at = 0
            for k, e in enumerate(range(self.bounds[w], self.bounds[w + 1])):
                start, n = self.tf.offsets[self.docs[e]], self.used[e]
                tokens[row, at : at + n] = self.tf.tokens[start : start + n]
                counted[row, at : at + n] = 1 if self.train_on_prompt else self.tf.mask[start : start + n]
                counted[row, at] = 0  # an example's first token is never predicted from the one before it
                segments[row, at : at + n] = k
                at += n
            segments[row, at:] = self.bounds[w + 1] - self.bounds[w]  # padding: a segment of its own
        return tokens, counted, segments

    def batch(self, idx: torch.Tensor | np.ndarray | list[int]) -> Batch:
        """Windows ``idx`` as a ``Batch``: inputs and segments of positions 0..seq_len-1, labels of
        positions 1..seq_len (``IGNORE`` where not counted)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range [0, {len(self)})")
        tokens, counted, segments = self._windows(idx)
        if tokens.size and int(tokens.max()) >= self.vocab_size:  # bytes changed on disk since the build
            from nvfp4_titan.data.dataset import DataError

            raise DataError(
                f"the token cache {self.tf.folder} holds ids outside the tokenizer's {self.vocab_size} tokens: "
                "it is damaged; delete it and it is rebuilt"
            )
        t = torch.from_numpy(tokens)
        labels = torch.where(torch.from_numpy(counted[:, 1:]).bool(), t[:, 1:], IGNORE)
        return Batch(t[:, :-1], labels, torch.from_numpy(segments[:, :-1]))

    def counted(self, idx: torch.Tensor | np.ndarray | list[int]) -> int:
        """Labels the loss counts in windows ``idx`` (the global batch's, for the token mean)."""
        return self.batch(idx).counted()
