"""lr-find: the pure parts on synthetic curves and the driver on a fake backend.
The real sweep on the tiny model is in tests/model/test_lr_find.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_tune.data.batch import Batch
from mlx_tune.commands.lr_find import (is_diverged, run_lr_find, smooth, suggest_lr,
                              sweep_lrs, text_plot)
from mlx_tune.config.spec import build_spec


def test_sweep_is_geometric_from_start_to_end():
    lrs = sweep_lrs(1e-6, 1e-1, 6)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_smoothing_is_bias_corrected():
    # Without the correction the first values would be pulled towards 0.
    assert smooth([5.0] * 10) == pytest.approx([5.0] * 10)
    s = smooth([1.0, 3.0])
    assert s[1] == pytest.approx((0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98 ** 2))


def test_suggestion_is_the_steepest_descent_in_log_lr():
    lrs = sweep_lrs(1e-6, 1.0, 61)  # 10 points per decade
    x = np.log10(lrs)
    # Flat, then falls fastest at 1e-3 (tanh is steepest at 0), then rises again.
    loss = 3 - np.tanh(3 * (x + 3)) + np.maximum(x + 1, 0) ** 2
    i = suggest_lr(lrs, list(loss))
    assert lrs[i] == pytest.approx(1e-3, rel=1e-6)


def test_suggestion_survives_batch_noise_and_an_outlier():
    lrs = sweep_lrs(1e-7, 1.0, 100)
    rng = np.random.default_rng(0)
    raw = [3 - math.tanh(2 * (math.log10(lr) + 3)) + rng.normal(0, 0.3) for lr in lrs]
    raw[20] += 5  # one bad batch early on must not pass for the steepest descent
    i = suggest_lr(lrs, smooth(raw))
    # True steepest point 1e-3; the EMA's lag moves it right, not by a decade.
    assert 1e-3 <= lrs[i] <= 1e-2


def test_no_suggestion_when_the_loss_never_falls():
    lrs = sweep_lrs(1e-5, 1e-1, 20)
    assert suggest_lr(lrs, [1.0 + k for k in range(20)]) is None
    assert suggest_lr(lrs[:2], [2.0, 1.0]) is None


def test_divergence_rule():
    assert not is_diverged(3.9, 1.0)
    assert is_diverged(4.1, 1.0)
    assert is_diverged(float("nan"), 1.0) and is_diverged(float("inf"), 1.0)


class FakeBackend:
    """Loss follows a fixed function of the current lr; weights are one number whose
    'state' must come back after the sweep."""

    def __init__(self, loss_of_lr):
        self.loss_of_lr, self.weight, self.steps = loss_of_lr, 1.0, 0

    def state_dict(self):
        return {"trainable/w": np.array([self.weight])}, {"backend": "fake"}

    def load_state_dict(self, arrays, meta):
        self.weight = float(arrays["trainable/w"][0])

    def step(self, micro_batches, lr, noise_std):
        self.steps += 1
        self.weight += lr
        return SimpleNamespace(loss=self.loss_of_lr(lr))

    def to_floats(self, values):
        return [float(v) for v in values]


def fake_data():
    batch = Batch(np.zeros((2, 4), np.int32), np.ones((2, 4), np.float32))
    return SimpleNamespace(train=SimpleNamespace(next_batch=lambda: batch))


def test_sweep_stops_at_divergence_and_restores_the_state():
    # Falls between 1e-4 and 1e-2, explodes above 1e-1.
    def loss(lr):
        x = math.log10(lr)
        return 3 - math.tanh(2 * (x + 3)) + (1e3 * (x + 1) ** 2 if x > -1 else 0.0)

    backend = FakeBackend(loss)
    result = run_lr_find(build_spec(), backend, fake_data(), 1e-7, 10.0, 200, log=lambda m: None)
    assert result.stop_reason == "diverged"
    assert len(result.losses) < 200 and backend.steps == len(result.losses)
    assert math.log10(result.lrs[-1]) > -1  # stopped past the cliff, not before
    assert backend.weight == 1.0  # restored
    assert 1e-4 < result.suggestion < 1e-1
    assert result.suggestion < result.min_loss_lr < 1e-1  # the minimum is past the descent


def test_sweep_stops_on_a_non_finite_loss():
    backend = FakeBackend(lambda lr: float("nan") if lr > 1e-3 else 2.0 - lr)
    result = run_lr_find(build_spec(), backend, fake_data(), 1e-6, 1.0, 50, log=lambda m: None)
    assert result.stop_reason == "non-finite loss"
    assert not math.isfinite(result.losses[-1]) and backend.weight == 1.0


def test_text_plot_marks_the_suggestion():
    lrs = sweep_lrs(1e-6, 1.0, 40)
    losses = [3 - math.tanh(2 * (math.log10(lr) + 3)) for lr in lrs]
    art = text_plot(lrs, losses, 20, width=40, height=6)
    lines = art.splitlines()
    assert lines[0].count("v") == 1 and art.count("*") >= 20
    assert "1e-06" in lines[-1] and "1e+00" in lines[-1]


def test_png_is_a_valid_image(tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    from mlx_tune.reporting.plots import write_lr_find_png

    lrs = sweep_lrs(1e-6, 1.0, 50)
    losses = [3 - math.tanh(2 * (math.log10(lr) + 3)) for lr in lrs]
    path = write_lr_find_png(tmp_path / "sub" / "lr.png", lrs, losses, smooth(losses), 25,
                             width=320, height=200)
    with Image.open(path) as img:  # Pillow's own decoder, not ours
        assert img.format == "PNG" and img.size == (320, 200)
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels == 255).all(axis=-1).mean() > 0.5  # mostly background
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
    assert red.any() and blue.any()  # the suggestion line and the smoothed curve
