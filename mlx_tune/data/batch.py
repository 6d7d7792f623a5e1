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
    the per-token log-probabilities by ``mask[:, 1:]``; the objective turns each row's
    sums into a loss sum, divided by the count of the whole optimizer step.

    A paired batch (``paired``: two rows per example) holds 2n rows, each prompt +
    completion with the mask on the completion only: for dpo, orpo and simpo the n chosen
    completions, then their n rejected ones in the same order; for kto (``labels`` set)
    the n examples, then their n KL rows (each prompt with another example's completion,
    fixed by data/unpaired.py), and ``labels[i]`` 1.0 when example i is desirable, 0.0
    when not. Splitting and sharding keep each example with its second row and its label.
    """

    tokens: np.ndarray  # int32 [B, T]
    mask: np.ndarray  # float32 [B, T], 0/1
    # Packed rows only: int32 [B, T], the example each token belongs to (1, 2, ...; 0 =
    # padding). Attention never crosses segments (see data/packing.py).
    segments: Optional[np.ndarray] = None
    paired: bool = False
    # The precomputed reference policy's log-prob sum of each row (float32 [B]).
    ref_logps: Optional[np.ndarray] = None
    # KTO only: float32 [n], one per example (not per row).
    labels: Optional[np.ndarray] = None

    @property
    def n_targets(self) -> int:
        return int(self.mask[:, 1:].sum())

    @property
    def size(self) -> int:
        """Examples (pairs, for a paired batch)."""
        rows = int(self.tokens.shape[0])
        return rows // 2 if self.paired else rows

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a backend's step reads, by name (only those the batch has)."""
        out = {"tokens": self.tokens, "mask": self.mask}
        if self.segments is not None:
            out["segments"] = self.segments
        if self.ref_logps is not None:
            out["ref_logps"] = self.ref_logps
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    def rows(self, picks: list[np.ndarray]) -> "Batch":
        """The batch of the examples at ``picks`` (indices into examples; in a paired
        batch each brings both its rows, and its label)."""
        examples = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        idx = np.concatenate([examples, examples + self.size]) if self.paired else examples
        take = (lambda a: None if a is None else a[idx])
        return Batch(self.tokens[idx], self.mask[idx], take(self.segments), self.paired,
                     take(self.ref_logps),
                     None if self.labels is None else self.labels[examples])

    def split(self, parts: int) -> list["Batch"]:
        """Equal micro-batches along the batch axis (gradient accumulation, sharding)."""
        if self.size % parts:
            raise ValueError(f"batch of {self.size} cannot be split into {parts} equal parts")
        n = self.size // parts
        return [self.rows([np.arange(i * n, (i + 1) * n)]) for i in range(parts)]


def shard_rows(batch: Batch, rank: int, world: int) -> Batch | None:
    """Rank ``rank``'s rows of ``batch`` out of ``world`` near-equal slices (None when it
    gets no row): data-parallel validation, whose sums the backend adds up across ranks."""
    if world <= 1:
        return batch
    mine = np.array_split(np.arange(batch.size), world)[rank]
    if not len(mine):
        return None
    return batch.rows([mine])
