"""Supervised fine-tuning: token-weighted cross-entropy over the target tokens, with
label smoothing (torch's (1-eps)*CE + eps*mean_k(-log p_k), term for term)."""

from __future__ import annotations

from typing import Any, Optional

from mlx_tune.objectives.base import ArrayOps, LossTerms, Objective, PreferenceSettings, RowLogps


def sft_loss(ops: ArrayOps, policy: RowLogps, reference: Optional[RowLogps],
             settings: PreferenceSettings, **extra: Any) -> LossTerms:
    eps = settings.label_smoothing
    per_row = policy.logps if not eps else (1 - eps) * policy.logps + eps * policy.smooth
    return LossTerms(loss_sum=-ops.sum(per_row), count=ops.sum(policy.tokens))


SFT = Objective("sft", rows_per_example=1, needs_reference=False, loss=sft_loss)
