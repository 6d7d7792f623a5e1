"""End to end on the MLX backend: LoRA, QLoRA, DoRA, full; accumulation; NaN guard;
adapters that mlx-lm's own loader reads."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.backends.mlx.backend import MLXBackend
from mlx_tune.backends.mlx.step import token_loss_sums
from mlx_tune.data.batch import Batch
from mlx_tune.data import load_data
from mlx_tune.training.recipe import train


# Longer rows, more steps and validation than TINY_RUN: enough for the loss to fall.
SMALL = {"max_length": 192, "max_steps": 12, "warmup_steps": 2, "eval_steps": 6,
         "val_batches": 2, "checkpoint_interval": 6, "report_every": 3}


def loaded_backend(spec):
    backend = MLXBackend()
    backend.load(spec, spec.model)
    return backend


def trainable(backend):
    return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}


def test_lora_run_learns_and_writes_an_adapter_mlx_lm_loads(tiny_model, tiny_spec, tmp_path):
    spec = tiny_spec(SMALL, output_dir=tmp_path / "run")
    result = train(spec, resume="fresh", log=lambda m: None)
    assert result.exit_code == 0, result.reason
    assert result.last_val_loss < result.first_val_loss
    out = tmp_path / "run"
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 8

    # mlx-lm's own loader applies our adapter; its logits equal a model we rebuild here.
    from mlx_lm.utils import load
    model, tokenizer = load(str(tiny_model), adapter_path=str(out / "adapters"))
    ids = mx.array([tokenizer.encode("Preheat the oven and whisk the eggs.")])
    ours = loaded_backend(spec)
    ours.model.load_weights(str(out / "adapters" / "adapters.safetensors"), strict=False)
    ours.model.eval()
    np.testing.assert_allclose(np.array(model(ids)), np.array(ours.model(ids)), atol=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(3, 13, 3))


def test_accumulating_2x4_equals_batch_8(tiny_spec, tmp_path):
    # SGD, so the weights show the gradient itself: Adam's first update is about
    # lr * sign(g) and turns rounding noise in near-zero gradients into +-lr.
    spec = tiny_spec(SMALL, output_dir=tmp_path / "run", batch_size=8, optimizer="sgd",
                     momentum=0.0, weight_decay=0.0)
    batch = load_data(spec, loaded_backend(spec).tokenizer, log=lambda m: None).train.next_batch()
    weights = []
    for parts in (1, 2):
        backend = loaded_backend(spec)
        for _ in range(2):
            result = backend.step(batch.split(parts), 0.5, 0.0)
        weights.append(trainable(backend))
        loss = backend.to_floats([result.loss])[0]
        assert math.isfinite(loss)
    for key in weights[0]:
        np.testing.assert_allclose(weights[0][key], weights[1][key], atol=1e-6, rtol=1e-5)


def test_nan_in_the_loss_never_reaches_the_weights(tiny_spec, tmp_path):
    spec = tiny_spec(SMALL, output_dir=tmp_path / "run")
    backend = loaded_backend(spec)
    batch = load_data(spec, backend.tokenizer, log=lambda m: None).train.next_batch()
    backend.step([batch], 1e-3, 0.0)  # make lora_b nonzero so every weight can move
    before = trainable(backend)
    poisoned = batch.mask.copy()
    poisoned[0, -1] = np.nan
    result = backend.step([Batch(batch.tokens, poisoned)], 1e-3, 0.0)
    loss, finite = backend.to_floats([result.loss, result.finite])
    assert math.isnan(loss) and finite == 0.0
    after = trainable(backend)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    result = backend.step([batch], 1e-3, 0.0)
    assert backend.to_floats([result.finite]) == [1.0]


@pytest.mark.parametrize("kind, over", [
    ("qlora", {"quantize": 4}),
    ("dora", {"fine_tune_type": "dora"}),
    ("full", {"fine_tune_type": "full", "learning_rate": 1e-4}),
])
def test_fine_tune_types_train(tiny_spec, tmp_path, kind, over):
    spec = tiny_spec(SMALL, over, output_dir=tmp_path / "run")
    backend = MLXBackend()
    info = backend.load(spec, spec.model)
    names = list(trainable(backend))
    if kind == "qlora":
        assert info.quantized_bits == 4
        assert any(isinstance(m, __import__("mlx.nn").nn.QuantizedLinear)
                   for _, m in backend.model.named_modules())
    if kind == "dora":
        assert any(n.endswith(".m") for n in names)
    if kind == "full":
        assert info.trainable_params == info.total_params
    batch = load_data(spec, backend.tokenizer, log=lambda m: None).train.next_batch()
    losses = [backend.to_floats([backend.step([batch], spec.learning_rate, 0.0).loss])[0]
              for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the same batch: it must be learned


def test_label_smoothing_matches_the_formula(tiny_spec, tmp_path):
    spec = tiny_spec(SMALL, output_dir=tmp_path / "run")
    backend = loaded_backend(spec)
    batch = load_data(spec, backend.tokenizer, log=lambda m: None).train.next_batch()
    tokens, mask = mx.array(batch.tokens), mx.array(batch.mask)
    eps = 0.1
    smoothed, n = token_loss_sums(backend.model, tokens, mask, label_smoothing=eps)
    logits = backend.model(tokens[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    k = logits.shape[-1]
    onehot = mx.eye(k)[tokens[:, 1:]]
    target = (1 - eps) * onehot + eps / k  # y = (1 - eps) * onehot + eps / K
    expected = (-(target * logp).sum(-1) * mask[:, 1:]).sum()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)
