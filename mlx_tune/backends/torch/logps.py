"""What the torch step differentiates: the forward, per-row log-probabilities of the
target tokens, the reference pass, and the objective's sums (``backends/mlx/logps.py``,
in torch).

``row_logps`` is the one place per-token log-probabilities are computed: from the whole
logits, or, with a ``HiddenTap``, chunk by chunk of positions (``chunked_loss.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mlx_tune.backends.base import StepConfig
from mlx_tune.backends.torch.chunked_loss import HiddenTap, token_eval_stats, token_logps
from mlx_tune.backends.torch.ops import TORCH_OPS as ops
from mlx_tune.objectives.base import LossTerms, RowLogps

# Evaluation's token-level metrics (sft), as on MLX (backends/mlx/logps.py).
TOKEN_METRICS = ("accuracy", "confidence", "entropy")


def causal_logits(forward: Callable, tokens: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits predicting ``tokens[:, 1:]``, in float32.

    MLX feeds ``tokens[:, :-1]``; the model is causal, so feeding all of ``tokens`` and
    dropping the last position gives the same logits, and keeps the sequence length the
    data layer chose: T-1 is odd for every even T, and CPU flash attention ran ~1.4x
    slower at 511 than at 512 positions (GPU kernels favour aligned lengths too). This is
    also what transformers' own loss does.

    Packed rows pass ``positions`` that restart at each example: with no attention mask,
    transformers' masking utilities read restarting position ids as packed sequences and
    attend within each one only (masking_utils.find_packed_sequence_indices)."""
    if positions is None:
        return forward(input_ids=tokens, use_cache=False).logits[:, :-1].float()
    return forward(input_ids=tokens, position_ids=positions,
                   use_cache=False).logits[:, :-1].float()


def row_logps(forward: Callable, tokens: torch.Tensor, mask: torch.Tensor,
              positions: torch.Tensor | None = None, smooth: bool = False,
              tap: HiddenTap | None = None) -> RowLogps:
    """Per row: the sum of log p(target) over the target tokens, their count, and (for
    label smoothing) the sum over them of the mean log-probability of the vocabulary."""
    targets, weights = tokens[:, 1:], mask[:, 1:]
    if tap is not None:
        target, mean = token_logps(tap.hidden_states(forward, tokens, positions), tap.head,
                                   targets, vocab=tap.vocab, smooth=smooth)
    else:
        logits = causal_logits(forward, tokens, positions)
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
        mean = logits.mean(dim=-1) - lse if smooth else None
    return RowLogps((target * weights).sum(dim=-1), weights.sum(dim=-1),
                    None if mean is None else (mean * weights).sum(dim=-1))


def token_loss_sums(forward: Callable, tokens: torch.Tensor, mask: torch.Tensor,
                    label_smoothing: float = 0.0, positions: torch.Tensor | None = None,
                    tap: HiddenTap | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token cross-entropy over target tokens, number of target tokens), with
    torch's label smoothing, (1-eps)*CE + eps*mean_k(-log p_k)."""
    rows = row_logps(forward, tokens, mask, positions, label_smoothing > 0, tap)
    per_row = rows.logps if not label_smoothing else \
        (1 - label_smoothing) * rows.logps + label_smoothing * rows.smooth
    return -per_row.sum(), rows.tokens.sum()


def adapter_off(model: Any) -> Any:
    """peft's own switch: the base model for the block (what TRL's DPOTrainer uses for a
    reference without a second model)."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError("the reference policy 'adapter_off' needs a LoRA/DoRA adapter; "
                         "use 'preference.reference: precomputed'")
    return disable()


def objective_terms(forward: Callable, model: Any, config: StepConfig,
                    arrays: dict[str, torch.Tensor],
                    tap: HiddenTap | None = None) -> tuple[LossTerms, torch.Tensor]:
    """The objective's sums for one micro-batch, and its target tokens."""
    if "labels" in arrays:
        return kto_terms(forward, model, config, arrays, tap)
    smooth = config.label_smoothing > 0 and not config.objective.needs_reference
    tokens, mask = arrays["tokens"], arrays["mask"]
    policy = row_logps(forward, tokens, mask, arrays.get("positions"), smooth, tap)
    reference = reference_logps(forward, model, arrays, tap) \
        if config.objective.needs_reference else None
    terms = config.objective.loss(ops, policy, reference, config.settings)
    return terms, policy.tokens.sum()


def reference_logps(forward: Callable, model: Any, arrays: dict[str, torch.Tensor],
                    tap: HiddenTap | None = None) -> RowLogps:
    """The reference policy's row log-probs: precomputed ones carried by the batch, else
    the model with its adapter off; never differentiated."""
    tokens, mask = arrays["tokens"], arrays["mask"]
    if "ref_logps" in arrays:
        return RowLogps(arrays["ref_logps"], mask[:, 1:].sum(dim=-1))
    with torch.no_grad(), adapter_off(model):
        return row_logps(forward, tokens, mask, tap=tap)


def kto_terms(forward: Callable, model: Any, config: StepConfig,
              arrays: dict[str, torch.Tensor],
              tap: HiddenTap | None = None) -> tuple[LossTerms, torch.Tensor]:
    """KTO's sums: rows 0..n-1 are the n examples, rows n..2n-1 their KL rows, which feed
    only the detached baseline, so their forward runs under no_grad as in TRL; the
    reference scores all 2n rows at once (``backends/mlx/logps.py``, in torch)."""
    tokens, mask, n = arrays["tokens"], arrays["mask"], arrays["labels"].shape[0]
    policy = row_logps(forward, tokens[:n], mask[:n], tap=tap)
    with torch.no_grad():
        kl = row_logps(forward, tokens[n:], mask[n:], tap=tap)
    reference, reference_kl = reference_logps(forward, model, arrays, tap).halves()
    terms = config.objective.loss(ops, policy, reference, config.settings,
                                  labels=arrays["labels"], kl=kl, reference_kl=reference_kl)
    return terms, policy.tokens.sum() + kl.tokens.sum()


def eval_sums(forward: Callable, tokens: torch.Tensor, mask: torch.Tensor,
              positions: torch.Tensor | None = None,
              tap: HiddenTap | None = None) -> torch.Tensor:
    """sft's evaluation sums over target tokens, one vector: loss_sum, tokens, then
    (sum, tokens) of accuracy, confidence and entropy (``mlx.logps.TOKEN_METRICS``)."""
    targets, weights = tokens[:, 1:], mask[:, 1:]
    n = weights.sum()
    if tap is not None:
        stats = token_eval_stats(tap.hidden_states(forward, tokens, positions), tap.head,
                                 targets, vocab=tap.vocab)
        return torch.stack([-(stats["logp"] * weights).sum(), n,
                            *(v for key in ("correct", "confidence", "entropy")
                              for v in ((stats[key] * weights).sum(), n))])
    logits = causal_logits(forward, tokens, positions)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    ce = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
    correct = (logits.argmax(dim=-1) == targets).float()
    confidence = probs.max(dim=-1).values
    entropy = -(probs * logprobs).sum(dim=-1)
    return torch.stack([(ce * weights).sum(), n, (correct * weights).sum(), n,
                        (confidence * weights).sum(), n, (entropy * weights).sum(), n])


def as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A sum or count as a float32 tensor (an objective may count with Python numbers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.tensor(float(value), device=device)


def objective_eval(forward: Callable, model: Any, config: StepConfig,
                   arrays: dict[str, torch.Tensor],
                   tap: HiddenTap | None = None) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A preference objective's evaluation sums as one vector (loss_sum, count, then each
    metric's sum and count; see ``EvalResult``), and the metric names."""
    terms, _ = objective_terms(forward, model, config, arrays, tap)
    device = arrays["tokens"].device
    values = [terms.loss_sum, terms.count, *(v for pair in terms.metrics.values() for v in pair)]
    return torch.stack([as_tensor(v, device) for v in values]), tuple(terms.metrics)

