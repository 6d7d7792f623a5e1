"""DPO (Rafailov et al. 2023) and its TRL loss types, on sequence log-prob sums.

With log-ratios against the reference ``chosen = logp_c - ref_c`` and
``rejected = logp_r - ref_r``, and ``delta = chosen - rejected``, per pair:

- ``sigmoid``: ``-(1 - ls) * log_sigmoid(beta * delta) - ls * log_sigmoid(-beta * delta)``.
  At ``label_smoothing`` 0 this is TRL 1.16's DPOTrainer "sigmoid". With ls > 0 it is
  conservative DPO, the form TRL's DPO "sigmoid" had before 1.0 and its CPOTrainer's
  "sigmoid" still has; TRL 1.16's DPO "sigmoid" ignores label_smoothing (it moved to
  "robust" and "exo_pair"), and we would rather honour a key than ignore it.
- ``robust``: ``((1 - ls) * -log_sigmoid(beta * delta) + ls * log_sigmoid(-beta * delta))
  / (1 - 2 ls)``, TRL's robust DPO (ls in [0, 0.5)).
- ``hinge``: ``relu(1 - beta * delta)`` (SLiC).
- ``ipo``: ``(chosen / n_c - rejected / n_r - 1 / (2 beta))^2`` with the completion token
  counts n, TRL's length-normalised IPO.

Rewards are ``beta * log-ratio`` (detached), as TRL logs them. TRL takes the mean over
the batch's pairs; we return the sum and the pair count, so under accumulation and
across ranks the step's loss is the mean over *all* its pairs, the same as TRL's at
accumulation 1 (TRL at accumulation k averages k micro-batch means, equal when the
micro-batches have the same number of pairs).
"""

from __future__ import annotations

from mlx_tune.objectives.base import (ArrayOps, LossTerms, Objective, PreferenceSettings,
                                      RowLogps, pair_count, reward_metrics)


def dpo_loss(ops: ArrayOps, policy: RowLogps, reference: RowLogps,
             settings: PreferenceSettings) -> LossTerms:
    chosen, rejected = policy.halves()
    ref_chosen, ref_rejected = reference.halves()
    chosen_ratio = chosen.logps - ops.stop_gradient(ref_chosen.logps)
    rejected_ratio = rejected.logps - ops.stop_gradient(ref_rejected.logps)
    beta, ls = settings.beta, settings.label_smoothing
    z = beta * (chosen_ratio - rejected_ratio)
    kind = DPO.loss_type(settings)
    if kind == "sigmoid":
        losses = -(1.0 - ls) * ops.log_sigmoid(z) - ls * ops.log_sigmoid(-z)
    elif kind == "robust":
        losses = (-(1.0 - ls) * ops.log_sigmoid(z) + ls * ops.log_sigmoid(-z)) / (1.0 - 2.0 * ls)
    elif kind == "hinge":
        losses = ops.relu(1.0 - z)
    elif kind == "ipo":
        per_token = (chosen_ratio / ops.maximum(chosen.tokens, 1.0)
                     - rejected_ratio / ops.maximum(rejected.tokens, 1.0))
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: DPO takes one of {', '.join(DPO.loss_types)}, got '{kind}'")
    metrics = reward_metrics(ops, beta * chosen_ratio, beta * rejected_ratio,
                             chosen.logps, rejected.logps)
    return LossTerms(loss_sum=ops.sum(losses), count=pair_count(ops, chosen), metrics=metrics)


DPO = Objective(name="dpo", rows_per_example=2, needs_reference=True, loss_fn=dpo_loss,
                settings_used=("beta", "loss_type", "label_smoothing"),
                loss_types=("sigmoid", "ipo", "hinge", "robust"))
