"""Cross-entropy over chunks of positions, so full-vocabulary logits never exist at once.

The loss of a micro-batch needs, per target token, log p(target) (and, for label
smoothing, the mean over the vocabulary of log p). Computed the plain way, the output
head writes B x T x vocab float32 logits, and the backward pass holds several arrays of
that size: with a 32k vocabulary at 4 x 2048 tokens that is 1 GB each, often the largest
item of a LoRA step. Here the final hidden states are split into chunks of positions
(~``CHUNK_LOGITS`` logits each) and each chunk's logits are reduced to per-token scalars
at once, two ways:

* a frozen head (LoRA, QLoRA, DoRA; the default path): the chunk also computes its
  hidden-state gradient (onehot - softmax through the head's own backward) and keeps
  only that, so the backward pass recomputes nothing and costs what the unchunked one
  does;
* a trained head (full fine-tuning): ``mx.checkpoint`` per chunk, which recomputes the
  head's product in the backward pass and gives the head its gradient. Under
  ``mx.compile`` the compiler merges that recomputation with the forward's product, so
  about one copy of the logits stays alive (measured: tests/model); still a quarter of
  the unchunked loss's copies.

MLX runs ahead of the arrays it frees, so some chunks overlap: the measured peak of the
loss is about twice the full logits for a few chunks and ~17 chunks' logits for many
(tests/model/test_chunked_loss_memory.py, the planner's chunked term). The results equal
the unchunked computation up to float rounding (tests/unit/backends).

The head is the model's own module (``lm_head``, quantized, or the tied embedding's
``as_linear``), so whatever its backward is, the chunks use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tune.backends.common import CHUNK_LOGITS, chunk_positions  # noqa: F401

# mlx-lm model types whose forward is exactly ``head(body(inputs))``: no logit scaling
# or soft-capping after the head, so the chunked loss sees the logits the model returns.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


@dataclass(frozen=True)
class OutputHead:
    """The model's output projection: ``lm_head``, or the tied embedding as a linear map."""

    module: nn.Module
    tied: bool
    vocab: int

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.module.as_linear(hidden) if self.tied else self.module(hidden)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "args", None), "model_type", None) or \
        getattr(model, "model_type", None)


def supports(model: nn.Module) -> bool:
    """Whether ``split_model`` knows where this model's logits come from."""
    return model_type(model) in PLAIN_HEAD_MODELS


def split_model(model: nn.Module) -> tuple[Callable[..., mx.array], OutputHead]:
    """(body, head) of an mlx-lm causal LM: ``body(inputs, cache)`` returns the final
    (normed) hidden states and ``head`` maps them to logits, as ``model(inputs)`` does."""
    args = getattr(model, "args", None)
    if not supports(model):
        raise ValueError(f"memory.chunked_loss: model type '{model_type(model)}' is not supported "
                         f"(expected one of {', '.join(sorted(PLAIN_HEAD_MODELS))}); "
                         "set memory.chunked_loss: false")
    tied = bool(getattr(args, "tie_word_embeddings", False))
    module = model.model.embed_tokens if tied else model.lm_head
    return model.model, OutputHead(module, tied, int(args.vocab_size))


def _chunks(n: int, size: int) -> list[int]:
    """Split points of ``n`` positions into chunks of ``size`` (the last may be shorter)."""
    return list(range(size, n, size))


def token_logps(hidden: mx.array, head: OutputHead, targets: mx.array, *,
                smooth: bool = False, chunk: int | None = None
                ) -> tuple[mx.array, mx.array | None]:
    """Per-token log p(target) [B, T] in float32 and, when ``smooth``, the mean over the
    vocabulary of log p [B, T] (the label-smoothing term); else None.

    ``hidden`` [B, T, H] are the final hidden states, ``targets`` [B, T] the next tokens.
    A frozen head (LoRA, QLoRA, DoRA) takes ``_direct_chunk``: the gradient with respect
    to the hidden states is computed with the forward, nothing is recomputed. A trained
    head (full fine-tuning) takes ``_checkpointed_chunk``, which also gives its gradient.
    """
    B, T, H = hidden.shape
    n = B * T
    size = chunk or chunk_positions(head.vocab)
    points = _chunks(n, size)
    # split (not slicing): its gradient is one concatenation, where each slice's would be
    # a full-size array of zeros per chunk.
    hs = mx.split(hidden.reshape(n, H), points, axis=0)
    ys = mx.split(mx.stop_gradient(targets).reshape(n), points, axis=0)
    params = head.module.trainable_parameters()
    if tree_flatten(params):
        step = mx.checkpoint(partial(_checkpointed_chunk, head, smooth))
        outs = [step(params, h, y) for h, y in zip(hs, ys)]
    else:
        step = _direct_chunk(head, smooth)
        outs = [step(h, y) for h, y in zip(hs, ys)]
    logp = mx.concatenate([o[0] for o in outs]).reshape(B, T)
    if not smooth:
        return logp, None
    return logp, mx.concatenate([o[1] for o in outs]).reshape(B, T)


def _logits(head: OutputHead, h: mx.array) -> mx.array:
    return head(h).astype(mx.float32)


def _checkpointed_chunk(head: OutputHead, smooth: bool, params: dict, h: mx.array,
                        y: mx.array) -> tuple[mx.array, ...]:
    head.module.update(params)
    y = mx.stop_gradient(y)  # integer targets: the checkpoint would ask for their gradient
    logits = _logits(head, h)
    lse = mx.logsumexp(logits, axis=-1)
    logp = mx.take_along_axis(logits, y[:, None], axis=-1).squeeze(-1) - lse
    return (logp, logits.mean(axis=-1) - lse) if smooth else (logp,)


def _direct_chunk(head: OutputHead, smooth: bool) -> Callable[..., tuple[mx.array, ...]]:
    """A chunk whose backward needs no logits: d log p(y) / dz = onehot(y) - softmax(z),
    so the forward also takes it through the head's own input gradient (``mx.vjp``: plain,
    quantized or tied, the module's backward) and keeps only that [positions, hidden]
    result, hidden/vocab of the logits' size. The backward scales it by the
    incoming per-token cotangent. (No recomputation: under ``mx.compile`` a recomputed
    head product could be merged with the forward's and keep its logits alive after all.)
    """

    @mx.custom_function
    def chunk(h: mx.array, y: mx.array):
        logits = _logits(head, h)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        probs = mx.exp(logits - lse)
        logp = mx.take_along_axis(logits, y[:, None], axis=-1).squeeze(-1) - lse.squeeze(-1)
        onehot = (mx.arange(head.vocab)[None] == y[:, None]).astype(mx.float32)
        grad_of = partial(mx.vjp, partial(_logits, head), [h])
        outs = (logp, grad_of([onehot - probs])[1][0])
        if smooth:
            mean_logp = logits.mean(axis=-1) - lse.squeeze(-1)
            outs += (mean_logp, grad_of([1.0 / head.vocab - probs])[1][0])
        return tuple(mx.stop_gradient(o) for o in outs)

    @chunk.vjp
    def chunk_vjp(primals, cotangents, outputs):
        h, y = primals
        dh = cotangents[0][:, None] * outputs[1]
        if smooth:
            dh = dh + cotangents[2][:, None] * outputs[3]
        return dh.astype(h.dtype), mx.zeros_like(y)

    def logps(h: mx.array, y: mx.array) -> tuple[mx.array, ...]:
        outs = chunk(h, y)
        return (outs[0], outs[2]) if smooth else (outs[0],)

    return logps


def token_eval_stats(hidden: mx.array, head: OutputHead, targets: mx.array, *,
                     chunk: int | None = None) -> dict[str, mx.array]:
    """Per-token evaluation statistics [B, T], chunk by chunk (no gradient):
    ``logp`` (log p of the target), ``correct`` (argmax == target, 0/1), ``confidence``
    (the largest probability) and ``entropy`` of the predicted distribution."""
    B, T, H = hidden.shape
    n = B * T
    points = _chunks(n, chunk or chunk_positions(head.vocab))
    fields: dict[str, list[mx.array]] = {k: [] for k in
                                         ("logp", "correct", "confidence", "entropy")}
    for h, y in zip(mx.split(hidden.reshape(n, H), points), mx.split(targets.reshape(n), points)):
        logits = head(h).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        probs = mx.exp(logprobs)
        fields["logp"].append(mx.take_along_axis(logprobs, y[:, None], axis=-1).squeeze(-1))
        fields["correct"].append((mx.argmax(logits, axis=-1) == y).astype(mx.float32))
        fields["confidence"].append(probs.max(axis=-1))
        fields["entropy"].append(-(probs * logprobs).sum(axis=-1))
    return {k: mx.concatenate(v).reshape(B, T) for k, v in fields.items()}
