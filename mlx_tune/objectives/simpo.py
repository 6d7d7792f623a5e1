"""SimPO (Meng et al. 2024): a length-normalised margin with no reference model.

On length-averaged completion log-probs ``a_c``, ``a_r`` and ``z = beta * (a_c - a_r) -
simpo_gamma``, per pair ``loss = -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)``:
TRL's CPOTrainer with ``loss_type="simpo"`` and ``cpo_alpha=0`` (pure SimPO, as TRL
documents it; CPO's default ``cpo_alpha`` 1 would add a behaviour-cloning NLL). TRL's
CPOConfig beta default is 0.1, kept here; the SimPO paper uses beta 2 to 10 with gamma
around 0.5 to 1.6 times beta, so set beta for SimPO. Rewards are ``beta * a`` (so
``logps/*`` are the averages), as TRL logs them.
"""

from __future__ import annotations

from mlx_tune.objectives.base import (ArrayOps, LossTerms, Objective, PreferenceSettings,
                                      RowLogps, pair_count, reward_metrics)


def simpo_loss(ops: ArrayOps, policy: RowLogps, reference: RowLogps | None,
               settings: PreferenceSettings) -> LossTerms:
    chosen, rejected = policy.halves()
    chosen_avg, rejected_avg = chosen.mean_logps(ops), rejected.mean_logps(ops)
    beta, ls = settings.beta, settings.label_smoothing
    z = beta * (chosen_avg - rejected_avg) - settings.simpo_gamma
    losses = -(1.0 - ls) * ops.log_sigmoid(z) - ls * ops.log_sigmoid(-z)
    metrics = reward_metrics(ops, beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
    return LossTerms(loss_sum=ops.sum(losses), count=pair_count(ops, chosen), metrics=metrics)


SIMPO = Objective(name="simpo", rows_per_example=2, needs_reference=False, loss_fn=simpo_loss,
                  settings_used=("beta", "simpo_gamma", "label_smoothing"))
