"""The precomputed reference policy's table: row key -> log-prob sum, one file per run.

A row's key hashes its tokens and mask up to and including its last target position.
Causal log-probabilities of those targets cannot depend on anything after it, so the
padding and the batch's width do not change the key, while any changed prompt or target
token does. Keys make the table independent of batch plans, resume positions and
layouts: whatever batch a row reaches the step in, its value is found by lookup.

The file (``reference_logps.safetensors`` in the run directory) holds ``keys`` (uint8
[N, 16]) and ``values`` (float32 [N]) with JSON metadata saying what they were computed
from (data content hashes, model, init_adapter, max_length, objective). It is written
atomically once, before step 0; every checkpoint pins its sha256 (training/reference.py),
so a resume uses exactly the values the run started with or stops with one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mlx_tune.checkpoint.format import CheckpointError, describe_error, sha256_file
from mlx_tune.data.batch import Batch
from mlx_tune.files import atomic_write

TABLE_NAME = "reference_logps.safetensors"
METADATA_KEY = "mlx_tune_reference"
KEY_BYTES = 16


class ReferenceError(CheckpointError):
    """The stored reference log-probs cannot serve this run (one line, says what to do)."""


class MissingRow(RuntimeError):
    """A row that reached a step or an evaluation was never scored: a bug in training
    (what was scored before step 0), or an evaluation of data the run never saw."""


def row_keys(batch: Batch) -> list[bytes | None]:
    """Each row's key: blake2b of its tokens (int32) and mask (0/1) through its last
    target position; None for a row with no target (padding), whose sum is 0."""
    keys: list[bytes | None] = []
    for tokens, mask in zip(batch.tokens, batch.mask):
        targets = np.flatnonzero(mask)
        if not len(targets):
            keys.append(None)
            continue
        end = int(targets[-1]) + 1
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(np.ascontiguousarray(tokens[:end], dtype=np.int32).tobytes())
        h.update((np.asarray(mask[:end]) > 0).astype(np.uint8).tobytes())
        keys.append(h.digest())
    return keys


@dataclass
class ReferenceTable:
    """Row key -> the reference policy's log-prob sum of that row, and what it was
    computed from (``meta``)."""

    values: dict[bytes, float]
    meta: dict

    def add(self, batch: Batch, logps: np.ndarray) -> None:
        for key, value in zip(row_keys(batch), np.asarray(logps, dtype=np.float32)):
            if key is not None:
                self.values[key] = float(value)

    def lookup(self, batch: Batch) -> np.ndarray:
        """The batch's rows' reference sums (float32 [rows]); a row the table lacks is a
        bug in what was scored before step 0, not a user error."""
        out = np.zeros(len(batch.tokens), np.float32)
        for i, key in enumerate(row_keys(batch)):
            if key is None:
                continue
            try:
                out[i] = self.values[key]
            except KeyError:
                raise MissingRow(
                    f"internal error: row {i} of a batch ({batch.tokens.shape[1]} tokens "
                    f"wide) is not in the precomputed reference table ({len(self.values)} "
                    "rows scored before step 0)") from None
        return out

    def attach(self, batch: Batch) -> Batch:
        """``batch`` carrying its rows' reference log-probs (``Batch.ref_logps``)."""
        return replace(batch, ref_logps=self.lookup(batch))

    def arrays(self) -> dict[str, np.ndarray]:
        keys = sorted(self.values)
        return {"keys": np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES),
                "values": np.array([self.values[k] for k in keys], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict) -> "ReferenceTable":
        keys, values = np.asarray(arrays["keys"], np.uint8), np.asarray(arrays["values"])
        if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or values.shape != (keys.shape[0],):
            raise ValueError(f"keys {keys.shape} and values {values.shape} do not pair up")
        return cls({bytes(k): float(v) for k, v in zip(keys, values.astype(np.float32))}, meta)


def save_table(table: ReferenceTable, path: Path) -> str:
    """Write the table atomically; returns the file's sha256 (what checkpoints pin)."""
    from safetensors.numpy import save
    data = save(table.arrays(), metadata={METADATA_KEY: json.dumps(table.meta, sort_keys=True)})
    atomic_write(path, data)
    return sha256_file(path)


def load_table(path: Path, sha256: str | None = None) -> ReferenceTable:
    """The table in ``path``; with ``sha256``, only if the file is exactly the one pinned.
    Any failure is one ReferenceError line naming the file."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    path = Path(path)
    never = ("the reference log-probs cannot be recomputed now that the model has trained: "
             "restore the file, or start over with --force-fresh")
    if not path.is_file():
        raise ReferenceError(f"{path}: missing; {never}")
    try:
        if sha256 is not None and sha256_file(path) != sha256:
            raise ReferenceError(f"{path}: its sha256 is not the one the checkpoint pinned "
                                 f"(changed or corrupted); {never}")
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})[METADATA_KEY])
        return ReferenceTable.from_arrays(load_file(str(path)), meta)
    except ReferenceError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one line
        raise ReferenceError(f"{path}: unreadable ({describe_error(e)}); {never}") from None


def compare_meta(stored: dict, current: dict) -> list[str]:
    """``"name: stored X, now Y"`` for each field that differs."""
    names = sorted(set(stored) | set(current))
    return [f"{n}: stored {json.dumps(stored.get(n))}, now {json.dumps(current.get(n))}"
            for n in names if stored.get(n) != current.get(n)]
