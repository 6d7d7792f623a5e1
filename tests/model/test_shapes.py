"""Bounded compiled shapes: a whole epoch over data with >= 500 distinct lengths, with
gradient accumulation and a partial validation batch, compiles at most 8 input shapes on
either backend; the count the run reports equals the shapes its batches really have."""

import json
import pytest

from mlx_tune.data import load_data
from mlx_tune.data.testing import chat, write_jsonl
from mlx_tune.data.widths import MAX_WIDTHS
from mlx_tune.models.tokenizer import load_tokenizer
from mlx_tune.training.recipe import train

WORDS = ("flour eggs milk butter sugar salt pan oven whisk bake stir boil roast garlic "
         "tomato soup pepper onion simmer slice").split()
RECORDS = 530


@pytest.fixture(scope="module")
def long_tail_data(narrow_model, tmp_path_factory):
    """530 training chats whose token lengths are almost all different, and 13 validation
    chats (batch 4: a partial last batch)."""
    out = tmp_path_factory.mktemp("lengths")
    rows = [chat(f"Question {i}?", " ".join(WORDS[j % len(WORDS)] for j in range(i)))
            for i in range(RECORDS)]
    write_jsonl(out / "train.jsonl", rows)
    write_jsonl(out / "valid.jsonl", rows[5::41])
    return out


# One epoch in micro-batches of 2, every validation batch, and nothing else on the way.
ONE_EPOCH = {"gradient_accumulation_steps": 2, "max_length": 640, "max_steps": RECORDS // 4,
             "warmup_steps": 2, "eval_steps": 1000, "val_batches": -1,
             "checkpoint_interval": 1000, "report_every": 1000,
             "early_stopping": {"warmup": 100000}}


def expected_shapes(spec, model):
    """The micro-batch shapes one epoch and one evaluation really have, read from the data
    layer independently of the backend's counter."""
    quiet = lambda m: None  # noqa: E731
    data = load_data(spec, load_tokenizer(model), log=quiet)
    assert len({ex.length for ex in data.train._source.examples}) >= 500
    batches = [data.train.next_batch() for _ in range(spec.max_steps)]
    assert data.train.epoch == 0 and len(batches) == spec.max_steps  # exactly one epoch
    batches += data.valid.batches()
    assert any(not b.mask.any(axis=1).all() for b in data.valid.batches())  # padded rows
    return {m.tokens.shape for b in batches for m in b.split(2)}


def last_train_record(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"][-1]


@pytest.mark.slow  # ~25 s on MLX's CPU backend: tracing 8 shapes x 3 compiled functions
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_an_epoch_of_500_lengths_compiles_at_most_8_shapes(narrow_model, long_tail_data,
                                                           tiny_spec, tmp_path, backend):
    if backend == "torch":
        pytest.importorskip("peft")
    spec = tiny_spec(ONE_EPOCH, model=narrow_model, data=long_tail_data,
                     output_dir=tmp_path / "run", backend=backend)
    expected = expected_shapes(spec, narrow_model)
    assert len(expected) <= MAX_WIDTHS
    result = train(spec, resume="fresh", log=lambda m: None)
    assert result.exit_code == 0, result.reason
    last = last_train_record(tmp_path / "run")
    assert last["compiled_shapes"] == len(expected)
    assert last["shape_bound"] <= MAX_WIDTHS


def test_align32_batching_exceeds_the_bound_and_is_reported(narrow_model, long_tail_data,
                                                             tiny_spec, tmp_path):
    """The old every-multiple-of-32 padding, over the same epoch, compiles far more shapes:
    the counter sees them."""
    spec = tiny_spec(ONE_EPOCH, model=narrow_model, data=long_tail_data,
                     output_dir=tmp_path / "run", bucket_widths="align32",
                     max_steps=30, backend="torch")
    lines = []
    result = train(spec, resume="fresh", log=lines.append)
    assert result.exit_code == 0, result.reason
    last = last_train_record(tmp_path / "run")
    assert last["compiled_shapes"] > MAX_WIDTHS and last["shape_bound"] == 640 // 32
