"""KTO (Ethayarajh et al. 2024): unpaired desirable/undesirable completions against a KL
baseline, TRL's ``loss_type="kto"``.

Rows are single examples with ``labels`` (1.0 desirable, 0.0 undesirable). The KL
baseline comes from mismatched rows, a second row per example in the batch (each prompt
with another example's completion, fixed before training by data/unpaired.py as TRL
fixes them when it prepares its dataset), passed as ``kl`` and
``reference_kl``: ``z0 = max(mean(kl - reference_kl), 0)``, detached. With the
log-ratio ``r = logp - ref``, per example:
desirable ``desirable_weight * (1 - sigmoid(beta * (r - z0)))``,
undesirable ``undesirable_weight * (1 - sigmoid(beta * (z0 - r)))``; the loss is their
sum over examples divided by the example count (TRL's ``nanmean``).

Metrics: ``rewards/chosen`` and ``logps/chosen`` over desirable examples,
``rewards/rejected`` and ``logps/rejected`` over undesirable ones (TRL's sums over
counts), ``kl`` as the baseline the loss used. KTO has no pairs, so there is no
``rewards/margins`` as a sum over a count (TRL logs the difference of the two means);
``rewards/accuracies``, which TRL does not log for KTO, is ours: the fraction of
examples on the side of the baseline their label asks for (``r > z0`` desirable,
``r < z0`` undesirable), the unpaired counterpart of the paired accuracy.

How this differs from TRL beyond accumulation 1: the baseline is a batch-level
quantity. TRL computes it per micro-batch and averages it across ranks before the loss;
ours is per micro-batch and per rank (the loss is computed before any collective), so
with several ranks each rank uses its own micro-batch's estimate. Under accumulation
both are per micro-batch. The ``kl`` metric is each micro-batch's clamped baseline,
averaged over micro-batches (``count`` 1 each), like TRL's logged ``kl``.
"""

from __future__ import annotations

from mlx_tune.objectives.base import ArrayOps, LossTerms, Objective, PreferenceSettings, RowLogps


def kto_loss(ops: ArrayOps, policy: RowLogps, reference: RowLogps, settings: PreferenceSettings,
             *, labels, kl: RowLogps, reference_kl: RowLogps) -> LossTerms:
    sg = ops.stop_gradient
    desirable = ops.float32(labels)
    undesirable = 1.0 - desirable
    kl_rows = sg(ops.float32(kl.logps) - ops.float32(reference_kl.logps))
    baseline = ops.maximum(ops.sum(kl_rows) / ops.sum(ops.ones_like(kl_rows)), 0.0)
    ratio = policy.logps - sg(reference.logps)
    beta = settings.beta
    losses = (settings.desirable_weight * desirable * (1.0 - ops.sigmoid(beta * (ratio - baseline)))
              + settings.undesirable_weight * undesirable
              * (1.0 - ops.sigmoid(beta * (baseline - ratio))))
    rewards = beta * sg(ratio)
    logps = sg(policy.logps)
    n_desirable, n_undesirable = ops.sum(desirable), ops.sum(undesirable)
    correct = desirable * ops.float32(ratio > baseline) + undesirable * ops.float32(ratio < baseline)
    examples = ops.sum(ops.ones_like(ratio))
    metrics = {
        "rewards/chosen": (ops.sum(desirable * rewards), n_desirable),
        "rewards/rejected": (ops.sum(undesirable * rewards), n_undesirable),
        "rewards/accuracies": (ops.sum(sg(correct)), examples),
        "logps/chosen": (ops.sum(desirable * logps), n_desirable),
        "logps/rejected": (ops.sum(undesirable * logps), n_undesirable),
        "kl": (baseline, ops.sum(ops.ones_like(baseline))),
    }
    return LossTerms(loss_sum=ops.sum(losses), count=examples, metrics=metrics)


KTO = Objective(name="kto", rows_per_example=1, needs_reference=True, loss_fn=kto_loss,
                settings_used=("beta", "desirable_weight", "undesirable_weight"))
