"""Every random choice of the data layer, derived from (seed, purpose, epoch, ...).

No global RNG state: a choice is a pure function of the spec seed and where it is made,
so a resumed run re-derives exactly the choices an uninterrupted run made. Per-record
choices use a hash (cheap, independent of how many records came before, identical in
streaming and in-memory modes); per-epoch orders use a numpy Generator.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

# Purposes, so that two choices with the same (seed, epoch) are independent.
EPOCH_ORDER = 1
STREAM_SHUFFLE = 2
AUGMENT_APPLY = 3
AUGMENT_TEMPLATE = 4
VAL_SPLIT = 5
VALID_ORDER = 6
STREAM_WINDOW = 7


def rng(*parts: int) -> np.random.Generator:
    """A Generator seeded by a tuple of non-negative ints."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def unit(*parts: int) -> float:
    """A uniform float in [0, 1), a stable hash of the ints (same on every platform)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def held_out(seed: int, line: int, fraction: float | None) -> bool:
    """Whether train line ``line`` belongs to the val_split validation set."""
    return bool(fraction) and unit(seed, VAL_SPLIT, line) < fraction
