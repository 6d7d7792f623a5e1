"""`mlx-tune evaluate RUN_DIR`: a checkpoint's adapter scored on the run's test set.

The pieces are the ones training and `fuse` use: the run's spec.yaml and the weights
``--checkpoint`` names (``final`` is ``adapters/``; ``best`` and ``step-N`` become an
adapter in the backend's own format, as `fuse` does), the backend loaded as for training,
and ``score_test``, which `test_at_end` uses, so the numbers are comparable with it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from mlx_tune.backends import registry
from mlx_tune.backends.select import select_backend
from mlx_tune.checkpoint.reference import TABLE_NAME, MissingRow, ReferenceError, load_table
from mlx_tune.data.records import DataError
from mlx_tune.export import ExportError
from mlx_tune.reporting.text import append_record_or_warn
from mlx_tune.export.fuse import (adapter_from_checkpoint, check_adapter, checkpoint_dir,
                                   run_spec)
from mlx_tune.training.reference import uses_precomputed
from mlx_tune.training.testset import TestResult, find_test_file, score_test


def test_data(spec, data: str | None):
    """What is scored: a JSONL file itself, or the test.jsonl / 'test' split of a data
    directory or dataset (``data``, else the run's own ``data``)."""
    if data is not None and Path(data).expanduser().is_file():
        return Path(data).expanduser()
    where = spec.data if data is None else data
    found = find_test_file(spec if data is None else replace(spec, data=data))
    if found is None:
        raise DataError(f"{where}: no test set (no test.jsonl, no 'test' split); give "
                        "--data PATH (a JSONL file, or a directory with test.jsonl)")
    return found


def evaluate_run(run_dir: Path, which: str = "final", data: str | None = None,
                 log: Callable[[str], None] = print,
                 warn: Callable[[str], None] = print) -> TestResult:
    """Score the weights ``which`` names, append a ``test`` record to metrics.jsonl (a
    run directory that cannot take it gets a ``warn`` line instead: the score stands)."""
    from mlx_tune.training.setup import resolve_accumulation, setup

    run_dir = Path(run_dir)
    spec = run_spec(run_dir)
    source, step = checkpoint_dir(run_dir, which)
    path = test_data(spec, data)  # before minutes of model loading
    # What is scored is the adapter named, never a swap to EMA weights; no new EMA either.
    spec = replace(spec, ema=replace(spec.ema, enabled=False))
    whole_model = (spec.fine_tune_type == "full"
                   and registry.get(select_backend(spec.backend)).full_saves_model)
    if whole_model and which != "final":
        raise ExportError(f"a {spec.backend} full fine-tune keeps whole models only in "
                          "RUN_DIR/adapters: evaluate --checkpoint final")
    if whole_model:  # the saved whole model is the base
        spec = replace(spec, model=str(source))
    run = setup(spec, log)
    backend = run.backend
    with tempfile.TemporaryDirectory(prefix="mlx-tune-evaluate-") as tmp:
        adapter = None
        if not whole_model:  # checked before minutes of model loading
            adapter = source if which == "final" else adapter_from_checkpoint(
                source, run.spec, Path(run.model_path), Path(tmp) / "adapter")
            check_adapter(adapter, run.spec, Path(run.model_path))
        backend.load(run.spec, run.model_path)
        if adapter is not None:
            try:
                backend.load_adapter(adapter)
            except (ValueError, OSError) as e:
                raise ExportError(f"--checkpoint {which}: {e}") from None
    accumulation = resolve_accumulation(run.spec, Path(run.model_path),
                                        run.backend.world_size, log)
    attach = None
    if uses_precomputed(run.spec):  # the run's own reference values, never recomputed
        table = load_table(run_dir / TABLE_NAME)

        def attach(batch):
            try:
                return table.attach(batch)
            except MissingRow:
                raise ReferenceError(f"{path}: has rows the run's precomputed reference "
                                     f"({run_dir / TABLE_NAME}) never scored: it covers the "
                                     "run's own train, validation and test data") from None
    result = score_test(run.spec, backend, accumulation, step if step is not None else -1,
                        log=log, path=path, weights=which, attach=attach)
    append_record_or_warn(run_dir / "metrics.jsonl", {
        "type": "test", **asdict(result), "checkpoint": which, "source": str(source),
        "wall_time": time.time()}, warn)
    return result
