"""KTO on the tiny model, from the shipped unpaired set (data/kto) through the data layer.

1. One step means the same on MLX and on torch (float32, CPU): the same batch of examples
   and their KL rows, the same LoRA weights (lora_b nonzero, so the policy is not the
   adapter-off reference): the loss, every metric, and the gradient of every LoRA weight.
2. The MLX loss equals TRL's own ``KTOTrainer._compute_loss`` (tests/trl_reference.py)
   fed with per-token log-probs computed independently: a plain transformers forward
   and log_softmax over the peft model, its adapter on for the policy and off for the
   reference, on the batch's rows and KL rows.
3. A short run moves each label to its side of the baseline (validation rewards/accuracies).
4. A precomputed reference scores the KL rows too: the same steps as adapter-off."""

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
        batches = [bundle.train.next_batch() for _ in range(6)]
    finally:
        bundle.close()
    # Batches with both kinds of example, so both halves of the loss are exercised.
    return (*load_pair(spec, tiny_model), [b for b in batches if 0 < b.labels.sum() < b.size])


def test_one_kto_step_gives_the_same_loss_metrics_and_gradients(kto_pair):
    from mlx.utils import tree_flatten

    from mlx_tune.backends.mlx.backend import arrays_of

    m, t, batches = kto_pair
    batch = batches[0]
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
    m, t, batches = kto_pair
    baselines = []
    for batch in batches:
        n = batch.size
        result = m.evaluate([batch])
        peft_model = t.model
        policy = per_token_logps(peft_model, batch.tokens, batch.mask)
        with peft_model.disable_adapter():
            reference = per_token_logps(peft_model, batch.tokens, batch.mask).sum(-1)
        trl_loss, trl_metrics = trl_reference.kto(
            policy[:n].clone().requires_grad_(), policy[n:], torch.from_numpy(batch.labels),
            reference[:n], reference[n:], beta=0.1)
        trl_loss = float(trl_loss.detach())
        assert result.tokens == n
        assert result.loss_sum / result.tokens == pytest.approx(trl_loss, rel=1e-4, abs=1e-6)
        assert abs(trl_loss - 0.5) > 1e-4  # the policy is not the reference
        kl_sum, kl_count = result.metrics["kl"]
        baselines.append(kl_sum / kl_count)
        assert baselines[-1] == pytest.approx(trl_metrics["kl"], rel=1e-3, abs=1e-5)
        for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            total, count = result.metrics[name]
            assert total / count == pytest.approx(trl_metrics[name], rel=1e-3, abs=1e-4), name
    # Some baseline is not clamped to 0, so the KL rows reach the loss compared.
    assert max(baselines) > 0, baselines


def test_kto_training_moves_each_label_to_its_side_of_the_baseline(tiny_spec, tmp_path):
    """A short MLX run on a set whose two labels differ in kind (recipe questions answered
    with the shipped answer's first line, desirable, or with a refusal, undesirable):
    validation rewards/accuracies, the fraction of examples on the side of the KL baseline
    their label asks for, rises from 0 (every reward ties the baseline before training)
    to well above chance, and desirable rewards end above undesirable ones."""
    import json

    from mlx_tune.data.testing import write_jsonl
    from mlx_tune.training.recipe import train

    def split(name: str, n: int) -> list[dict]:
        rows = [json.loads(line) for line in (KTO / f"{name}.jsonl").read_text().splitlines()]
        return [{"prompt": r["prompt"],
                 "completion": (r["completion"][0]["content"].split("\n")[0] if i % 2 == 0
                                else "Sorry, I would rather not talk about food today."),
                 "label": i % 2 == 0} for i, r in enumerate(rows[:n])]
    data = tmp_path / "kto"
    write_jsonl(data / "train.jsonl", split("train", 96))
    write_jsonl(data / "valid.jsonl", split("valid", 16))
    spec = tiny_spec(data=data, objective="kto", max_length=64, max_steps=10, eval_steps=10,
                     val_batches=4, learning_rate=2e-3, checkpoint_interval=10)
    result = train(spec, resume="fresh", log=lambda m: None)
    assert result.exit_code == 0, result.reason
    evals = [json.loads(line) for line in (Path(spec.output_dir) / "metrics.jsonl").open()]
    evals = [e["metrics"] for e in evals if e.get("type") == "eval"]
    accuracy = [e["rewards/accuracies"] for e in evals]
    assert len(evals) == 2 and accuracy[0] == 0.0
    assert accuracy[-1] >= 0.8, accuracy
    assert evals[-1]["rewards/chosen"] > evals[-1]["rewards/rejected"], evals[-1]


def test_a_precomputed_reference_covers_the_kl_rows(tiny_spec, tmp_path):
    """preference.reference: precomputed scores every row a KTO run meets, KL rows
    included, before step 0; from the base model that is the adapter-off reference, so
    the steps and the evaluation are the same either way (MLX)."""
    from mlx.utils import tree_flatten

    from mlx_tune.backends.select import make_backend
    from mlx_tune.data import load_data
    from mlx_tune.data.testing import write_jsonl
    from mlx_tune.training.reference import compute_reference

    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        write_jsonl(tmp_path / f"{split}.jsonl",
                    (KTO / f"{split}.jsonl").read_text().splitlines()[:n])
    short = {"data": tmp_path, "objective": "kto", "max_length": 64, "val_batches": 1,
             "lora": {"rank": 4, "dropout": 0.0}}
    off, pre = tiny_spec(short), tiny_spec(short, **{"preference.reference": "precomputed"})
    a, b = make_backend("mlx"), make_backend("mlx")
    a.load(off, Path(off.model))
    b.load(pre, Path(pre.model))
    data = load_data(pre, b.tokenizer, log=lambda m: None)
    table = compute_reference(b, pre, data, 1, log=lambda m: None)
    # Then the same random adapter in both (lora_b away from 0: the policy is not the
    # reference, and the mismatched KL rows move above it, so the baseline is not 0).
    rng = np.random.default_rng(0)
    moved = [(k, mx.array(rng.normal(0, 0.05, v.shape), v.dtype))
             for k, v in tree_flatten(a.model.trainable_parameters()) if k.endswith("lora_b")]
    for backend in (a, b):
        backend.model.load_weights(moved, strict=False)
    try:
        valid = data.valid.batches()
        want, got = a.evaluate(valid), b.evaluate([table.attach(v) for v in valid])
        assert got.metrics["kl"][0] > 0  # the KL rows' reference values reach the loss
        assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-4)
        assert got.means() == pytest.approx(want.means(), rel=1e-4, abs=1e-5)
        for _ in range(3):
            batch = data.train.next_batch()
            attached = table.attach(batch)
            assert attached.ref_logps.shape == (2 * batch.size,)
            assert attached.labels.tolist() == batch.labels.tolist()
            want, got = a.step([batch], 5e-3, 0.0), b.step([attached], 5e-3, 0.0)
            names = list(want.metrics)
            values = a.to_floats([want.loss, *(v for n in names for v in want.metrics[n])])
            assert b.to_floats([got.loss, *(v for n in names for v in got.metrics[n])]) == \
                pytest.approx(values, rel=1e-4, abs=1e-5)
    finally:
        data.close()
