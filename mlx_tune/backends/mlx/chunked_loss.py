"""Cross-entropy over chunks of positions, so full-vocabulary logits never exist at once.

The loss of a micro-batch needs, per target token, log p(target) (and, for label
smoothing, the mean over the vocabulary of log p). Computed the plain way, the output
head writes B x T x vocab float32 logits, and the backward pass holds several arrays of
that size: with a 32k vocabulary at 4 x 2048 tokens that is 1 GB each, often the largest
item of a LoRA step. Here the final hidden states are split into chunks of positions;
each chunk's logits are reduced to per-token scalars at once, and ``mx.checkpoint``
recomputes them in the backward pass instead of keeping them. The price is one more
forward of the output head (a small share of a deep model's step: see
``benchmarks/memory.py``); the chunk size bounds the logits alive to ~``CHUNK_LOGITS``
elements. The results equal the unchunked computation up to float rounding (tests).

The head is the model's own module (``lm_head``, LoRA-wrapped or quantized, or the tied
embedding's ``as_linear``): its trainable parameters pass through the checkpoint as
inputs, so a trained head gets its gradient too (as mlx-lm's ``grad_checkpoint`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

CHUNK_LOGITS = 1 << 23  # logits elements per chunk: 32 MB in float32
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


def split_model(model: nn.Module) -> tuple[Callable[..., mx.array], OutputHead]:
    """(body, head) of an mlx-lm causal LM: ``body(inputs, cache)`` returns the final
    (normed) hidden states and ``head`` maps them to logits, as ``model(inputs)`` does."""
    args = getattr(model, "args", None)
    model_type = getattr(args, "model_type", None) or getattr(model, "model_type", None)
    if model_type not in PLAIN_HEAD_MODELS:
        raise ValueError(f"memory.chunked_loss: model type '{model_type}' is not supported "
                         f"(expected one of {', '.join(sorted(PLAIN_HEAD_MODELS))}); "
                         "set memory.chunked_loss: false")
    tied = bool(getattr(args, "tie_word_embeddings", False))
    module = model.model.embed_tokens if tied else model.lm_head
    return model.model, OutputHead(module, tied, int(args.vocab_size))


def chunk_positions(vocab: int, chunk_logits: int = CHUNK_LOGITS) -> int:
    """Positions per chunk: ~``chunk_logits`` logits, at least one position."""
    return max(1, chunk_logits // vocab)


def _chunks(n: int, size: int) -> list[int]:
    """Split points of ``n`` positions into chunks of ``size`` (the last may be shorter)."""
    return list(range(size, n, size))


def token_logps(hidden: mx.array, head: OutputHead, targets: mx.array, *,
                smooth: bool = False, chunk: int | None = None
                ) -> tuple[mx.array, mx.array | None]:
    """Per-token log p(target) [B, T] in float32 and, when ``smooth``, the mean over the
    vocabulary of log p [B, T] (the label-smoothing term); else None.

    ``hidden`` [B, T, H] are the final hidden states, ``targets`` [B, T] the next tokens.
    """
    B, T, H = hidden.shape
    n = B * T
    size = chunk or chunk_positions(head.vocab)
    params = head.module.trainable_parameters()

    def one_chunk(params, h, y):
        head.module.update(params)
        logits = head(h).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1)
        y = mx.stop_gradient(y)  # integer targets: no gradient (checkpoint would ask)
        logp = mx.take_along_axis(logits, y[:, None], axis=-1).squeeze(-1) - lse
        return (logp, logits.mean(axis=-1) - lse) if smooth else (logp,)

    step = mx.checkpoint(one_chunk)
    points = _chunks(n, size)
    # split (not slicing): its gradient is one concatenation, where each slice's would be
    # a full-size array of zeros per chunk.
    hs = mx.split(hidden.reshape(n, H), points, axis=0)
    ys = mx.split(targets.reshape(n), points, axis=0)
    outs = [step(params, h, y) for h, y in zip(hs, ys)]
    logp = mx.concatenate([o[0] for o in outs]).reshape(B, T)
    if not smooth:
        return logp, None
    return logp, mx.concatenate([o[1] for o in outs]).reshape(B, T)


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
