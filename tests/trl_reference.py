"""TRL's own loss code, called on fixed per-token log-probs instead of a model.

Each TRL trainer computes its loss inside a method that also runs the model. Rather than
copying the loss formulas (a copy would agree with whatever we wrote), these helpers call
the trainer's real method, unbound, on a namespace holding the attributes that method
reads, with a stand-in model that returns the given per-token log-probs the way TRL's
fused LM head does (zero outside the completion). The gradient then flows from TRL's
loss back to the same leaf tensor our loss reads.

Where TRL's method also runs the forward (ORPO's and CPO's ``concatenated_forward``),
the forward is stood in for and the rest, ``get_batch_loss_metrics`` with the loss
method it calls, is TRL's.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import torch


class SingleProcess:
    """accelerate's gathers and device on one process: identity and CPU."""

    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


def _outputs(per_token_logps: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(per_token_logps).detach()
    return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                           is_top1=zeros.bool())


def _trainer(**attributes) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SingleProcess(), model=SimpleNamespace(training=True),
                           aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, **attributes)


def last_metrics(trainer: SimpleNamespace) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def dpo(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_logps: torch.Tensor, *,
        beta: float, loss_type: str, label_smoothing: float = 0.0):
    """TRL's ``DPOTrainer._compute_loss`` on rows [chosen..., rejected...]: ``per_token``
    [2n, T-1] policy log-probs (zero outside the completion), ``completion_mask`` [2n, T],
    ``ref_logps`` [2n] precomputed reference sums. Returns (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = per_token.shape[0] // 2
    trainer = _trainer(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                       label_smoothing=label_smoothing, use_weighting=False)
    ids = torch.zeros_like(completion_mask)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_logps[:n], "ref_rejected_logps": ref_logps[n:]}
    # The fused LM head gives 0 where the label is -100 (outside the completion).
    masked = per_token * completion_mask[:, 1:].to(per_token.dtype)
    model = lambda **kwargs: _outputs(masked)  # noqa: E731
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, last_metrics(trainer)


def _paired_forward(trainer_cls, chosen_avg, rejected_avg, nll, **attributes):
    trainer = _trainer(**attributes)
    logits = torch.zeros(chosen_avg.shape[0], 1, 1)
    trainer.concatenated_forward = lambda model, batch: (chosen_avg, rejected_avg, logits,
                                                         logits, nll)
    return trainer


def orpo(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, nll: torch.Tensor, *, beta: float):
    """TRL's ``ORPOTrainer.get_batch_loss_metrics`` (its ``odds_ratio_loss`` and the
    ``nll - mean(beta * log_sigmoid(log_odds))`` it builds) on length-averaged log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    trainer = _paired_forward(ORPOTrainer, chosen_avg, rejected_avg, nll, beta=beta)
    trainer.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, trainer)
    return ORPOTrainer.get_batch_loss_metrics(trainer, None, {})


def cpo(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, beta: float, loss_type: str,
        label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    """TRL's ``CPOTrainer.get_batch_loss_metrics`` with ``cpo_alpha`` 0 (SimPO as TRL
    documents it: ``loss_type="simpo"``, ``cpo_alpha=0``)."""
    from trl.experimental.cpo import CPOTrainer

    trainer = _paired_forward(CPOTrainer, chosen_avg, rejected_avg, torch.tensor(0.0),
                              beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              simpo_gamma=simpo_gamma, alpha=0.0, cpo_alpha=0.0)
    trainer.cpo_loss = partial(CPOTrainer.cpo_loss, trainer)
    return CPOTrainer.get_batch_loss_metrics(trainer, None, {})


def kto(per_token: torch.Tensor, kl_per_token: torch.Tensor, labels: torch.Tensor,
        ref_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """TRL's ``KTOTrainer._compute_loss`` with precomputed reference log-probs: the
    stand-in model answers the KL forward (``KL_input_ids``) with ``kl_per_token`` and
    the completion forward with ``per_token``."""
    from trl.trainer.kto_trainer import KTOTrainer

    trainer = _trainer(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                       desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trainer._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, trainer)
    rows, width = per_token.shape
    ids, kl_ids = torch.zeros(rows, width + 1, dtype=torch.long), torch.ones(rows, width + 1,
                                                                              dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.ones_like(ids), "KL_input_ids": kl_ids,
             "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": torch.ones_like(kl_ids),
             "label": labels, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}

    def model(input_ids, **kwargs):
        return _outputs(kl_per_token if input_ids is kl_ids else per_token)

    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, last_metrics(trainer)
