"""The compiled MLX training step, readable in one sitting.

One optimizer step = forward + backward of the first micro-batch (``first``), of each
further one, adding up gradients and sums (``more``), then one ``update``. The three
are ``mx.compile``d over the model, optimizer, RNG and EMA state, and the step is
queued with no host sync: the loss, counts, metrics, gradient norm and the finite flag
come back as lazy scalars the loop reads only at report time. What is differentiated
(row log-probs, the reference pass, the objective's loss) is ``logps.py``.

Why the loss is a *sum*: gradients of loss sums add up exactly across micro-batches
(and ranks), and one division by the step's total count (target tokens for sft, pairs
for a paired objective) at the end gives the mean. So 2 x batch 4 equals batch 8, up
to float rounding, however the tokens fall between the micro-batches. The objective's
metrics travel the same way, each as a (sum, count) pair.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from mlx_tune.backends.base import StepConfig
from mlx_tune.backends.mlx.collectives import all_sum_packed
from mlx_tune.backends.mlx.logps import (TOKEN_METRICS, SegmentMask, eval_sums, forward,
                                         loss_and_aux, objective_eval, row_logps,
                                         token_loss_sums)

__all__ = ["CompiledStep", "SegmentMask", "eval_sums", "forward", "make_optimizer",
           "row_logps", "token_loss_sums"]


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
        # The objective's metric names, in the order of the step's sums vector.
        self.metric_names: list[str] = []
        loss_and_grad = nn.value_and_grad(
            model, partial(loss_and_aux, model, config, names=self.metric_names))

        # The step's sums travel as one vector: loss_sum, count, target tokens, then each
        # metric's (sum, count); they add up across micro-batches and ranks like gradients.
        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def first(arrays):  # tokens, mask, and segments (packed) or ref_logps (precomputed)
            (loss_sum, aux), grads = loss_and_grad(arrays)
            return grads, mx.concatenate([loss_sum[None], aux])

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def more(grads, sums, arrays):
            (loss_sum, aux), g = loss_and_grad(arrays)
            return tree_map(mx.add, grads, g), sums + mx.concatenate([loss_sum[None], aux])

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(grads, sums, noise_std):
            return self._update(grads, sums, noise_std)

        self._first, self._more, self._update_fn = first, more, update
        self._inflight: mx.array | None = None
        # Every (rows, width) the compiled functions were called with: mx.compile keeps a
        # trace per input shape and never evicts it, so this is what a long run holds.
        self.shapes: set[tuple[int, ...]] = set()
        # sft evaluates token metrics from the whole distribution; other objectives their
        # own metrics, whose names are read while the evaluation is traced.
        self.eval_names: tuple[str, ...] = TOKEN_METRICS
        if config.objective.name == "sft":
            self._eval = mx.compile(lambda a: eval_sums(model, a["tokens"], a["mask"],
                                                        a.get("segments"),
                                                        chunked=config.chunked_loss),
                                    inputs=[model.state])
        else:
            def evaluate(arrays):
                vector, self.eval_names = objective_eval(model, config, arrays)
                return vector
            self._eval = mx.compile(evaluate, inputs=[model.state])

    def _update(self, grads, sums, noise_std):
        cfg = self.config
        if cfg.world_size > 1:
            # Data parallel: every rank adds its sums; the division below makes the
            # result the mean over the *global* batch's count.
            # One packed collective: a dead peer then raises instead of hanging the ring.
            grads, sums = all_sum_packed((grads, sums))[0]
        loss_sum, count, ntok, metrics = sums[0], sums[1], sums[2], sums[3:]
        denom = mx.maximum(count, 1.0)
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
        return loss_sum / denom, ntok, norm, finite, count, metrics

    def __call__(self, micro_batches: list[dict[str, mx.array]], lr: float,
                 noise_std: float) -> tuple:
        """(loss, target tokens, grad norm, finite, count, metrics), all lazy; metrics is
        one vector of each of ``metric_names``' sum and count."""
        # Set outside the compiled graph: the value is an input array, so a new
        # learning rate each step never triggers a recompile.
        self.optimizer.learning_rate = lr
        self.shapes.update(tuple(b["tokens"].shape) for b in micro_batches)
        grads, sums = self._first(micro_batches[0])
        for batch in micro_batches[1:]:
            grads, sums = self._more(grads, sums, batch)
        out = self._update_fn(grads, sums, mx.array(noise_std, dtype=mx.float32))
        # Queue this step and wait only for the previous one: the next batch is prepared
        # while this step computes, and the host never runs more than one step ahead.
        mx.async_eval(self.state, out)
        if self._inflight is not None:
            mx.eval(self._inflight)
        self._inflight = out[0]
        return out

    def eval_batch(self, arrays: dict[str, mx.array]) -> mx.array:
        """Evaluation sums as one vector: loss_sum, count, then (sum, count) of each
        metric named in ``eval_names``."""
        self.shapes.add(tuple(arrays["tokens"].shape))
        return self._eval(arrays)


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
