"""Our objectives against TRL's own loss code (tests/trl_reference.py), on fixed inputs:
the loss, its gradient with respect to the policy's per-token log-probs, and TRL's
logged metrics, for every objective and loss_type."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from mlx_tune.backends.torch.ops import TORCH_OPS  # noqa: E402
from mlx_tune.objectives import PreferenceSettings, RowLogps, get_objective  # noqa: E402
import trl_reference  # noqa: E402

PAIRS, WIDTH = 4, 9


def paired_inputs(seed: int, equal_chosen_lengths: bool = False):
    """Per-token policy log-probs [2n, T-1] (a leaf, zero outside the completion), the
    completion mask [2n, T] (prompt first, completions of different lengths), and
    reference sums [2n]. Scaled so that every loss sits away from its flat regions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, WIDTH, (2 * PAIRS,), generator=g)
    if equal_chosen_lengths:
        lengths[:PAIRS] = 5
    positions = torch.arange(WIDTH)
    completion_mask = (positions[None] >= WIDTH - lengths[:, None]).long()
    shifted = completion_mask[:, 1:].float()
    per_token = (-torch.rand(2 * PAIRS, WIDTH - 1, generator=g) * 2.0 * shifted).requires_grad_()
    ref = (per_token.detach().sum(1) + torch.randn(2 * PAIRS, generator=g)).detach()
    return per_token, completion_mask, shifted, ref


def ours(name: str, per_token, shifted, ref, settings: PreferenceSettings, **extra):
    policy = RowLogps(logps=(per_token * shifted).sum(1), tokens=shifted.sum(1))
    reference = None if ref is None else RowLogps(logps=ref, tokens=shifted.sum(1))
    terms = get_objective(name).loss(TORCH_OPS, policy, reference, settings, **extra)
    return terms.loss_sum / terms.count, {k: float(s / c) for k, (s, c) in terms.metrics.items()}


def assert_same_loss_and_grad(ours_loss, trl_loss, leaf):
    (ours_grad,) = torch.autograd.grad(ours_loss, leaf)
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf)
    assert float(ours_loss) == pytest.approx(float(trl_loss), rel=1e-6, abs=1e-7)
    assert trl_grad.abs().sum() > 0  # the comparison below is not vacuous
    torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-7)


def assert_same_metrics(ours_metrics: dict, trl_metrics: dict, names):
    for name in names:
        assert ours_metrics[name] == pytest.approx(float(trl_metrics[name]), rel=1e-5, abs=1e-6), name


PAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type,label_smoothing,beta", [
    ("sigmoid", 0.0, 0.1), ("sigmoid", 0.0, 0.5), ("hinge", 0.0, 0.1), ("hinge", 0.0, 0.5),
    ("ipo", 0.0, 0.1), ("ipo", 0.0, 0.5), ("robust", 0.2, 0.1), ("robust", 0.0, 0.3)])
def test_dpo_equals_trl_dpo_trainer(loss_type, label_smoothing, beta):
    per_token, completion_mask, shifted, ref = paired_inputs(seed=1)
    settings = PreferenceSettings(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    loss, metrics = ours("dpo", per_token, shifted, ref, settings)
    trl_loss, trl_metrics = trl_reference.dpo(per_token, completion_mask, ref, beta=beta,
                                              loss_type=loss_type, label_smoothing=label_smoothing)
    assert_same_loss_and_grad(loss, trl_loss, per_token)
    assert_same_metrics(metrics, trl_metrics, PAIRED_METRICS)
    assert 0.0 < metrics["rewards/accuracies"] < 1.0  # both branches of the comparison occur


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_dpo_sigmoid_label_smoothing_is_trls_conservative_form(label_smoothing):
    """TRL 1.16's DPO "sigmoid" ignores label_smoothing; its CPOTrainer "sigmoid" keeps
    the conservative-DPO form. Fed the log-ratios as its "policy log-probs", CPO's loss
    is DPO's, so TRL's code is the reference for our sigmoid with label smoothing."""
    per_token, _, shifted, ref = paired_inputs(seed=2)
    settings = PreferenceSettings(beta=0.2, loss_type="sigmoid", label_smoothing=label_smoothing)
    loss, _ = ours("dpo", per_token, shifted, ref, settings)
    ratios = (per_token * shifted).sum(1) - ref
    trl_loss, _ = trl_reference.cpo(ratios[:PAIRS], ratios[PAIRS:], beta=0.2, loss_type="sigmoid",
                                    label_smoothing=label_smoothing)
    assert_same_loss_and_grad(loss, trl_loss, per_token)
