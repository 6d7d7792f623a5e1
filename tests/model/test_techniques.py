"""Training techniques of the MLX backend, each checked against a formula, a reference
implementation or an observable effect."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.backends.mlx.backend import MLXBackend
from mlx_tune.training.cadence import gradient_noise_std
from mlx_tune.data import load_data


@pytest.fixture(scope="module")
def batch(tiny_spec):
    spec = tiny_spec()
    return load_data(spec, backend_for(spec).tokenizer, log=lambda m: None).train.next_batch()


def backend_for(spec) -> MLXBackend:
    backend = MLXBackend()
    backend.load(spec, spec.model)
    return backend


def weights(backend) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}


def losses(backend, batch, steps=5, lr=1e-3) -> list[float]:
    return [backend.to_floats([backend.step([batch], lr, 0.0).loss])[0] for _ in range(steps)]


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "adafactor"])
def test_each_optimizer_lowers_the_loss(tiny_spec, batch, optimizer):
    backend = backend_for(tiny_spec(optimizer=optimizer))
    lr = 5e-2 if optimizer == "sgd" else 1e-3
    seen = losses(backend, batch, steps=6, lr=lr)
    assert seen[-1] < seen[0], seen


def test_ema_follows_its_formula(tiny_spec, batch):
    decay = 0.9
    backend = backend_for(tiny_spec(ema={"enabled": True, "decay": decay}))
    expected = weights(backend)
    for _ in range(3):
        backend.step([batch], 1e-3, 0.0)
        live = weights(backend)
        expected = {k: decay * expected[k] + (1 - decay) * live[k] for k in live}
    with backend.ema_weights():
        ema = weights(backend)
    for k in expected:
        np.testing.assert_allclose(ema[k], expected[k], rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(ema[k], live[k]) for k in live)
    after = weights(backend)  # the live weights are back after the context
    assert all(np.array_equal(after[k], live[k]) for k in live)
    arrays, _ = backend.state_dict()
    assert any(name.startswith("ema/") for name in arrays)


def test_gradient_noise_variance_formula_and_effect(tiny_spec, batch):
    eta, gamma = 0.3, 0.55
    for step in (0, 10, 1000):
        assert gradient_noise_std(step, eta, gamma) ** 2 == pytest.approx(eta / (1 + step) ** gamma)
    assert gradient_noise_std(5, 0.0, gamma) == 0.0
    quiet = backend_for(tiny_spec())
    noisy = backend_for(tiny_spec(gradient_noise={"eta": eta}))
    quiet.step([batch], 1e-3, 0.0)
    noisy.step([batch], 1e-3, gradient_noise_std(0, eta, gamma))
    a, b = weights(quiet), weights(noisy)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_loss_and_update(tiny_spec, batch):
    plain = backend_for(tiny_spec())
    plain_losses = losses(plain, batch, steps=2)
    checkpointed = backend_for(tiny_spec(gradient_checkpointing=True))
    ckpt_losses = losses(checkpointed, batch, steps=2)
    np.testing.assert_allclose(plain_losses, ckpt_losses, rtol=1e-5)
    a, b = weights(plain), weights(checkpointed)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_mixed_precision_keeps_trainable_weights_in_float32(tiny_spec, batch):
    backend = backend_for(tiny_spec(dtype="bfloat16"))
    base = [m.weight.dtype for _, m in backend.model.named_modules() if isinstance(m, nn.Linear)]
    assert base and all(d == mx.bfloat16 for d in base)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(backend.model.trainable_parameters()))
    seen = losses(backend, batch, steps=4)
    assert all(math.isfinite(x) for x in seen) and seen[-1] < seen[0]


def test_label_smoothing_penalises_a_perfect_prediction(batch):
    from mlx_tune.backends.mlx.step import token_loss_sums

    class Oracle(nn.Module):  # puts all its mass on the right next token
        def __init__(self, tokens, vocab):
            super().__init__()
            self.next = mx.array(tokens[:, 1:])
            self.vocab = vocab

        def __call__(self, inputs):
            return 50.0 * mx.eye(self.vocab)[self.next]

    oracle = Oracle(batch.tokens, int(batch.tokens.max()) + 1)
    plain, n = token_loss_sums(oracle, mx.array(batch.tokens), mx.array(batch.mask))
    smoothed, _ = token_loss_sums(oracle, mx.array(batch.tokens), mx.array(batch.mask),
                                  label_smoothing=0.1)
    assert plain.item() / n.item() < 1e-6
    assert smoothed.item() / n.item() > 1.0
