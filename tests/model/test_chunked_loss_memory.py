"""MLX's measured peak memory: the chunked loss holds less than the unchunked one, by at
least the logits it no longer keeps, and its peak does not grow with the length (no model
is loaded; the arrays are large enough for the peak to be dominated by the logits)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_tune.backends.mlx import chunked_loss as mc


def _mlx_peak(loss, hidden, state) -> float:
    """Peak bytes above what was held before, of the loss's value and gradient compiled
    as the training step compiles them."""
    grad = mx.compile(mx.value_and_grad(loss), inputs=state, outputs=state)
    mx.eval(grad(hidden))  # compile first: the second call is the one measured
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(hidden))
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("frozen", [True, False])
def test_mlx_chunked_peak_is_lower_by_the_logits_it_does_not_hold(frozen):
    """frozen: LoRA's head, the direct-gradient chunks; trained: the checkpointed ones."""
    vocab, hid, chunk = 8192, 32, 128
    rng = np.random.default_rng(3)
    module = nn.Linear(hid, vocab, bias=False)
    module.weight = mx.array(rng.normal(size=(vocab, hid)).astype(np.float32) * 0.1)
    if frozen:
        module.freeze()
    head = mc.OutputHead(module, False, vocab)

    def peaks(width: int) -> tuple[float, float]:
        hidden = mx.array(rng.normal(size=(1, width, hid)).astype(np.float32))
        y = mx.array(rng.integers(0, vocab, size=(1, width)))

        def unchunked(h):
            return nn.losses.cross_entropy(head(h).astype(mx.float32), y).sum()

        def chunked(h):
            return -mc.token_logps(h, head, y, chunk=chunk)[0].sum()

        return _mlx_peak(unchunked, hidden, module.state), _mlx_peak(chunked, hidden, module.state)

    # Logits dominate: 1 x 2048 positions x vocab 8192 float32 = 67 MB per copy.
    logits_bytes = 2048 * vocab * 4
    full, chunked = peaks(2048)
    assert full >= 2 * logits_bytes  # the unchunked backward holds several copies
    assert full - chunked >= logits_bytes, (full, chunked)
    full_half, chunked_half = peaks(1024)
    assert full - full_half >= 2 * logits_bytes / 2  # unchunked: several copies per token
    if frozen:
        # Bounded by the chunk, not the length: half the positions leave the peak where
        # it was, within a few chunks' logits.
        assert abs(chunked - chunked_half) < 4 * chunk * vocab * 4 + 1024 * hid * 4 * 8, \
            (chunked, chunked_half)
    else:
        # Checkpointed chunks under mx.compile: the compiler merges the recomputed head
        # product with the forward's (measured), so about one copy of the logits stays.
        assert chunked - chunked_half < (full - full_half) / 2, (chunked, chunked_half)
