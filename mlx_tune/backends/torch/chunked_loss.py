"""Cross-entropy over chunks of positions on torch: the twin of ``backends/mlx/chunked_loss.py``.

Each chunk of final hidden states goes through the output head and is reduced to
per-token scalars at once; ``torch.utils.checkpoint`` recomputes the chunk's logits in
the backward pass instead of keeping them, so at most ~``CHUNK_LOGITS`` logits exist at
a time instead of B x T x vocab (times the copies softmax's backward holds).

The hidden states come from a forward hook on the decoder body (``HiddenTap``): the step
still calls the model through its (maybe DDP-wrapped, maybe compiled) forward, asking the
head for the last position only (``logits_to_keep``), so DDP's gradient hooks and
torch.compile see the call they always see.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from mlx_tune.backends.common import CHUNK_LOGITS, chunk_positions  # noqa: F401

# transformers model types whose logits are exactly ``lm_head(decoder(...))``: no scaling
# or soft-capping after the head.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


class HiddenTap:
    """Keeps the decoder body's last output (the final, normed hidden states).

    The hook stays registered for the model's life (torch.compile traces the hooks a
    module has when it is compiled); ``take`` hands the tensor over and forgets it."""

    def __init__(self, model: torch.nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(base.config, "model_type", None)
        if model_type not in PLAIN_HEAD_MODELS:
            raise ValueError(f"memory.chunked_loss: model type '{model_type}' is not supported "
                             f"(expected one of {', '.join(sorted(PLAIN_HEAD_MODELS))}); "
                             "set memory.chunked_loss: false")
        self.head: torch.nn.Module = base.get_output_embeddings()
        self.vocab = int(base.config.vocab_size)
        self._hidden: torch.Tensor | None = None
        self.armed = False  # only the step's own forward is kept (not generation's)
        self._handle = base.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        if not self.armed:
            return
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") \
            else output[0]

    def take(self) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("the decoder's hidden states were not captured")
        return hidden

    def hidden_states(self, forward: Callable, tokens: torch.Tensor,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T-1, H] at the positions that predict ``tokens[:, 1:]``
        (all of ``tokens`` is fed, as ``step.causal_logits`` does)."""
        kwargs = {} if positions is None else {"position_ids": positions}
        # The head runs on one position only. As an index tensor, not the int 1: the
        # int's strided slice made the CPU linear segfault (torch 2.13 with the
        # preloaded OpenBLAS), the gathered copy is contiguous.
        last = torch.tensor([tokens.shape[1] - 1], device=tokens.device)
        self.armed = True
        try:
            forward(input_ids=tokens, use_cache=False, logits_to_keep=last, **kwargs)
        finally:
            self.armed = False
        return self.take()[:, :-1]


def _chunk_logps(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor,
                 smooth: bool) -> tuple[torch.Tensor, ...]:
    logits = head(h).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
    return (logp, logits.mean(dim=-1) - lse) if smooth else (logp,)


def token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *,
                vocab: int, smooth: bool = False, chunk: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target) [B, T] in float32 and, when ``smooth``, the mean over the
    vocabulary of log p [B, T]; else None."""
    B, T, H = hidden.shape
    size = chunk or chunk_positions(vocab)
    # split (not indexing): its backward is one concatenation
    hs = hidden.reshape(B * T, H).split(size)
    ys = targets.reshape(B * T).split(size)
    grad = torch.is_grad_enabled()
    outs = [checkpoint(_chunk_logps, head, h, y, smooth, use_reentrant=False) if grad
            else _chunk_logps(head, h, y, smooth) for h, y in zip(hs, ys)]
    logp = torch.cat([o[0] for o in outs]).view(B, T)
    return (logp, torch.cat([o[1] for o in outs]).view(B, T)) if smooth else (logp, None)


@torch.no_grad()
def token_eval_stats(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *,
                     vocab: int, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Per-token evaluation statistics [B, T], chunk by chunk: ``logp``, ``correct``
    (argmax == target), ``confidence`` (largest probability), ``entropy``."""
    B, T, H = hidden.shape
    size = chunk or chunk_positions(vocab)
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in
                                             ("logp", "correct", "confidence", "entropy")}
    for h, y in zip(hidden.reshape(B * T, H).split(size), targets.reshape(B * T).split(size)):
        logits = head(h).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        probs = logprobs.exp()
        fields["logp"].append(logprobs.gather(-1, y[:, None]).squeeze(-1))
        fields["correct"].append((logits.argmax(dim=-1) == y).float())
        fields["confidence"].append(probs.max(dim=-1).values)
        fields["entropy"].append(-(probs * logprobs).sum(dim=-1))
    return {k: torch.cat(v).view(B, T) for k, v in fields.items()}
