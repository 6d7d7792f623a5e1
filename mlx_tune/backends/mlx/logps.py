"""What the MLX step differentiates: the forward, per-row log-probabilities of the
target tokens, the reference pass, and the objective's sums.

``row_logps`` is the one place per-token log-probabilities are computed: from the whole
logits, or chunk by chunk of positions (``chunked_loss.py``, memory.chunked_loss).
Evaluation's token metrics (``eval_sums``) need the whole distribution and keep their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.backends.base import StepConfig
from mlx_tune.backends.mlx import chunked_loss
from mlx_tune.backends.mlx.ops import MLX_OPS as ops
from mlx_tune.objectives.base import LossTerms, RowLogps

# Evaluation's token-level metrics (sft): argmax == target, probability of the argmax,
# entropy of the predictive distribution, each over target tokens.
TOKEN_METRICS = ("accuracy", "confidence", "entropy")


class SegmentMask:
    """Stands in for mlx-lm's KV cache during a packed forward: mlx-lm's models build
    their mask with ``create_attention_mask(h, cache)``, which asks ``cache.make_mask``
    when the cache has one; offset 0 and a pass-through ``update_and_fetch`` leave RoPE
    and attention otherwise as in a cache-free forward. RoPE positions run across the
    row, which changes nothing: rotary scores depend only on relative positions, and the
    mask keeps every query within its own example (tests compare with examples run alone)."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        if window_size is None:
            return self.mask
        i = mx.arange(n)
        return self.mask & (i[:, None] < i[None] + window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values


def forward(model: nn.Module, inputs: mx.array, segments: mx.array | None,
            call: Callable[..., mx.array] | None = None) -> mx.array:
    """Logits (or, with ``call`` the model's body, its final hidden states); with
    segments, under a block-diagonal causal mask [B, 1, T, T]."""
    call = call or model
    if segments is None:
        return call(inputs)
    i = mx.arange(inputs.shape[1])
    mask = (segments[:, None, :, None] == segments[:, None, None, :]) & (i[:, None] >= i[None])
    return call(inputs, cache=[SegmentMask(mask)] * len(model.layers))


def row_logps(model: nn.Module, tokens: mx.array, mask: mx.array,
              segments: mx.array | None = None, smooth: bool = False,
              chunked: bool = False) -> RowLogps:
    """Per row: the sum of log p(target) over the target tokens, their count, and (for
    label smoothing) the sum over them of the mean log-probability of the vocabulary.
    ``chunked``: per-token log-probs over chunks of positions (chunked_loss.py), never
    the whole micro-batch's logits."""
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    if chunked:
        body, head = chunked_loss.split_model(model)
        target, mean = chunked_loss.token_logps(forward(model, inputs, seg, body), head,
                                                targets, smooth=smooth)
    else:
        logits = forward(model, inputs, seg).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1)
        target = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1) - lse
        mean = logits.mean(axis=-1) - lse if smooth else None
    return RowLogps((target * weights).sum(axis=-1), weights.sum(axis=-1),
                    None if mean is None else (mean * weights).sum(axis=-1))


def token_loss_sums(model: nn.Module, tokens: mx.array, mask: mx.array,
                    segments: mx.array | None = None, label_smoothing: float = 0.0,
                    chunked: bool = False) -> tuple[mx.array, mx.array]:
    """(sum of per-token cross-entropy over target tokens, number of target tokens)."""
    rows = row_logps(model, tokens, mask, segments, label_smoothing > 0, chunked)
    per_row = rows.logps if not label_smoothing else \
        (1 - label_smoothing) * rows.logps + label_smoothing * rows.smooth
    return -per_row.sum(), rows.tokens.sum()


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The base model for the block: every LoRA/DoRA layer's scale set to 0 (and a DoRA
    layer's magnitude to its base weight's row norms, which is what it starts from).
    Python attributes, so inside a compiled step the reference pass is traced as the
    base model; the adapter's arrays are untouched."""
    saved = []
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_a") and hasattr(layer, "scale"):
            saved.append((layer, layer.scale, layer.get("m")))
            layer.scale = 0.0
            if layer.get("m") is not None:  # DoRA
                weight = layer._dequantized_weight()
                layer.m = mx.stop_gradient(mx.linalg.norm(weight.astype(mx.float32), axis=1)
                                           ).astype(layer.m.dtype)
    try:
        yield
    finally:
        for layer, scale, magnitude in saved:
            layer.scale = scale
            if magnitude is not None:
                layer.m = magnitude


def reference_logps(model: nn.Module, arrays: dict[str, mx.array],
                    chunked: bool = False) -> RowLogps:
    """The reference policy's row log-probs: precomputed ones carried by the batch, else
    the model with its adapter off; never differentiated."""
    if "ref_logps" in arrays:
        return RowLogps(arrays["ref_logps"], arrays["mask"][:, 1:].sum(axis=-1))
    with adapter_off(model):
        ref = row_logps(model, arrays["tokens"], arrays["mask"], chunked=chunked)
    return RowLogps(mx.stop_gradient(ref.logps), ref.tokens)


def objective_terms(model: nn.Module, config: StepConfig,
                    arrays: dict[str, mx.array]) -> tuple[LossTerms, mx.array]:
    """The objective's sums for one micro-batch, and its target tokens."""
    if "labels" in arrays:
        return kto_terms(model, config, arrays)
    smooth = config.label_smoothing > 0 and not config.objective.needs_reference
    policy = row_logps(model, arrays["tokens"], arrays["mask"], arrays.get("segments"), smooth,
                       config.chunked_loss)
    reference = reference_logps(model, arrays, config.chunked_loss) \
        if config.objective.needs_reference else None
    terms = config.objective.loss(ops, policy, reference, config.settings)
    return terms, policy.tokens.sum()


def kto_terms(model: nn.Module, config: StepConfig,
              arrays: dict[str, mx.array]) -> tuple[LossTerms, mx.array]:
    """KTO's sums: rows 0..n-1 are the n examples, rows n..2n-1 their KL rows, which feed
    only the detached baseline. They get their own forward behind a stop_gradient, so
    the backward never runs through them (TRL computes them under no_grad); the
    reference scores all 2n rows at once."""
    tokens, mask, n = arrays["tokens"], arrays["mask"], arrays["labels"].shape[0]
    policy = row_logps(model, tokens[:n], mask[:n], chunked=config.chunked_loss)
    kl = row_logps(model, tokens[n:], mask[n:], chunked=config.chunked_loss)
    kl = RowLogps(mx.stop_gradient(kl.logps), kl.tokens)
    reference, reference_kl = reference_logps(model, arrays, config.chunked_loss).halves()
    terms = config.objective.loss(ops, policy, reference, config.settings,
                                  labels=arrays["labels"], kl=kl, reference_kl=reference_kl)
    return terms, policy.tokens.sum() + kl.tokens.sum()


def loss_and_aux(model: nn.Module, config: StepConfig, arrays: dict[str, mx.array],
                 names: list[str]) -> tuple[mx.array, mx.array]:
    """What ``nn.value_and_grad`` differentiates: (loss_sum, aux), aux = one vector of
    count, target tokens, then each metric's sum and count (their names are written into
    ``names`` while the step is traced). One vector, not a tree: mx.compile (0.32) fails
    with "_Map_base::at" when two auxiliary outputs of a value_and_grad are the same
    computation, as sft's count and target tokens are."""
    terms, tokens = objective_terms(model, config, arrays)
    names[:] = list(terms.metrics)
    values = [terms.count, tokens, *(v for pair in terms.metrics.values() for v in pair)]
    return terms.loss_sum, mx.stack([as_f32(v) for v in values])


def as_f32(value: Any) -> mx.array:
    """A sum or count as a float32 array (an objective may count with Python numbers)."""
    return mx.array(value).astype(mx.float32) if not isinstance(value, mx.array) \
        else value.astype(mx.float32)


def eval_sums(model: nn.Module, tokens: mx.array, mask: mx.array,
              segments: mx.array | None = None, chunked: bool = False) -> mx.array:
    """sft's evaluation sums over target tokens, one vector: loss_sum, tokens, then
    (sum, tokens) of each of ``TOKEN_METRICS``."""
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    n = weights.sum()
    if chunked:
        body, head = chunked_loss.split_model(model)
        stats = chunked_loss.token_eval_stats(forward(model, inputs, seg, body), head, targets)
        return mx.stack([-(stats["logp"] * weights).sum(), n,
                         *(v for key in ("correct", "confidence", "entropy")
                           for v in ((stats[key] * weights).sum(), n))])
    logits = forward(model, inputs, seg).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logprobs)
    ce = -mx.take_along_axis(logprobs, targets[..., None], axis=-1).squeeze(-1)
    correct = (mx.argmax(logits, axis=-1) == targets).astype(mx.float32)
    confidence = mx.max(probs, axis=-1)
    entropy = -(probs * logprobs).sum(axis=-1)
    return mx.stack([(ce * weights).sum(), n, (correct * weights).sum(), n,
                     (confidence * weights).sum(), n, (entropy * weights).sum(), n])


def objective_eval(model: nn.Module, config: StepConfig,
                   arrays: dict[str, mx.array]) -> tuple[mx.array, tuple[str, ...]]:
    """A preference objective's evaluation sums as one vector (loss_sum, count, then each
    metric's sum and count; see ``EvalResult``), and the metric names."""
    terms, _ = objective_terms(model, config, arrays)
    values = [terms.loss_sum, terms.count, *(v for pair in terms.metrics.values() for v in pair)]
    return mx.stack([as_f32(v) for v in values]), tuple(terms.metrics)
