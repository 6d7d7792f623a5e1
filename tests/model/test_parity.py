"""The same spec means the same thing on MLX and on PyTorch (float32, CPU).

Same model directory, same batches (the data layer on data/recipes), identical LoRA
weights (mlx-lm's ``lora_a`` [in, r] / ``lora_b`` [r, out] are peft's ``lora_A.weight``
[r, in] / ``lora_B.weight`` [out, r] transposed; mlx-lm starts lora_b at zero, so it is
made nonzero here for the adapter to matter from step one), dropout 0, batch 4 as 2
micro-batches, 20 steps. Measured with the embedded tiny model (4 blocks, 2.9M params):

- initial loss: |MLX - torch| = 4.7e-7 (bound 1e-4); logits 3.2e-5 apart at a scale of
  13 (bound 1e-4 of the scale); accuracy/confidence/entropy sums agree too;
- SGD (momentum 0.9, L2 0.01, clip 1.0, label smoothing 0.1, lr 0.05): per-step losses
  within 2.4e-6 (bound 1e-3);
- AdamW (decoupled decay 0.01, bias correction on both sides, lr 1e-3): within 1.0e-5
  (bound 2e-4). Adam's update is ~lr*sign(g) for small gradients, so float32 rounding
  differences (different matmul kernels) grow faster than under SGD: 1.3e-5 on a
  random-init tiny Mistral at lr 1e-2, up to 1.3e-3 on one whose logits were nearly
  uniform (gradients near zero, updates sign noise);
- Adafactor (transformers' vs MLX's, no relative step or parameter scaling): within
  1.4e-6 (bound 5e-4; 2.7e-5 with the random-init model).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")


pytestmark = pytest.mark.torch

STEPS = 20


# Both backends on one thread each, rows short enough for several steps a second.
PARITY = {"max_length": 64, "torch_threads": 1}


@pytest.fixture(scope="module")
def steps(tiny_model, tiny_spec):
    """The first STEPS training batches of the recipes dataset, from the data layer."""
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer

    bundle = load_data(tiny_spec(PARITY), load_tokenizer(tiny_model),
                       log=lambda m: None)
    try:
        return [bundle.train.next_batch() for _ in range(STEPS)]
    finally:
        bundle.close()


def load_pair(spec, model):
    """Both backends, with the torch LoRA weights copied from MLX (lora_b made nonzero)."""
    from mlx.utils import tree_flatten

    from mlx_tune.backends.mlx.backend import MLXBackend
    from mlx_tune.backends.torch.backend import TorchBackend

    m = MLXBackend()
    m.load(spec, model)
    t = TorchBackend()
    t.load(spec, model)
    rng = np.random.default_rng(0)
    weights = dict(tree_flatten(m.model.trainable_parameters()))
    for name, v in weights.items():
        if name.endswith("lora_b"):
            weights[name] = mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
    m.model.load_weights(list(weights.items()), strict=False)
    mx.eval(m.model.parameters())
    assert len(weights) == len(t.params)
    with torch.no_grad():
        for name, v in weights.items():
            prefix, leaf = name.rsplit(".", 1)
            peft_name = f"base_model.model.{prefix}.lora_{leaf[-1].upper()}.default.weight"
            t.params[peft_name].copy_(torch.from_numpy(np.array(v)).T)
    return m, t


def train(backend, steps, lr, accumulation=2):
    results = [backend.step(b.split(accumulation), lr, 0.0) for b in steps]
    flat = backend.to_floats([v for r in results for v in (r.loss, r.tokens, r.finite)])
    assert all(f == 1.0 for f in flat[2::3])
    return np.array(flat[0::3]), np.array(flat[1::3])


def test_initial_loss_and_logits_agree(tiny_model, tiny_spec, steps):
    m, t = load_pair(tiny_spec(PARITY), tiny_model)
    batch = steps[0]
    em, et = m.evaluate([batch]), t.evaluate([batch])
    assert em.tokens == et.tokens == batch.n_targets
    assert abs(em.loss_sum / em.tokens - et.loss_sum / et.tokens) < 1e-4
    for a, b in zip(em.astuple()[2:], et.astuple()[2:]):  # correct, confidence, entropy
        assert abs(a - b) / em.tokens < 1e-4
    inputs = batch.tokens[:, :-1]
    lm = np.array(m.model(mx.array(inputs)))
    t.model.eval()
    with torch.no_grad():
        lt = t.model(input_ids=torch.from_numpy(inputs).long()).logits.numpy()
    t.model.train()
    assert np.abs(lm - lt).max() < 1e-4 * max(1.0, float(np.abs(lm).max()))


@pytest.mark.parametrize("optimizer,lr,extra,tol", [
    ("sgd", 0.05, {"momentum": 0.9, "weight_decay": 0.01, "label_smoothing": 0.1}, 1e-3),
    ("adamw", 1e-3, {"weight_decay": 0.01}, 2e-4),
    ("adafactor", 1e-3, {}, 5e-4),
])
def test_training_losses_track(tiny_model, tiny_spec, steps, optimizer, lr, extra, tol):
    spec = tiny_spec(PARITY, optimizer=optimizer, grad_clip=1.0, **extra)
    m, t = load_pair(spec, tiny_model)
    loss_m, tok_m = train(m, steps, lr)
    loss_t, tok_t = train(t, steps, lr)
    assert np.array_equal(tok_m, tok_t)
    # Batches differ in difficulty; the run must still learn for the check to mean much.
    assert loss_m[-5:].mean() < loss_m[:5].mean() - 0.5
    diff = np.abs(loss_m - loss_t)
    assert diff.max() < tol, (optimizer, diff.max(), diff)


def test_packed_batches_agree(tiny_model, tiny_spec):
    """Packed rows (block-diagonal attention: MLX through mlx-lm's mask hook with RoPE
    positions running across the row, torch through restarting position ids) give the
    same evaluation sums and the same training losses on both backends."""
    from mlx_tune.data import load_data
    from mlx_tune.models.tokenizer import load_tokenizer

    spec = tiny_spec(PARITY, packing=True, pack_length=128)
    bundle = load_data(spec, load_tokenizer(tiny_model), log=lambda m: None)
    batches = [bundle.train.next_batch() for _ in range(6)]
    bundle.close()
    assert all(b.segments is not None and b.segments.max() > 1 for b in batches)
    m, t = load_pair(spec, tiny_model)
    em, et = m.evaluate(batches[:2]), t.evaluate(batches[:2])
    assert em.tokens == et.tokens
    assert abs(em.loss_sum / em.tokens - et.loss_sum / et.tokens) < 1e-4
    lm, _ = train(m, batches, 1e-3)
    lt, _ = train(t, batches, 1e-3)
    assert np.abs(lm - lt).max() < 2e-4
