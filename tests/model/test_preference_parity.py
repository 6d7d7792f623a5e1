"""DPO means the same on MLX and on torch (float32, CPU): the same pairs from the shipped
preference set, the same LoRA weights (lora_b made nonzero so the policy differs from the
adapter-off reference from step one), 2 micro-batches, several steps. Loss and every
metric (rewards, accuracies, margins, log-probs) are compared step by step, and the
evaluation of the same pairs too. A second check: at initialisation (lora_b = 0) the
adapter-off reference equals the policy, so every reward is exactly 0 and the loss log 2."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")

from tests.model.test_parity import PARITY, load_pair  # noqa: E402

pytestmark = pytest.mark.torch
STEPS = 6
PREFERENCE = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "preference"
# Rows long enough that every pair still differs after keep_start truncation: at
# PARITY's 64 tokens a looping answer and its faithful one are cut to the same tokens,
# and a batch of identical pairs has (near) zero gradients, whose float noise Adam's
# first step turns into full-size updates of either sign.
PAIRS = {**PARITY, "max_length": 256}


@pytest.fixture
def pair_batches(tiny_model, tiny_spec):
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer

    spec = tiny_spec(PAIRS, data=PREFERENCE, objective="dpo")
    bundle = load_data(spec, load_tokenizer(tiny_model), log=lambda m: None)
    try:
        return [bundle.train.next_batch() for _ in range(STEPS)]
    finally:
        bundle.close()


def run(backend, batches, lr):
    results = [backend.step(b.split(2), lr, 0.0) for b in batches]
    names = list(results[0].metrics)
    flat = backend.to_floats([v for r in results for v in
                              (r.loss, r.count, *(x for n in names for x in r.metrics[n]))])
    width = 2 + 2 * len(names)
    rows = [flat[i * width:(i + 1) * width] for i in range(len(results))]
    return names, np.array([r[0] for r in rows]), [
        {n: r[2 + 2 * k] / r[3 + 2 * k] for k, n in enumerate(names)} for r in rows]


def test_dpo_steps_and_evaluation_agree(tiny_model, tiny_spec, pair_batches):
    assert all(b.paired and b.size == 4 for b in pair_batches)
    spec = tiny_spec(PAIRS, data=PREFERENCE, objective="dpo", optimizer="adamw")
    m, t = load_pair(spec, tiny_model)
    em, et = m.evaluate(pair_batches[:2]), t.evaluate(pair_batches[:2])
    assert em.tokens == et.tokens == 8  # pairs
    assert abs(em.loss_sum - et.loss_sum) / em.tokens < 1e-4
    assert em.metrics.keys() == et.metrics.keys() and "rewards/accuracies" in em.metrics
    for name, (s, c) in em.metrics.items():
        assert c == et.metrics[name][1]
        assert abs(s - et.metrics[name][0]) / c < 1e-3 * max(1.0, abs(s / c)), name
    assert any(abs(s) > 1e-3 for s, _ in (em.metrics["rewards/margins"],))  # lora_b != 0
    names_m, loss_m, metrics_m = run(m, pair_batches, 1e-3)
    names_t, loss_t, metrics_t = run(t, pair_batches, 1e-3)
    assert names_m == names_t
    assert np.abs(loss_m - loss_t).max() < 2e-4, (loss_m, loss_t)
    for a, b in zip(metrics_m, metrics_t):
        for name in names_m:
            assert abs(a[name] - b[name]) < 2e-3 * max(1.0, abs(a[name])), (name, a, b)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_adapter_off_reference_is_the_untrained_policy(tiny_model, tiny_spec, pair_batches,
                                                           backend):
    from mlx_tune.backends.select import make_backend

    b = make_backend(backend)
    b.load(tiny_spec(PAIRS, data=PREFERENCE, objective="dpo"), tiny_model)
    result = b.evaluate(pair_batches[:1])
    assert result.tokens == 4
    assert result.loss_sum / result.tokens == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert result.metrics[name][0] == 0.0, name
