"""memory.chunked_loss in the real steps: on the tiny model, a training step (LoRA and
full fine-tuning, with label smoothing, prompt masks and packed rows) and an evaluation
give what the unchunked loss gives, on MLX and torch."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_tune.backends.common import chunked_loss
from mlx_tune.config.spec import build_spec
from mlx_tune.data.batch import Batch


def batches(packed: bool) -> list[Batch]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 1024, size=(3, 48)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=np.float32)
    mask[:, :9] = 0  # a prompt
    mask[1, 30:] = 0  # padding
    segments = None
    if packed:
        segments = np.ones_like(tokens)
        segments[:, 20:] = 2
    return [Batch(tokens=tokens[:2], mask=mask[:2], segments=None if segments is None
                  else segments[:2]),
            Batch(tokens=tokens[2:], mask=mask[2:], segments=None if segments is None
                  else segments[2:])]


def spec(tiny_model, chunked: bool, **over):
    return build_spec(overrides={"model": str(tiny_model), "lora.dropout": 0.0,
                                 "label_smoothing": 0.1, "learning_rate": 0.5,
                                 # SGD: the update is linear in the gradient (Adam's first
                                 # steps are its sign, which float noise flips near zero)
                                 "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                                 "memory.chunked_loss": chunked, "num_samples": 0, **over})


def test_auto_is_on_where_nothing_is_recomputed(tiny_model):
    auto = build_spec(overrides={"model": str(tiny_model)})
    assert chunked_loss(auto, "mlx") and not chunked_loss(auto, "torch")
    full = build_spec(overrides={"model": str(tiny_model), "fine_tune_type": "full"})
    assert not chunked_loss(full, "mlx")
    assert not chunked_loss(spec(tiny_model, False), "mlx")
    assert chunked_loss(spec(tiny_model, True), "torch")


def _run(backend_cls, tiny_model, chunked, packed, **over):
    backend = backend_cls()
    backend.load(spec(tiny_model, chunked, **over), tiny_model)
    micro = batches(packed)
    losses = []
    for _ in range(2):
        result = backend.step(micro, 0.5, 0.0)
        losses.append(backend.to_floats([result.loss])[0])
    evaluation = backend.evaluate(micro)
    arrays, _ = backend.state_dict()
    trained = {k: np.asarray(v).astype(np.float32) for k, v in arrays.items()
               if k.startswith("trainable/")}
    return losses, evaluation, trained


@pytest.mark.parametrize("fine_tune, packed", [("lora", False), ("lora", True),
                                                ("full", False)])
def test_mlx_chunked_step_equals_unchunked(tiny_model, fine_tune, packed):
    from mlx_tune.backends.mlx.backend import MLXBackend
    plain = _run(MLXBackend, tiny_model, False, packed, fine_tune_type=fine_tune)
    chunked = _run(MLXBackend, tiny_model, True, packed, fine_tune_type=fine_tune)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(chunked[1].astuple(), plain[1].astuple(), rtol=1e-5)
    assert chunked[2].keys() == plain[2].keys() and plain[2]
    for key in plain[2]:  # two updates later, the same weights
        np.testing.assert_allclose(chunked[2][key], plain[2][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)


def test_torch_chunked_step_equals_unchunked(tiny_model):
    from mlx_tune.backends.torch.backend import TorchBackend
    plain = _run(TorchBackend, tiny_model, False, True, backend="torch")
    chunked = _run(TorchBackend, tiny_model, True, True, backend="torch")
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(chunked[1].astuple(), plain[1].astuple(), rtol=1e-5)
    for key in plain[2]:
        np.testing.assert_allclose(chunked[2][key], plain[2][key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
