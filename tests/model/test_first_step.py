"""The longest batch first (training/first_step.py) and the cache bound, on the real
backends: the discarded step changes nothing (the steps after it are bit-identical to
those of a backend that never ran it, MLX and torch); a run over batches of many widths
keeps MLX's cache under its bound (and without the bound it does not stay there). The
oversize first step (exit 11) is tests/e2e/test_first_step.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_tune.backends.select import make_backend
from mlx_tune.config.spec import build_spec
from mlx_tune.data.batch import Batch
from mlx_tune.exit_codes import EXIT_OK
from mlx_tune.training.first_step import widest_batch

MB = 2**20


def host(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.array(value)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_the_discarded_step_changes_nothing(name, tiny_model):
    pytest.importorskip("mlx.core" if name == "mlx" else "torch")
    # Dropout (the random state), AdamW moments and EMA all move in a step: each must
    # come back exactly.
    spec = build_spec(overrides={"model": str(tiny_model), "backend": name, "lora.rank": 4,
                                 "lora.dropout": 0.1, "ema.enabled": True, "seed": 3})
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 200, (2, 48)).astype(np.int32)
    mask = np.ones_like(tokens, np.float32)
    mask[:, :8] = 0
    batch = Batch(tokens, mask)
    states = []
    for trial in (False, True):
        backend = make_backend(name)
        backend.load(spec, tiny_model)
        if trial:
            peak = backend.trial_step(widest_batch(2, 96, packed=False))
            assert peak > 0
        for _ in range(2):
            backend.to_floats([backend.step([batch], 1e-3, 0.0).loss])
        arrays, _ = backend.state_dict()
        states.append({k: host(v) for k, v in arrays.items()})
    plain, tried = states
    assert plain.keys() == tried.keys()
    for key in plain:
        assert np.array_equal(plain[key], tried[key]), f"{key} differs after the trial step"


def test_a_run_over_many_widths_keeps_the_cache_under_its_bound(tiny_model, recipe_slice,
                                                                tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx_tune.training.recipe import train

    data = recipe_slice(tmp_path / "data", train=48, valid=4, test=1)
    bound_gb = 0.004  # 4 MB: far below what the steps free

    def run(out, **memory):
        over = {"model": str(tiny_model), "data": str(data), "output_dir": str(out),
                "backend": "mlx", "batch_size": 2, "max_length": 256, "max_steps": 10,
                "bucket_widths": "align32", "report_every": 1, "eval_at_start": False,
                "eval_steps": 1000, "num_samples": 0, "dashboard": "plain",
                "report_to": [], "lora.rank": 4, "prefetch": 0, "warmup_steps": 1,
                "memory.first_step_check": False, **memory}
        before = mx.set_cache_limit(123_456_789)
        mx.set_cache_limit(before)
        assert train(build_spec(overrides=over), resume="fresh",
                     log=lambda m: None).exit_code == EXIT_OK
        assert mx.set_cache_limit(before) == before  # the run put the old bound back
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["type"] == "train"]

    bounded = run(tmp_path / "bounded", **{"memory.cache_limit_gb": bound_gb})
    assert bounded[-1]["compiled_shapes"] >= 3  # several widths went through the step
    assert max(r["cache_memory_mb"] for r in bounded) <= bound_gb * 1e9 / MB
    free = run(tmp_path / "free")  # the default bound (a quarter of the budget): far higher
    assert max(r["cache_memory_mb"] for r in free) > 10 * bound_gb * 1e9 / MB
