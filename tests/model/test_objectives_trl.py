"""Our objectives against TRL's own loss code (tests/trl_reference.py), on fixed inputs:
the loss, its gradient with respect to the policy's per-token log-probs, and TRL's
logged metrics, for every objective and loss_type.

No model is loaded, but importing TRL (transformers, accelerate) takes longer than the
unit tier's budget, so these live with the model tier."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from mlx_tune.backends.torch.ops import TORCH_OPS  # noqa: E402
from mlx_tune.objectives import PreferenceSettings, RowLogps, get_objective  # noqa: E402
from tests import trl_reference  # noqa: E402

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


def averaged(per_token, shifted):
    return (per_token * shifted).sum(1) / shifted.sum(1)


@pytest.mark.parametrize("beta,scale", [(0.1, 1.4), (0.5, 1.4), (0.1, 3.0)])
def test_orpo_equals_trl_orpo_trainer(beta, scale):
    """With equal chosen lengths (where TRL's batch token-mean NLL and our per-pair mean
    agree, see orpo.py), TRL's full ORPO loss; the scale puts averages on both sides
    of log1mexp's branch point."""
    per_token, _, shifted, _ = paired_inputs(seed=4, equal_chosen_lengths=True)
    per_token = (per_token.detach() * scale / 2.0).requires_grad_()
    avg = averaged(per_token, shifted)
    if scale < 2:
        assert (avg > -0.6931).any() and (avg < -0.6931).any()
    loss, metrics = ours("orpo", per_token, shifted, None, PreferenceSettings(beta=beta))
    chosen_tokens = (per_token * shifted)[:PAIRS]
    trl_nll = -chosen_tokens.sum() / shifted[:PAIRS].sum()  # TRL's cross-entropy mean
    trl_loss, trl_metrics = trl_reference.orpo(avg[:PAIRS], avg[PAIRS:], trl_nll, beta=beta)
    assert_same_loss_and_grad(loss, trl_loss, per_token)
    assert_same_metrics(metrics, trl_metrics,
                        PAIRED_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"))


def test_orpo_nll_is_each_chosen_completions_own_mean():
    """With unequal lengths our NLL is the mean over pairs of each chosen completion's
    token mean (accumulation-exact), not TRL's batch token mean: computed by hand here."""
    per_token, _, shifted, _ = paired_inputs(seed=5)
    chosen_lengths = shifted[:PAIRS].sum(1)
    assert len(set(chosen_lengths.tolist())) > 1
    _, metrics = ours("orpo", per_token, shifted, None, PreferenceSettings())
    by_hand = sum(-float((per_token[i] * shifted[i]).sum()) / float(chosen_lengths[i])
                  for i in range(PAIRS)) / PAIRS
    batch_mean = -float((per_token * shifted)[:PAIRS].sum() / chosen_lengths.sum())
    assert metrics["nll_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert metrics["nll_loss"] != pytest.approx(batch_mean, rel=1e-3)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [
    (0.1, 0.5, 0.0), (2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_equals_trl_cpo_trainer_simpo(beta, gamma, label_smoothing):
    per_token, _, shifted, _ = paired_inputs(seed=6)
    settings = PreferenceSettings(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    loss, metrics = ours("simpo", per_token, shifted, None, settings)
    avg = averaged(per_token, shifted)
    trl_loss, trl_metrics = trl_reference.cpo(avg[:PAIRS], avg[PAIRS:], beta=beta, loss_type="simpo",
                                              label_smoothing=label_smoothing, simpo_gamma=gamma)
    assert_same_loss_and_grad(loss, trl_loss, per_token)
    assert_same_metrics(metrics, trl_metrics, PAIRED_METRICS)


def kto_inputs(seed: int, labels: list[int], kl_shift: float):
    g = torch.Generator().manual_seed(seed)
    rows = len(labels)
    per_token = (-torch.rand(rows, WIDTH - 1, generator=g) * 2.0).requires_grad_()
    kl_per_token = -torch.rand(rows, WIDTH - 1, generator=g) * 2.0
    ref = per_token.detach().sum(1) + torch.randn(rows, generator=g)
    ref_kl = kl_per_token.sum(1) - kl_shift + 0.3 * torch.randn(rows, generator=g)
    return per_token, kl_per_token, torch.tensor(labels), ref, ref_kl


@pytest.mark.parametrize("labels,kl_shift,beta,weights", [
    ([1, 0, 1, 1, 0, 0], 2.0, 0.1, (1.0, 1.0)),  # positive KL baseline
    ([1, 0, 1, 1, 0, 0], -2.0, 0.1, (1.0, 1.0)),  # negative mean: clamped to 0
    ([1, 0, 0, 1, 0, 0], 1.0, 0.5, (1.33, 0.7)),
    ([1, 1, 1, 1], 1.0, 0.1, (1.0, 1.0)),  # no undesirable example in the batch
])
def test_kto_equals_trl_kto_trainer(labels, kl_shift, beta, weights):
    per_token, kl_per_token, label_tensor, ref, ref_kl = kto_inputs(7, labels, kl_shift)
    tokens = torch.full((len(labels),), float(WIDTH - 1))
    settings = PreferenceSettings(beta=beta, desirable_weight=weights[0],
                                  undesirable_weight=weights[1])
    terms = get_objective("kto").loss(
        TORCH_OPS, RowLogps(per_token.sum(1), tokens), RowLogps(ref, tokens), settings,
        labels=label_tensor, kl=RowLogps(kl_per_token.sum(1), tokens),
        reference_kl=RowLogps(ref_kl, tokens))
    metrics = {k: float(s / c) for k, (s, c) in terms.metrics.items() if float(c) > 0}
    trl_loss, trl_metrics = trl_reference.kto(per_token, kl_per_token, label_tensor, ref, ref_kl,
                                              beta=beta, desirable_weight=weights[0],
                                              undesirable_weight=weights[1])
    assert_same_loss_and_grad(terms.loss_sum / terms.count, trl_loss, per_token)
    names = ["kl", "rewards/chosen", "logps/chosen"]
    if 0 in labels:
        names += ["rewards/rejected", "logps/rejected"]
    assert_same_metrics(metrics, trl_metrics, names)
    assert (trl_metrics["kl"] > 0) == (kl_shift > 0)  # both sides of the clamp are exercised
