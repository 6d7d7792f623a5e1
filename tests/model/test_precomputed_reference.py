"""preference.reference: precomputed on the tiny model, against independent references:
from the base model it is the adapter-off policy, so a DPO run gives the same losses and
metrics either way (MLX and torch); from init_adapter (MLX) it is that adapter's policy,
so before any update every reward is 0 and the loss ln 2 (while adapter_off would compare
with the base model); and full fine-tuning, which has no adapter to switch off, trains
with it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.backends.select import make_backend
from mlx_tune.data import load_data
from mlx_tune.training.reference import compute_reference, sweep_reference

PREFERENCE = Path(__file__).resolve().parents[2] / "data" / "preference"
SHORT = {"max_length": 64, "objective": "dpo", "lora": {"rank": 4, "dropout": 0.0},
         "val_batches": 1}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from mlx_tune.data.testing import write_jsonl
    dest = tmp_path_factory.mktemp("pairs")
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        # Pairs that differ within SHORT's 64 tokens: a looping answer differs from its
        # faithful one only at its end, and the data layer drops pairs cut to the same.
        rows = [r for r in map(json.loads, (PREFERENCE / f"{split}.jsonl").read_text().splitlines())
                if not r["rejected"][0]["content"].startswith(r["chosen"][0]["content"])]
        write_jsonl(dest / f"{split}.jsonl", rows[:n])
    return dest


def loaded(spec, name: str = "mlx"):
    backend = make_backend(name)
    backend.load(spec, Path(spec.model))
    if spec.init_adapter:
        backend.load_adapter(Path(spec.init_adapter))
    return backend


def floats(backend, result) -> dict[str, float]:
    names = list(result.metrics)
    values = backend.to_floats([result.loss, *(v for n in names for v in result.metrics[n])])
    return {"loss": values[0], **{n: values[1 + 2 * i] / values[2 + 2 * i]
                                  for i, n in enumerate(names)}}


def scored(backend, spec):
    """The run's data and the table scored from ``backend`` as it is now."""
    data = load_data(spec, backend.tokenizer, log=lambda m: None)
    return data, compute_reference(backend, spec, data, 1, log=lambda m: None)


@pytest.mark.parametrize("name", ["mlx", pytest.param("torch", marks=pytest.mark.torch)])
def test_from_the_base_model_it_is_the_adapter_off_reference(tiny_spec, pairs, name):
    if name == "torch":
        pytest.importorskip("peft")
    off = tiny_spec(SHORT, data=pairs, torch_threads=1)
    pre = tiny_spec(SHORT, data=pairs, torch_threads=1, **{"preference.reference": "precomputed"})
    a, b = loaded(off, name), loaded(pre, name)
    data, table = scored(b, pre)
    # Every chosen and rejected row once (rows that truncation made identical share a key).
    assert 16 < len(table.values) <= 2 * (8 + 4 + 4)
    try:
        for _ in range(3):
            batch = data.train.next_batch()
            want = floats(a, a.step([batch], 5e-3, 0.0))
            got = floats(b, b.step([table.attach(batch)], 5e-3, 0.0))
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert abs(want["rewards/margins"]) > 1e-4  # the policy has moved off the reference
        valid = data.valid.batches()
        want, got = a.evaluate(valid), b.evaluate([table.attach(v) for v in valid])
        assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-4)
        assert got.means() == pytest.approx(want.means(), rel=1e-4, abs=1e-5)
    finally:
        data.close()


def test_from_init_adapter_it_is_that_adapter_s_policy(tiny_spec, pairs, tmp_path):
    start = loaded(tiny_spec(SHORT, data=pairs))
    rng = np.random.default_rng(0)  # a trained adapter: lora_b away from its zero init
    start.model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape), v.dtype))
                              for k, v in tree_flatten(start.model.trainable_parameters())
                              if k.endswith("lora_b")], strict=False)
    start.save_adapter(tmp_path / "sft")
    spec = tiny_spec(SHORT, data=pairs, init_adapter=str(tmp_path / "sft"))
    backend = loaded(spec)
    data, table = scored(backend, spec)
    try:
        # lr-find's reference: the sweep's own batches, scored first, the stream rewound.
        position = data.train.state_dict()
        swept = sweep_reference(backend, data, 1, 1)
        assert data.train.state_dict() == position
        batch = swept.train.next_batch()
        assert batch.ref_logps == pytest.approx(table.lookup(batch), rel=1e-5)
        # Without the table the step falls back to the adapter switched off: the base
        # model, which is not where this run starts.
        off = backend.evaluate([replace(batch, ref_logps=None)]).metrics["rewards/chosen"]
        assert abs(off[0] / off[1]) > 1e-3
        first = floats(backend, backend.step([batch], 1e-3, 0.0))
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert first[name] == pytest.approx(0.0, abs=1e-4), name
    finally:
        data.close()


def test_full_fine_tuning_trains_against_the_precomputed_reference(tiny_spec, pairs):
    spec = tiny_spec(SHORT, data=pairs, fine_tune_type="full")
    backend = loaded(spec)
    data, table = scored(backend, spec)
    try:
        batches = [table.attach(data.train.next_batch()) for _ in range(2)]
        seen = [floats(backend, backend.step([b], 1e-4, 0.0)) for b in batches * 4]
    finally:
        data.close()
    assert seen[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert seen[-1]["loss"] < seen[0]["loss"] - 0.05
    assert seen[-1]["rewards/accuracies"] > 0.5 and seen[-1]["rewards/margins"] > 0
