"""Training techniques checked without a model: label smoothing against torch's cross
entropy, the adaptive evaluation schedule. On the tiny model: tests/model/test_techniques.py."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_tune.training.cadence import is_eval_step


def test_label_smoothing_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=6)
    for eps in (0.0, 0.1, 0.3):
        ours = nn.losses.cross_entropy(mx.array(logits), mx.array(targets), label_smoothing=eps)
        ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets),
                                                label_smoothing=eps, reduction="none")
        np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=1e-5)


def test_adaptive_eval_schedule_is_denser_early():
    steps = [s for s in range(1, 1001) if is_eval_step(s, eval_steps=100, max_steps=1000,
                                                      schedule="adaptive")]
    assert steps[:4] == [25, 50, 75, 100]  # every eval_steps/4 in the first 10%
    assert 300 in steps and 350 not in steps  # every eval_steps until half way
    assert 600 in steps and 700 not in steps and 800 in steps  # then every 2 * eval_steps
    assert steps[-1] == 1000
    fixed = [s for s in range(1, 1001) if is_eval_step(s, eval_steps=250, max_steps=1000)]
    assert fixed == [250, 500, 750, 1000]
