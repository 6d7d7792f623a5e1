"""MLX's measured peak memory: the chunked loss holds less than the unchunked one, by at
least the logits it no longer keeps, and its peak does not grow with the length (no model
is loaded; the arrays are large enough for the peak to be dominated by the logits)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_tune.backends.mlx import chunked_loss as mc


def _mlx_peak(loss, hidden) -> float:
    grad = mx.value_and_grad(loss)
    mx.eval(hidden)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(hidden))
    return mx.get_peak_memory() - base


def test_mlx_chunked_peak_is_lower_by_the_logits_it_does_not_hold():
    # Logits dominate: 1 x 2048 positions x vocab 8192 float32 = 67 MB per copy.
    vocab, hid = 8192, 64
    rng = np.random.default_rng(3)
    module = nn.Linear(hid, vocab, bias=False)
    module.weight = mx.array(rng.normal(size=(vocab, hid)).astype(np.float32) * 0.1)
    head = mc.OutputHead(module, False, vocab)

    def peaks(width: int) -> tuple[float, float]:
        hidden = mx.array(rng.normal(size=(1, width, hid)).astype(np.float32))
        y = mx.array(rng.integers(0, vocab, size=(1, width)))

        def unchunked(h):
            return nn.losses.cross_entropy(head(h).astype(mx.float32), y).sum()

        def chunked(h):
            return -mc.token_logps(h, head, y, chunk=128)[0].sum()

        return _mlx_peak(unchunked, hidden), _mlx_peak(chunked, hidden)

    logits_bytes = 2048 * vocab * 4
    full, chunk = peaks(2048)
    assert full >= 2 * logits_bytes  # the unchunked backward holds several copies
    assert full - chunk >= logits_bytes, (full, chunk)
    # The chunked peak is bounded by the chunk, not the length: half the positions
    # halve the unchunked peak, and leave the chunked one within a few chunks' logits.
    full_half, chunk_half = peaks(1024)
    assert full - full_half >= logits_bytes / 2
    assert abs(chunk - chunk_half) < 4 * 128 * vocab * 4 + 1024 * hid * 4 * 8, (chunk, chunk_half)
