"""Length-bucketed batches and padding into ``Batch`` arrays.

Compiled steps keep one trace per input shape, so every batch is padded to one of the
run's few fixed widths (``widths.Widths``), and evaluation batches to a fixed number of
rows: a handful of shapes is cheap, a new shape every few steps is not.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mlx_tune.data.batch import Batch
from mlx_tune.data.widths import Widths

ALIGN = 32


def padded_length(longest: int, max_length: int) -> int:
    """T = min(max_length, longest rounded up to a multiple of ALIGN)."""
    return min(max_length, -(-longest // ALIGN) * ALIGN)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else EOS, else 0 (padding is masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):  # some configs list several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def pad_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
              max_length: int, widths: Widths | None = None, size: int | None = None) -> Batch:
    """Right-pad (ids, mask) rows into a Batch of T = the width that holds the longest row
    (``widths.fit``; without widths, padded_length). ``size`` pads the batch dimension with
    all-padding rows, whose mask is 0 everywhere, so they add nothing to any sum."""
    longest = max(len(ids) for ids, _ in rows)
    width = widths.fit(longest) if widths is not None else padded_length(longest, max_length)
    n_rows = max(len(rows), size or 0)
    tokens = np.full((n_rows, width), pad_id, dtype=np.int32)
    mask = np.zeros((n_rows, width), dtype=np.float32)
    for i, (ids, m) in enumerate(rows):
        n = min(len(ids), width)
        tokens[i, :n] = ids[:n]
        mask[i, :n] = m[:n]
    return Batch(tokens, mask)


def bucket(lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None,
           drop_last: bool = True) -> list[list[int]]:
    """Positions into ``lengths`` grouped into length-sorted batches.

    With an rng (training): a random ``len % batch_size`` records sit out this epoch (so
    dropping the incomplete batch never always drops the longest records), ties in length
    are broken randomly, and the batch order is shuffled. Without one (evaluation): a plain
    stable sort, the incomplete last batch kept unless ``drop_last``.
    """
    n = len(lengths)
    order = np.arange(n) if rng is None else rng.permutation(n)
    if drop_last and n % batch_size:
        order = order[n % batch_size:]
    lens = np.asarray(lengths, dtype=np.int64)[order]
    order = order[np.argsort(lens, kind="stable")]
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_pairs(pairs: Sequence, pad_id: int, max_length: int,
              widths: Optional[Widths] = None) -> Batch:
    """2n rows at one width: the chosen sides, then the rejected ones in the same order."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = pad_batch(rows, pad_id, max_length, widths)
    return Batch(b.tokens, b.mask, paired=True)


def pad_unpaired(examples: Sequence, pad_id: int, max_length: int,
                 widths: Optional[Widths] = None) -> Batch:
    """KTO's 2n rows at one width: the examples, then their KL rows in the same order
    (data/unpaired.py), and each example's label (1.0 desirable, 0.0 undesirable)."""
    rows = [ex.row for ex in examples] + [ex.kl_row for ex in examples]
    b = pad_batch(rows, pad_id, max_length, widths)
    labels = np.array([1.0 if ex.label else 0.0 for ex in examples], dtype=np.float32)
    return Batch(b.tokens, b.mask, paired=True, labels=labels)
