"""``preference.reference: precomputed``: the reference policy scored once, before step 0.

Full fine-tuning has no adapter to switch off, and a run from ``init_adapter`` must
compare with that adapter's policy, not the base model's. So before step 0 the model,
exactly as loaded, scores every row the run can meet (every training example, the
validation set, the test file) with ``Backend.score_rows``, in the run's own widths and
micro-batch sizes, batch by batch. The sums go into a table keyed by row content
(checkpoint/reference.py), written once to the run directory; every batch that reaches a
step or an evaluation gets its rows' values by lookup (``attach``), in the main thread.

Resume: the table is loaded, never recomputed (the model has trained: it is no longer
the reference). Every checkpoint pins the file's sha256; a missing, changed or corrupted
file, or data whose content hash differs from the stored one, stops the run with one line.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mlx_tune.backends.base import Backend
from mlx_tune.checkpoint.reference import (TABLE_NAME, ReferenceError, ReferenceTable,
                                           compare_meta, load_table, save_table)
from mlx_tune.config.schema import Spec
from mlx_tune.config.spec import reference_mode
from mlx_tune.data import DataBundle, load_eval_file
from mlx_tune.data.batch import Batch
from mlx_tune.data.hf import find_data
from mlx_tune.data.records import content_hash
from mlx_tune.objectives import get_objective

PIN_KEY = "reference"  # checkpoint meta: {"file": ..., "sha256": ...}


def uses_precomputed(spec: Spec) -> bool:
    return reference_mode(spec) == "precomputed"


def directory_hash(directory: str | Path) -> str:
    """blake2b over a directory's regular files (names and bytes, sorted by name)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        h.update(f"{path.name}\0".encode())
        h.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def table_meta(spec: Spec) -> dict:
    """What the stored values were computed from; a resume compares it field by field."""
    files = find_data(spec)
    return {
        "data": {name: None if path is None else content_hash(path)
                 for name, path in (("train", files.train), ("valid", files.valid),
                                    ("test", files.test))},
        "model": spec.model, "backend": spec.backend, "dtype": spec.dtype,
        "quantize": spec.quantize, "fine_tune_type": spec.fine_tune_type,
        "init_adapter": directory_hash(spec.init_adapter) if spec.init_adapter else None,
        "max_length": spec.max_length, "mask_prompt": spec.mask_prompt,
        "objective": spec.objective,
        "rows_per_example": get_objective(spec.objective).rows_per_example,
        "seed": spec.seed, "val_split": spec.val_split,
    }


@dataclass
class PinnedReference:
    """The run's table and the sha256 of its file, which every checkpoint records."""

    table: ReferenceTable
    sha256: str
    path: Path

    def pin(self) -> dict:
        return {PIN_KEY: {"file": self.path.name, "sha256": self.sha256}}


# -- resume: load, never recompute ----------------------------------------------------
def resumed_reference(output_dir: Path, checkpoint: Any, spec: Spec) -> PinnedReference:
    """The table a checkpoint pinned, checked against the data and setup of this run."""
    path = Path(output_dir) / TABLE_NAME
    pin = checkpoint.meta.get(PIN_KEY)
    if not isinstance(pin, dict) or not isinstance(pin.get("sha256"), str):
        raise ReferenceError(
            f"{checkpoint.path}: written without a precomputed reference, and the trained "
            "model there can no longer be one; resume with the preference.reference it "
            "was trained with, or start over with --force-fresh")
    table = load_table(path, pin["sha256"])
    changed = compare_meta(table.meta, table_meta(spec))
    if changed:
        what = "the data changed" if any(c.startswith("data:") for c in changed) \
            else "the setup changed"
        raise ReferenceError(
            f"{path}: {what} since these reference log-probs were computed "
            f"({'; '.join(changed)}); a trained model cannot recompute them: restore the "
            "data and settings, or start over with --force-fresh")
    return PinnedReference(table, pin["sha256"], path)


# -- a fresh start: score every row once -----------------------------------------------
def train_batches(data: DataBundle, batch_size: int) -> Iterator[Batch]:
    """Every training example once, length-sorted into batches of ``batch_size`` (the
    last filled up with repeats of its own examples: no new shape), assembled as the
    run assembles them, so a batch's rows are the rows a step meets."""
    source = data.train.source
    examples = getattr(source, "examples", None)
    if examples is None:
        raise ReferenceError("preference.reference: precomputed needs the training data in "
                             "memory; turn streaming off")
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        group += [group[i % len(group)] for i in range(batch_size - len(group))]
        yield source.s.assemble([examples[i] for i in group], 0)


def compute_reference(backend: Backend, spec: Spec, data: DataBundle, accumulation: int,
                      log: Callable[[str], None] = print) -> ReferenceTable:
    """Score every row of the train, validation and test data with the model as it is.
    In the training micro-batch shapes; one micro-batch's activations at a time."""
    table = ReferenceTable({}, table_meta(spec))
    test = None
    files = find_data(spec)
    if files.test is not None:
        test = load_eval_file(files.test, spec, backend.tokenizer, log=log, widths=data.widths)
    valid = data.valid.batches() if data.valid is not None else []
    sets = [("train", list(train_batches(data, spec.batch_size))), ("valid", valid),
            ("test", test or [])]
    total = sum(len(batches) for _, batches in sets)
    tic, done, shown = time.perf_counter(), 0, 0.0
    log(f"reference: scoring {total} batches (train, validation, test) with the model as "
        "loaded, the precomputed reference policy")
    for _, batches in sets:
        for batch in batches:
            parts = batch.split(accumulation) if batch.size % accumulation == 0 else [batch]
            for part in parts:
                table.add(part, backend.score_rows(part))
            done += 1
            if done / total >= shown + 0.25 and done < total:
                shown = done / total
                log(f"reference: {done}/{total} batches, {time.perf_counter() - tic:.0f} s")
    counts = ", ".join(f"{name} {len(batches)} batches" for name, batches in sets)
    log(f"reference: {len(table.values)} distinct rows scored in "
        f"{time.perf_counter() - tic:.1f} s ({counts})")
    return table


def prepare_reference(backend: Backend, spec: Spec, data: DataBundle, accumulation: int,
                      output_dir: Path, resumed: PinnedReference | None, resuming: bool,
                      is_main: bool, log: Callable[[str], None] = print) -> PinnedReference:
    """The run's table: when ``resuming``, the one rank 0 loaded (``resumed``); else one
    computed now on every rank, which rank 0 writes. With several ranks, rank 0's values
    then go to every rank, so all of them use the same ones."""
    path = Path(output_dir) / TABLE_NAME
    if resuming:
        pinned = resumed or PinnedReference(ReferenceTable({}, {}), "", path)  # rank > 0
        if resumed is not None:
            log(f"reference: {len(resumed.table.values)} precomputed rows from {path} "
                f"(sha256 {resumed.sha256[:12]}, pinned by the checkpoint)")
    else:
        table = compute_reference(backend, spec, data, accumulation, log)
        sha = save_table(table, path) if is_main else ""
        if is_main:
            log(f"reference: written to {path}")
        pinned = PinnedReference(table, sha, path)
    if backend.world_size > 1:
        arrays = backend.broadcast_arrays(pinned.table.arrays() if is_main else None)
        shared = {k: np.asarray(v.cpu() if hasattr(v, "cpu") else v)  # torch or MLX
                  for k, v in arrays.items()}
        pinned = replace(pinned, table=ReferenceTable.from_arrays(shared, pinned.table.meta))
    return pinned


def sweep_reference(backend: Backend, data: DataBundle, steps: int,
                    accumulation: int) -> DataBundle:
    """lr-find: the ``steps`` batches the sweep will draw, scored by the model as loaded
    before its first step (the stream is rewound after), and ``data`` attaching them."""
    position = data.train.state_dict()
    table = ReferenceTable({}, {})
    for _ in range(steps):
        batch = data.train.next_batch()
        for part in batch.split(accumulation):
            table.add(part, backend.score_rows(part))
    data.train.load_state_dict(position)
    return with_reference(data, table)


# -- every batch that reaches a step or an evaluation carries its values ---------------
class ReferencedTrain:
    """The training stream, each batch with its rows' reference log-probs attached."""

    def __init__(self, stream: Any, table: ReferenceTable):
        self._stream, self._table = stream, table

    def next_batch(self) -> Batch:
        return self._table.attach(self._stream.next_batch())

    def __getattr__(self, name: str) -> Any:  # position, state_dict, close...: the stream's
        return getattr(self._stream, name)


class ReferencedValidation:
    """The fixed validation batches, with their reference log-probs (looked up once)."""

    def __init__(self, valid: Any, table: ReferenceTable):
        self._valid, self._table, self._batches = valid, table, None

    def batches(self) -> list[Batch]:
        if self._batches is None:
            self._batches = [self._table.attach(b) for b in self._valid.batches()]
        return list(self._batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._valid, name)


def with_reference(data: DataBundle, table: ReferenceTable) -> DataBundle:
    return replace(data, train=ReferencedTrain(data.train, table),
                   valid=None if data.valid is None else ReferencedValidation(data.valid, table))


def attach_of(data: Any) -> Callable[[Batch], Batch] | None:
    """What gives other batches (the test set's) their reference values: the table's
    ``attach`` when ``data`` carries a precomputed reference, else None."""
    train = getattr(data, "train", None)
    return train._table.attach if isinstance(train, ReferencedTrain) else None
