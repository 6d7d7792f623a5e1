"""The compiled MLX training step, readable in one sitting.

One optimizer step = forward + backward of the first micro-batch (``first``), of each
further one, adding up gradients and sums (``more``), then one ``update``. The three
are ``mx.compile``d over the model, optimizer, RNG and EMA state, and the step is
queued with no host sync: the loss, token count, gradient norm and the finite flag come
back as lazy scalars the loop reads only at report time.

Why the loss is a *sum*: gradients of per-token loss sums add up exactly across
micro-batches (and ranks), and one division by the step's total target tokens at
the end gives the token-weighted mean. So 2 x batch 4 equals batch 8, up to float
rounding, however the tokens fall between the micro-batches.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from mlx_tune.backends.base import EVAL_FIELDS, StepConfig
from mlx_tune.backends.mlx import chunked_loss
from mlx_tune.backends.mlx.collectives import all_sum_packed


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


def token_loss_sums(model: nn.Module, tokens: mx.array, mask: mx.array,
                    segments: mx.array | None = None, label_smoothing: float = 0.0,
                    chunked: bool = False) -> tuple[mx.array, mx.array]:
    """(sum of per-token cross-entropy over target tokens, number of target tokens);
    ``chunked``: over chunks of positions, never the whole micro-batch's logits."""
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    if chunked:
        body, head = chunked_loss.split_model(model)
        logp, smooth = chunked_loss.token_logps(forward(model, inputs, seg, body), head,
                                                targets, smooth=label_smoothing > 0)
        ce = -logp if smooth is None else -((1 - label_smoothing) * logp
                                             + label_smoothing * smooth)
        return (ce * weights).sum(), weights.sum()
    logits = forward(model, inputs, seg).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return (ce * weights).sum(), weights.sum()


def eval_sums(model: nn.Module, tokens: mx.array, mask: mx.array,
              segments: mx.array | None = None, chunked: bool = False) -> mx.array:
    """The evaluation sums over target tokens, one vector in ``EVAL_FIELDS`` order."""
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    if chunked:
        body, head = chunked_loss.split_model(model)
        stats = chunked_loss.token_eval_stats(forward(model, inputs, seg, body), head, targets)
        sums = {"loss_sum": -(stats["logp"] * weights).sum(), "tokens": weights.sum(),
                "correct": (stats["correct"] * weights).sum(),
                "confidence_sum": (stats["confidence"] * weights).sum(),
                "entropy_sum": (stats["entropy"] * weights).sum()}
        return mx.stack([sums[name] for name in EVAL_FIELDS])
    logits = forward(model, inputs, seg).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logprobs)
    ce = -mx.take_along_axis(logprobs, targets[..., None], axis=-1).squeeze(-1)
    predicted = mx.argmax(logits, axis=-1)
    confidence = mx.max(probs, axis=-1)
    entropy = -(probs * logprobs).sum(axis=-1)
    correct = (predicted == targets).astype(mx.float32)
    sums = {"loss_sum": (ce * weights).sum(), "tokens": weights.sum(),
            "correct": (correct * weights).sum(), "confidence_sum": (confidence * weights).sum(),
            "entropy_sum": (entropy * weights).sum()}
    return mx.stack([sums[name] for name in EVAL_FIELDS])


def global_norm(grads: Any) -> mx.array:
    return mx.sqrt(tree_reduce(lambda acc, g: acc + (g.astype(mx.float32) ** 2).sum(), grads,
                               mx.array(0.0)))


class CompiledStep:
    """Owns the compiled functions and the state they read and write.

    ``ema`` holds the EMA copies of the trainable weights under ``"weights"`` (it is
    empty when EMA is off); it lives in the compiled state, so its update is part of
    ``update``'s graph and costs no extra launch.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, config: StepConfig):
        self.model, self.optimizer, self.config = model, optimizer, config
        # Initialise the optimizer state up front: the finite-guard below selects between
        # the old and new state trees, which must have the same structure from step one.
        optimizer.init(model.trainable_parameters())
        self.ema: dict = {}
        if config.ema_decay is not None:
            self.ema["weights"] = tree_map(lambda p: mx.array(p), model.trainable_parameters())
        self.state = [model.state, optimizer.state, mx.random.state, self.ema]
        loss_and_grad = nn.value_and_grad(
            model, partial(token_loss_sums, label_smoothing=config.label_smoothing,
                           chunked=config.chunked_loss))

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def first(*batch):  # (tokens, mask) or, packed, (tokens, mask, segments)
            (loss_sum, ntok), grads = loss_and_grad(model, *batch)
            return grads, loss_sum, ntok

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def more(grads, loss_sum, ntok, *batch):
            (l, n), g = loss_and_grad(model, *batch)
            return tree_map(mx.add, grads, g), loss_sum + l, ntok + n

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(grads, loss_sum, ntok, noise_std):
            return self._update(grads, loss_sum, ntok, noise_std)

        self._first, self._more, self._update_fn = first, more, update
        self._inflight: mx.array | None = None
        # Every (rows, width) the compiled functions were called with: mx.compile keeps a
        # trace per input shape and never evicts it, so this is what a long run holds.
        self.shapes: set[tuple[int, ...]] = set()
        self._eval = mx.compile(partial(eval_sums, model, chunked=config.chunked_loss),
                                inputs=[model.state])

    def _update(self, grads, loss_sum, ntok, noise_std):
        cfg = self.config
        if cfg.world_size > 1:
            # Data parallel: every rank adds its sums; the division below makes the
            # result the mean over the *global* batch's target tokens.
            # One packed collective: a dead peer then raises instead of hanging the ring.
            grads, loss_sum, ntok = all_sum_packed(grads, loss_sum, ntok)
        denom = mx.maximum(ntok, 1.0)
        grads = tree_map(lambda g: g / denom.astype(g.dtype), grads)
        norm = global_norm(grads)
        finite = mx.logical_and(mx.isfinite(loss_sum), mx.isfinite(norm))
        # A non-finite step must not touch the weights or the optimizer moments:
        # zero its gradients, then keep the old state where it was non-finite.
        grads = tree_map(lambda g: mx.where(finite, g, mx.zeros_like(g)), grads)
        if cfg.grad_clip > 0:
            factor = mx.minimum(cfg.grad_clip / (norm + 1e-6), 1.0)
            factor = mx.where(finite, factor, 0.0)
            grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
        if cfg.gradient_noise:  # decided at trace time: no cost when off
            grads = tree_map(
                lambda g: g + (noise_std * mx.random.normal(g.shape)).astype(g.dtype), grads)
        params = self.model.trainable_parameters()
        old_opt = tree_map(lambda x: x, self.optimizer.state)
        new_params = self.optimizer.apply_gradients(grads, params)
        new_params = tree_map(lambda new, old: mx.where(finite, new, old), new_params, params)
        kept = tree_map(lambda new, old: mx.where(finite, new, old), self.optimizer.state, old_opt)
        # Update in place: the compiled function captured this very dict as its state.
        for key, value in kept.items():
            self.optimizer.state[key] = value
        self.model.update(new_params)
        if self.ema:
            d = cfg.ema_decay
            self.ema["weights"] = tree_map(
                lambda e, p: mx.where(finite, d * e + (1 - d) * p.astype(e.dtype), e),
                self.ema["weights"], new_params)
        return loss_sum / denom, ntok, norm, finite

    def __call__(self, micro_batches: list[tuple[mx.array, ...]], lr: float,
                 noise_std: float) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        # Set outside the compiled graph: the value is an input array, so a new
        # learning rate each step never triggers a recompile.
        self.optimizer.learning_rate = lr
        self.shapes.update(tuple(b[0].shape) for b in micro_batches)
        grads, loss_sum, ntok = self._first(*micro_batches[0])
        for batch in micro_batches[1:]:
            grads, loss_sum, ntok = self._more(grads, loss_sum, ntok, *batch)
        out = self._update_fn(grads, loss_sum, ntok, mx.array(noise_std, dtype=mx.float32))
        # Queue this step and wait only for the previous one: the next batch is prepared
        # while this step computes, and the host never runs more than one step ahead.
        mx.async_eval(self.state, out)
        if self._inflight is not None:
            mx.eval(self._inflight)
        self._inflight = out[0]
        return out

    def eval_batch(self, tokens: mx.array, mask: mx.array, *segments: mx.array) -> mx.array:
        self.shapes.add(tuple(tokens.shape))
        return self._eval(tokens, mask, *segments)


def make_optimizer(name: str, *, learning_rate: float, weight_decay: float,
                   betas: list[float], eps: float, momentum: float) -> optim.Optimizer:
    """The spec's optimizer. Adam(W) use bias correction, matching PyTorch's, so the
    same spec means the same update on both backends."""
    makers: dict[str, Callable[[], optim.Optimizer]] = {
        "adamw": lambda: optim.AdamW(learning_rate, betas=list(betas), eps=eps,
                                     weight_decay=weight_decay, bias_correction=True),
        "adam": lambda: optim.Adam(learning_rate, betas=list(betas), eps=eps,
                                   bias_correction=True),
        "sgd": lambda: optim.SGD(learning_rate, momentum=momentum, weight_decay=weight_decay),
        "adafactor": lambda: optim.Adafactor(learning_rate, relative_step=False,
                                             scale_parameter=False),
    }
    return makers[name]()
