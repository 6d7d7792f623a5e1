"""KTO on the tiny model, from the shipped unpaired set (data/kto) through the data layer.

1. One step means the same on MLX and on torch (float32, CPU): the same batch of examples
   and their KL rows, the same LoRA weights (lora_b nonzero, so the policy is not the
   adapter-off reference): the loss, every metric, and the gradient of every LoRA weight.
2. The MLX loss equals TRL's own ``KTOTrainer._compute_loss`` (tests/trl_reference.py)
   fed with per-token log-probs computed independently: a plain transformers forward
   and log_softmax over the peft model, its adapter on for the policy and off for the
   reference, on the batch's rows and KL rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")

from tests import trl_reference  # noqa: E402
from tests.model.test_parity import PARITY, load_pair  # noqa: E402

pytestmark = pytest.mark.torch
KTO = Path(__file__).resolve().parents[2] / "data" / "kto"


@pytest.fixture(scope="module")
def kto_pair(tiny_model, tiny_spec):
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer

    spec = tiny_spec(PARITY, data=KTO, objective="kto", optimizer="adamw")
    bundle = load_data(spec, load_tokenizer(tiny_model), log=lambda m: None)
    try:
        batches = [bundle.train.next_batch() for _ in range(3)]
    finally:
        bundle.close()
    # A batch with both kinds of example, so both halves of the loss are exercised.
    batch = next(b for b in batches if 0 < b.labels.sum() < b.size)
    return (*load_pair(spec, tiny_model), batch)


def test_one_kto_step_gives_the_same_loss_metrics_and_gradients(kto_pair):
    from mlx.utils import tree_flatten

    from mlx_tune.backends.mlx.backend import arrays_of

    m, t, batch = kto_pair
    assert batch.paired and batch.tokens.shape[0] == 2 * batch.size == 8
    micro = batch.split(2)
    grads, sums = m.step_fn._first(arrays_of(micro[0]))
    grads, sums = m.step_fn._more(grads, sums, arrays_of(micro[1]))
    mx.eval(grads, sums)
    sums = np.array(sums)
    names = m.step_fn.metric_names
    for p in t.params.values():
        p.grad = None
    loss_sum, count, _, metrics = t.step_fn.accumulate(micro)
    assert float(count) == sums[1] == batch.size
    assert sums[0] == pytest.approx(float(loss_sum), rel=1e-5, abs=1e-6)
    assert names == list(metrics) and "kl" in names
    for i, name in enumerate(names):
        total, n = metrics[name]
        assert sums[3 + 2 * i + 1] == float(n), name
        assert sums[3 + 2 * i] == pytest.approx(float(total), rel=1e-4, abs=1e-5), name
    assert any(abs(float(metrics[k][0])) > 1e-4 for k in ("rewards/chosen", "rewards/rejected"))
    mine = dict(tree_flatten(grads))
    assert len(mine) == len(t.params)
    for name, g in mine.items():
        prefix, leaf = name.rsplit(".", 1)
        theirs = t.params[f"base_model.model.{prefix}.lora_{leaf[-1].upper()}.default.weight"].grad
        ours = torch.from_numpy(np.array(g)).T
        scale = float(theirs.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * scale)


def per_token_logps(model, tokens: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) at the completion positions, zero elsewhere:
    the model's logits through log_softmax, nothing of ours."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    picked = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return picked * torch.from_numpy(mask[:, 1:])


def test_the_mlx_loss_equals_trls_kto_loss_on_independent_log_probs(kto_pair):
    pytest.importorskip("trl")
    m, t, batch = kto_pair
    n = batch.size
    result = m.evaluate([batch])
    peft_model = t.model
    policy = per_token_logps(peft_model, batch.tokens, batch.mask)
    with peft_model.disable_adapter():
        reference = per_token_logps(peft_model, batch.tokens, batch.mask).sum(-1)
    trl_loss, trl_metrics = trl_reference.kto(
        policy[:n].clone().requires_grad_(), policy[n:], torch.from_numpy(batch.labels),
        reference[:n], reference[n:], beta=0.1)
    assert result.tokens == n
    assert result.loss_sum / result.tokens == pytest.approx(float(trl_loss.detach()), rel=1e-4, abs=1e-6)
    assert abs(float(trl_loss.detach()) - 0.5) > 1e-4  # the policy is not the reference
    kl_sum, kl_count = result.metrics["kl"]
    assert kl_sum > 0  # the baseline is not clamped to 0: the KL rows reach the loss
    assert kl_sum / kl_count == pytest.approx(trl_metrics["kl"], rel=1e-3, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        total, count = result.metrics[name]
        assert total / count == pytest.approx(trl_metrics[name], rel=1e-3, abs=1e-4), name
