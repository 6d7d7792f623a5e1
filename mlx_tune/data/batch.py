"""The unit of data every backend consumes: numpy arrays, nothing framework-specific."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Padded token ids and the mask of positions that count in the loss.

    ``tokens[i, t]`` is token t of sequence i (right-padded with the pad id).
    ``mask[i, t]`` is 1 where token t is a training target, i.e. the loss includes
    predicting ``tokens[i, t]`` from ``tokens[i, :t]``. Position 0 is never a target.
    Backends compute ``inputs = tokens[:, :-1]``, ``targets = tokens[:, 1:]`` and weight
    the per-token loss by ``mask[:, 1:]``; the loss is summed and divided by the number
    of target tokens of the whole optimizer step (token-weighted).
    """

    tokens: np.ndarray  # int32 [B, T]
    mask: np.ndarray  # float32 [B, T], 0/1
    # Packed rows only: int32 [B, T], the example each token belongs to (1, 2, ...; 0 =
    # padding). Attention never crosses segments (see data/packing.py).
    segments: Optional[np.ndarray] = None

    @property
    def n_targets(self) -> int:
        return int(self.mask[:, 1:].sum())

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def split(self, parts: int) -> list["Batch"]:
        """Equal micro-batches along the batch axis (gradient accumulation, sharding)."""
        if self.size % parts:
            raise ValueError(f"batch of {self.size} cannot be split into {parts} equal parts")
        n = self.size // parts
        seg = self.segments
        return [Batch(self.tokens[i * n:(i + 1) * n], self.mask[i * n:(i + 1) * n],
                      None if seg is None else seg[i * n:(i + 1) * n])
                for i in range(parts)]


def shard_rows(batch: Batch, rank: int, world: int) -> Batch | None:
    """Rank ``rank``'s rows of ``batch`` out of ``world`` near-equal slices (None when it
    gets no row): data-parallel validation, whose sums the backend adds up across ranks."""
    if world <= 1:
        return batch
    tokens = np.array_split(batch.tokens, world)[rank]
    if not len(tokens):
        return None
    seg = None if batch.segments is None else np.array_split(batch.segments, world)[rank]
    return Batch(tokens, np.array_split(batch.mask, world)[rank], seg)
