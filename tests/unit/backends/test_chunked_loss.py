"""Chunked cross-entropy equals the unchunked computation (loss, gradients, evaluation
statistics) on both backends, and on torch saves no full-vocabulary tensor for the
backward pass (MLX's measured peak: tests/model/test_chunked_loss_memory.py).

The references are today's losses written out independently: ``nn.losses.cross_entropy``
(MLX) and ``F.cross_entropy`` (torch) on full logits, with label smoothing and masks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_tune.backends.mlx import chunked_loss as mc
from mlx_tune.backends.torch import chunked_loss as tc

B, T, H, V = 2, 37, 32, 101  # 74 positions: chunks of 7 leave a short last one


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    weights = (rng.random((B, T)) > 0.3).astype(np.float32)
    weight = (rng.normal(size=(V, H)) * 0.5).astype(np.float32)
    return hidden, targets, weights, weight


# -- MLX -------------------------------------------------------------------------------

def mlx_head(weight: np.ndarray, tied: bool) -> mc.OutputHead:
    if tied:
        module = nn.Embedding(V, H)
    else:
        module = nn.Linear(H, V, bias=False)
    module.weight = mx.array(weight)
    return mc.OutputHead(module, tied, V)


@pytest.mark.parametrize("head_kind", ["linear", "tied", "frozen", "frozen-tied", "quantized"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mlx_loss_and_gradients_equal_unchunked(head_kind, smoothing):
    """A trained head (full fine-tuning) takes the checkpointed chunks and gets its own
    gradient; a frozen one (LoRA) the direct-gradient chunks, quantized included."""
    hidden, targets, weights, weight = data()
    head = mlx_head(weight, tied="tied" in head_kind)
    if head_kind == "quantized":
        head = mc.OutputHead(nn.QuantizedLinear.from_linear(head.module, 32, 4), False, V)
    if head_kind.startswith(("frozen", "quantized")):
        head.module.freeze()
    y, w = mx.array(targets), mx.array(weights)

    def reference(params, h):
        head.module.update(params)
        logits = head(h).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, y, label_smoothing=smoothing) * w).sum()

    def chunked(params, h):
        head.module.update(params)
        logp, smooth = mc.token_logps(h, head, y, smooth=smoothing > 0, chunk=7)
        per_token = -logp if smooth is None else -((1 - smoothing) * logp + smoothing * smooth)
        return (per_token * w).sum()

    params = head.module.trainable_parameters()
    (ref, (gp_ref, gh_ref)) = mx.value_and_grad(reference, argnums=(0, 1))(params, mx.array(hidden))
    (got, (gp, gh)) = mx.value_and_grad(chunked, argnums=(0, 1))(params, mx.array(hidden))
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5)
    np.testing.assert_allclose(np.array(gh), np.array(gh_ref), rtol=1e-4, atol=1e-6)
    assert float(mx.abs(gh).sum()) > 0
    if head_kind in ("linear", "tied"):
        np.testing.assert_allclose(np.array(gp["weight"]), np.array(gp_ref["weight"]),
                                   rtol=1e-4, atol=1e-6)
        assert float(mx.abs(gp["weight"]).sum()) > 0  # the head's gradient went through
    else:
        assert not gp


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mlx_bfloat16_hidden_states_keep_their_dtype_and_values(smoothing):
    hidden, targets, weights, weight = data(6)
    head = mlx_head(weight, False)
    head.module.freeze()
    head.module.set_dtype(mx.bfloat16)
    y, w = mx.array(targets), mx.array(weights)
    h = mx.array(hidden).astype(mx.bfloat16)

    def reference(h):
        logits = head(h).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, y, label_smoothing=smoothing) * w).sum()

    def chunked(h):
        logp, smooth = mc.token_logps(h, head, y, smooth=smoothing > 0, chunk=7)
        per_token = -logp if smooth is None else -((1 - smoothing) * logp + smoothing * smooth)
        return (per_token * w).sum()

    ref, gh_ref = mx.value_and_grad(reference)(h)
    got, gh = mx.value_and_grad(chunked)(h)
    assert gh.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4)
    # bfloat16 keeps ~3 significant digits: each side rounds its products differently,
    # so they agree to a few bfloat16 steps (0.0078 relative) of gradients up to ~0.5.
    np.testing.assert_allclose(np.array(gh.astype(mx.float32)),
                               np.array(gh_ref.astype(mx.float32)), rtol=2e-2, atol=5e-3)


@pytest.mark.parametrize("frozen", [False, True])
def test_mlx_compiled_chunked_equals_eager(frozen):
    hidden, targets, weights, weight = data(1)
    head = mlx_head(weight, False)
    if frozen:
        head.module.freeze()
    y, w = mx.array(targets), mx.array(weights)

    def loss(h):
        return (-mc.token_logps(h, head, y, chunk=7)[0] * w).sum()

    eager = mx.value_and_grad(loss)(mx.array(hidden))
    state = head.module.state
    compiled = mx.compile(mx.value_and_grad(loss), inputs=state, outputs=state)(mx.array(hidden))
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7)


def test_mlx_eval_stats_equal_unchunked():
    hidden, targets, _, weight = data(2)
    head = mlx_head(weight, False)
    logits = np.array(head(mx.array(hidden)), dtype=np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                               keepdims=True)) - logits.max(-1, keepdims=True)
    probs = np.exp(logprobs)
    got = mc.token_eval_stats(mx.array(hidden), head, mx.array(targets), chunk=7)
    expected = {"logp": np.take_along_axis(logprobs, targets[..., None], -1)[..., 0],
                "correct": (logits.argmax(-1) == targets).astype(np.float64),
                "confidence": probs.max(-1), "entropy": -(probs * logprobs).sum(-1)}
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(got[name]), value, rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_mlx_split_model_refuses_an_unknown_head_in_one_line():
    class Args:
        model_type, tie_word_embeddings, vocab_size = "gemma2", False, 10

    class Model(nn.Module):
        args = Args()

    with pytest.raises(ValueError, match="model type 'gemma2' is not supported.*"
                                         "memory.chunked_loss: false"):
        mc.split_model(Model())


# -- torch -----------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_torch_loss_and_gradients_equal_unchunked(smoothing):
    hidden, targets, weights, weight = data(4)
    y, w = torch.from_numpy(targets), torch.from_numpy(weights)

    def run(chunked: bool):
        head = torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
        h = torch.from_numpy(hidden).requires_grad_(True)
        if chunked:
            logp, smooth = tc.token_logps(h, head, y, vocab=V, smooth=smoothing > 0, chunk=7)
            per_token = -logp if smooth is None else \
                -((1 - smoothing) * logp + smoothing * smooth)
        else:
            logits = head(h).float()
            per_token = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1),
                                        label_smoothing=smoothing,
                                        reduction="none").view(B, T)
        loss = (per_token * w).sum()
        loss.backward()
        return loss.detach(), h.grad, head.weight.grad

    for got, ref in zip(run(True), run(False)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_torch_eval_stats_equal_unchunked():
    hidden, targets, _, weight = data(5)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    h, y = torch.from_numpy(hidden), torch.from_numpy(targets)
    got = tc.token_eval_stats(h, head, y, vocab=V, chunk=7)
    with torch.no_grad():
        logits = head(h).double()
    logprobs = torch.log_softmax(logits, -1)
    expected = {"logp": logprobs.gather(-1, y[..., None])[..., 0],
                "correct": (logits.argmax(-1) == y).double(),
                "confidence": logprobs.exp().max(-1).values,
                "entropy": -(logprobs.exp() * logprobs).sum(-1)}
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-4, atol=1e-5,
                                   msg=name)


def _largest_saved(loss_fn) -> int:
    """Elements of the largest tensor autograd keeps for the backward pass."""
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return largest


def test_torch_chunked_saves_no_full_vocabulary_logits():
    rows, width, vocab, hid = 2, 256, 1000, 32
    head = torch.nn.Linear(hid, vocab, bias=False)
    h = torch.randn(rows, width, hid, requires_grad=True)
    y = torch.randint(0, vocab, (rows, width))

    def unchunked():
        return F.cross_entropy(head(h).reshape(-1, vocab), y.reshape(-1), reduction="sum")

    def chunked():
        return -tc.token_logps(h, head, y, vocab=vocab, chunk=64)[0].sum()

    assert _largest_saved(unchunked) >= rows * width * vocab
    assert _largest_saved(chunked) <= max(rows * width * hid, vocab * hid)
