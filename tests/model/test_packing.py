"""Packing on the tiny model: a row of several examples under a block-diagonal causal mask
computes exactly the losses and LoRA gradients of the examples run one by one (MLX and
torch). The plans themselves are tested in tests/unit/data/test_packing.py."""

import numpy as np
import pytest

from mlx_tune.config.spec import build_spec
from mlx_tune.data.batch import Batch
from tests.unit.data.test_packing import PACK, examples, packed_batch


def one_by_one():
    """Each example alone, truncated as packing truncates it."""
    return [Batch(np.array([ids[:PACK]], np.int32), np.array([m[:PACK]], np.float32))
            for ids, m in examples()]


def assert_packed_row_is_the_sum(run) -> None:
    """``run(batch) -> (loss_sum, targets, {name: grad})`` on the packed row equals the
    sums over its examples run one by one."""
    loss, n, g = run(packed_batch())
    alone = [run(b) for b in one_by_one()]
    assert n == sum(a[1] for a in alone)
    assert loss == pytest.approx(sum(a[0] for a in alone), rel=1e-5)
    for k, v in g.items():
        np.testing.assert_allclose(v, sum(a[2][k] for a in alone), rtol=1e-3, atol=1e-4)  # grads are O(1)


def test_mlx_packed_row_equals_examples_one_by_one(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.backends.mlx.step import token_loss_sums

    backend = MLXBackend()
    backend.load(build_spec(overrides={"model": str(tiny_model), "lora.dropout": 0.0}),
                 tiny_model)
    model = backend.model
    mx.random.seed(1)  # non-zero LoRA B, so every adapter matrix gets a gradient
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                          model.trainable_parameters()))
    grad = nn.value_and_grad(model, token_loss_sums)

    def run(b):
        args = [mx.array(b.tokens), mx.array(b.mask)]
        if b.segments is not None:
            args.append(mx.array(b.segments))
        (loss, n), g = grad(model, *args)
        return float(loss), float(n), {k: np.array(v) for k, v in tree_flatten(g)}

    assert_packed_row_is_the_sum(run)


def test_torch_packed_row_equals_examples_one_by_one(tiny_model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from mlx_tune.backends.torch.backend import TorchBackend
    from mlx_tune.backends.torch.step import to_device, token_loss_sums

    backend = TorchBackend()
    backend.load(build_spec(overrides={"model": str(tiny_model), "backend": "torch",
                                       "lora.dropout": 0.0}), tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in backend.params.items():
            p.normal_(0, 0.05)

    def run(b):
        tokens, mask, positions = to_device(b, backend.device)
        loss, n = token_loss_sums(backend.forward, tokens, mask, 0.0, positions)
        grads = torch.autograd.grad(loss, list(backend.params.values()))
        return loss.item(), n.item(), {k: g.numpy() for k, g in zip(backend.params, grads)}

    assert_packed_row_is_the_sum(run)
