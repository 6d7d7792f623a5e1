"""test_at_end (--test): the final weights scored on test.jsonl, in the log and metrics.jsonl."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np

from mlx_tune.config.spec import build_spec
from mlx_tune.data.records import read_records
from mlx_tune.data.tokenize import make_example
from mlx_tune.training.recipe import train


def test_test_at_end_scores_the_written_adapter(tiny_model, recipe_slice, tmp_path):
    data = recipe_slice(tmp_path / "d")
    spec = build_spec(overrides={
        "model": str(tiny_model), "data": str(data), "output_dir": str(tmp_path / "r"),
        "batch_size": 4, "max_length": 128, "max_steps": 4, "eval_steps": 4, "val_batches": 1,
        "checkpoint_interval": 4, "warmup_steps": 1, "learning_rate": 1e-3, "num_samples": 0,
        "lora.dropout": 0.0, "prefetch": 0, "dashboard": "plain", "tensorboard": False,
        "test_at_end": True})
    lines = []
    assert train(spec, resume="fresh", log=lines.append).exit_code == 0
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r["type"] == "test"]
    assert len(test) == 1 and test[0]["weights"] == "final" and test[0]["step"] == 4
    assert math.isclose(test[0]["perplexity"], math.exp(test[0]["loss"]), rel_tol=1e-6)

    # Reference: mlx-lm's own loader with the written adapter, cross-entropy by hand on
    # the target tokens of every test record.
    from mlx_lm.utils import load
    model, tok = load(str(tiny_model), adapter_path=str(tmp_path / "r" / "adapters"))
    total, count = 0.0, 0
    for record in read_records(data / "test.jsonl"):
        ex = make_example(record, tok._tokenizer, True, 128)
        logits = np.array(model(mx.array(ex.ids[None, :-1])).astype(mx.float32))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
            - logits.max(-1, keepdims=True)
        targets = ex.ids[1:]
        keep = ex.mask[1:].astype(bool)
        total += -logp[np.arange(len(targets)), targets][keep].sum()
        count += int(keep.sum())
    assert test[0]["tokens"] == count
    assert math.isclose(test[0]["loss"], total / count, rel_tol=1e-4)
