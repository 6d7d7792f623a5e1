"""Packing: several tokenized examples per fixed-length row, one compiled shape.

Rows are filled best-fit (each example goes to the open row it leaves least room in)
over a shuffle buffer, longest first within it, so rows are nearly full. Each token
carries its example's segment id (1, 2, ...; 0 = padding): the backends attend only
within a segment (a block-diagonal causal mask), so a packed row computes exactly the
per-token losses of its examples run one by one. Every choice comes from a seeded
generator: a plan is a pure function of (seed, epoch), which makes resume exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlx_tune.data.batch import Batch

PACK_BUFFER = 1024  # examples considered together by best fit


def example_limit(spec) -> tuple[int, str]:
    """(the most tokens one example keeps, the setting that says so). Packed, an example
    cannot outgrow its row: cutting it at tokenization, not when rows are filled, drops one
    whose prompt fills the row (it would train on nothing) and counts it in the warning."""
    if spec.packing and spec.pack_length and spec.pack_length < spec.max_length:
        return spec.pack_length, "pack_length"
    return spec.max_length, "max_length"


def best_fit(lengths: Sequence[int], order: Sequence[int], pack_length: int,
             buffer: int = PACK_BUFFER) -> list[list[int]]:
    """Rows of example indices (taken in ``order``), each summing to <= pack_length
    (an example longer than a row is truncated to fill one)."""
    rows: list[list[int]] = []
    order = list(order)
    for start in range(0, len(order), buffer):
        chunk = sorted(order[start:start + buffer], key=lambda i: -min(lengths[i], pack_length))
        room: list[int] = []
        chunk_rows: list[list[int]] = []
        for i in chunk:
            n = min(lengths[i], pack_length)
            fits = [r for r in range(len(room)) if room[r] >= n]
            if fits:
                r = min(fits, key=lambda r: room[r])
                chunk_rows[r].append(i)
                room[r] -= n
            else:
                chunk_rows.append([i])
                room.append(pack_length - n)
        rows.extend(chunk_rows)
    return rows


def pack_rows(rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_id: int,
              pack_length: int, size: int | None = None) -> Batch:
    """(ids, mask) examples per row -> a Batch of [rows, pack_length] with segment ids.

    Each example's own mask has 0 at its first token, so no target is ever predicted
    across an example boundary. ``size`` adds all-padding rows (mask 0)."""
    n_rows = max(len(rows), size or 0)
    tokens = np.full((n_rows, pack_length), pad_id, dtype=np.int32)
    mask = np.zeros((n_rows, pack_length), dtype=np.float32)
    segments = np.zeros((n_rows, pack_length), dtype=np.int32)
    for r, examples in enumerate(rows):
        t = 0
        for k, (ids, m) in enumerate(examples):
            n = min(len(ids), pack_length - t)
            if n <= 0:
                break
            tokens[r, t:t + n] = ids[:n]
            mask[r, t:t + n] = m[:n]
            mask[r, t] = 0.0  # never a target from the previous example's context
            segments[r, t:t + n] = k + 1
            t += n
    return Batch(tokens, mask, segments)


def batches_of(rows: list[list[int]], batch_size: int, rng: np.random.Generator | None
               ) -> list[list[list[int]]]:
    """Rows grouped into batches: shuffled and the incomplete last batch dropped with an
    rng (training); in order and kept without one (evaluation)."""
    if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
        rows = rows[:len(rows) - len(rows) % batch_size]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def segment_positions(segments: np.ndarray) -> np.ndarray:
    """Position of each token within its segment (0 at each example's first token)."""
    T = segments.shape[1]
    idx = np.broadcast_to(np.arange(T), segments.shape)
    starts = np.concatenate([np.ones((segments.shape[0], 1), bool),
                             segments[:, 1:] != segments[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - first).astype(np.int64)
