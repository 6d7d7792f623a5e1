"""Supervised fine-tuning: token-weighted cross-entropy over the target tokens.

With label smoothing epsilon, each token's loss is
``-(1 - epsilon) * log p(target) - epsilon * mean_v log p(v)`` (mlx's and torch's
``cross_entropy(label_smoothing=...)`` alike), summed over tokens; the denominator is
the number of target tokens, so the step's loss is the mean per target token.
"""

from __future__ import annotations

from mlx_tune.objectives.base import ArrayOps, LossTerms, Objective, PreferenceSettings, RowLogps


def sft_loss(ops: ArrayOps, policy: RowLogps, reference: RowLogps | None,
             settings: PreferenceSettings) -> LossTerms:
    epsilon = settings.label_smoothing
    if epsilon == 0.0:
        token_logps = policy.logps
    elif policy.smooth is None:
        raise ValueError("label_smoothing: the step passed no vocabulary-mean log-probs")
    else:
        token_logps = (1.0 - epsilon) * policy.logps + epsilon * policy.smooth
    return LossTerms(loss_sum=-ops.sum(token_logps), count=ops.sum(policy.tokens))


SFT = Objective(name="sft", rows_per_example=1, needs_reference=False, loss_fn=sft_loss,
                settings_used=("label_smoothing",))
