"""ORPO (Hong et al. 2024): supervised loss on the chosen completion plus an odds-ratio
term, with no reference model.

On length-averaged completion log-probs ``a_c``, ``a_r`` (TRL's ``average_log_prob``):
``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`` and per pair
``loss = nll - beta * log_sigmoid(log_odds)``, TRL's ``odds_ratio_loss`` with TRL's beta
(0.1). Metrics as TRL names them: rewards are ``beta * a`` (so ``logps/*`` are the
averages too), ``nll_loss``, ``log_odds_ratio`` (the mean log-sigmoid) and
``log_odds_chosen`` (the mean log-odds).

Where we differ from TRL, on purpose, so that the loss adds up across micro-batches:
TRL's ``nll`` is one cross-entropy mean over all tokens of the batch's chosen rows,
prompt tokens included. Ours is ``-a_c``, each chosen completion's own token mean,
summed over pairs and divided by the step's pair count. The two agree when every chosen
completion has the same length and the prompt is left out; a batch-level token mean
cannot be split into per-micro-batch sums without weighting pairs by the step's total
tokens, which no micro-batch knows. The prompt is left out because the objective sees
completion log-probs only (the ORPO paper's L_SFT is -log P(y_w | x)).
"""

from __future__ import annotations

import math

from mlx_tune.objectives.base import (Array, ArrayOps, LossTerms, Objective, PreferenceSettings,
                                      RowLogps, pair_count, reward_metrics)

MINUS_LN2 = -math.log(2.0)


def log1mexp(ops: ArrayOps, x: Array) -> Array:
    """log(1 - exp(x)) for x <= 0, TRL's two-branch form (log1p(-exp(x)) far from 0,
    log(-expm1(x)) near it). Each branch reads x clamped to its own side, so the branch
    ``where`` discards cannot put inf into the gradient (the values are TRL's)."""
    far = ops.log1p(-ops.exp(ops.minimum(x, MINUS_LN2)))
    near = ops.log(-ops.expm1(ops.maximum(x, MINUS_LN2)))
    return ops.where(x < MINUS_LN2, far, near)


def orpo_loss(ops: ArrayOps, policy: RowLogps, reference: RowLogps | None,
              settings: PreferenceSettings) -> LossTerms:
    chosen, rejected = policy.halves()
    chosen_avg, rejected_avg = chosen.mean_logps(ops), rejected.mean_logps(ops)
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(ops, chosen_avg) - log1mexp(ops, rejected_avg))
    ratio = ops.log_sigmoid(log_odds)
    nll = -chosen_avg
    beta = settings.beta
    metrics = reward_metrics(ops, beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
    n = pair_count(ops, chosen)
    sg = ops.stop_gradient
    metrics.update({"nll_loss": (ops.sum(sg(nll)), n), "log_odds_ratio": (ops.sum(sg(ratio)), n),
                    "log_odds_chosen": (ops.sum(sg(log_odds)), n)})
    return LossTerms(loss_sum=ops.sum(nll - beta * ratio), count=n, metrics=metrics)


ORPO = Objective(name="orpo", rows_per_example=2, needs_reference=False, loss_fn=orpo_loss,
                 settings_used=("beta",))
