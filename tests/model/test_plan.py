"""The memory planner's estimate against the measured peak of real MLX training steps on
the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_tune.training.planner import ModelShape, estimate
from mlx_tune.config.spec import build_spec

GB = 1e9

# -- estimate vs measured, on the real tiny model ----------------------------------------

def measured_peak(model_dir: Path, spec, batch: int, length: int) -> int:
    """Peak bytes of two real optimizer steps (after a warm-up step that compiles), this
    model's own: arrays that earlier tests in the process left alive are not counted."""
    import gc

    import mlx.core as mx

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.data.batch import Batch

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    backend = MLXBackend()
    backend.load(spec, model_dir)
    rng = np.random.default_rng(0)
    b = Batch(rng.integers(6, 1000, (batch, length)).astype(np.int32),
              np.ones((batch, length), np.float32))
    backend.to_floats([backend.step([b], 1e-4, 0.0).loss])
    mx.eval(backend.step_fn.state)
    mx.clear_cache()
    mx.reset_peak_memory()
    for _ in range(2):
        result = backend.step([b], 1e-4, 0.0)
    backend.to_floats([result.loss])
    mx.eval(backend.step_fn.state)
    return mx.get_peak_memory() - before


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_estimate_within_25_percent_of_measured_peak(tiny_model, kind):
    # Long enough sequences that activations, not the 11 MB of weights, dominate.
    batch, length = 4, 512
    spec = build_spec(None, {"model": str(tiny_model), "fine_tune_type": kind,
                             "batch_size": batch, "max_length": length})
    shape = ModelShape.from_config(json.loads((tiny_model / "config.json").read_text()))
    predicted = estimate(shape, spec, batch, length).total
    measured = measured_peak(tiny_model, spec, batch, length)
    assert abs(predicted / measured - 1) < 0.25, (predicted / 2**20, measured / 2**20)
