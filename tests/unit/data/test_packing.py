"""Packing: the row layout of packed examples; plans are seeded, cover each example once an
epoch, resume exactly, and use one shape. That a packed row computes the losses and
gradients of its examples run one by one is checked on the tiny model in
tests/model/test_packing.py."""

import numpy as np
import pytest

from mlx_tune.config.schema import SpecError
from mlx_tune.config.spec import build_spec
from mlx_tune.data import load_data
from mlx_tune.data.packing import best_fit, pack_rows, segment_positions
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl

PACK = 64


def examples():
    """Very different lengths: three that share a row (40 + 10 + 13 = 63), one that fills a
    row exactly (64) and one truncated to a row (80 -> 64). Prompt tokens are not targets."""
    rng = np.random.default_rng(0)
    out = []
    for n, prompt in ((40, 12), (10, 3), (13, 5), (64, 20), (80, 30)):
        ids = rng.integers(10, 1000, n).tolist()
        mask = [0.0] * prompt + [1.0] * (n - prompt)
        out.append((ids, mask))
    return out


def packed_batch():
    exs = examples()
    rows = best_fit([len(i) for i, _ in exs], range(len(exs)), PACK)
    assert sorted(map(sorted, rows)) == [[0, 1, 2], [3], [4]]
    return pack_rows([[exs[i] for i in row] for row in rows], pad_id=3, pack_length=PACK)


def test_pack_rows_layout():
    b = packed_batch()
    assert b.tokens.shape == (3, PACK) and b.segments.max() == 3
    assert segment_positions(np.array([[1, 1, 1, 2, 2, 0]])).tolist() == [[0, 1, 2, 0, 1, 0]]
    # No target at any example's first token: nothing is predicted across a boundary.
    starts = np.argwhere(np.diff(b.segments, axis=1) != 0) + [0, 1]
    assert all(b.mask[r, c] == 0 for r, c in starts)
    assert b.n_targets == sum(int(np.sum(m[1:PACK])) for _, m in examples())


# Packed rows of 96 tokens; validation batches as the Spec sets them.
PACKED = {"batch_size": 2, "max_length": 96, "packing": True, "val_batches": None}


def test_packed_epochs_are_seeded_complete_one_shape_and_resume_exactly(tiny_spec, tmp_path):
    tok = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl",
                [chat(f"item {i}", "pancakes " * (1 + (i * 7) % 23)) for i in range(40)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(f"v {i}", "soup " * i) for i in range(1, 6)])
    quiet = lambda m: None  # noqa: E731
    a = load_data(tiny_spec(PACKED, data=tmp_path), tok, log=quiet)
    n = a.train.steps_per_epoch()
    epoch = [a.train.next_batch() for _ in range(n)]
    assert {b.tokens.shape for b in epoch + a.valid.batches()} == {(2, 96)}
    # every example at most once in the epoch (a shuffled partial batch of rows sits out)
    import re
    seen = [int(m) for b in epoch for row, seg in zip(b.tokens, b.segments)
            for k in range(1, int(seg.max()) + 1)
            for m in re.findall(r"item (\d+)", tok.decode(row[seg == k]))]
    assert len(seen) == len(set(seen)) and len(seen) >= 30
    # seeded: the same plan again; another seed another plan
    b = load_data(tiny_spec(PACKED, data=tmp_path), tok, log=quiet)
    again = [b.train.next_batch() for _ in range(n)]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(epoch, again))
    c = load_data(tiny_spec(PACKED, data=tmp_path, seed=1), tok, log=quiet)
    assert not all(np.array_equal(x.tokens, c.train.next_batch().tokens) for x in epoch[:1])
    # resume mid-epoch: the next batches are the uninterrupted run's
    d = load_data(tiny_spec(PACKED, data=tmp_path), tok, log=quiet)
    for _ in range(2):
        d.train.next_batch()
    e = load_data(tiny_spec(PACKED, data=tmp_path), tok, log=quiet)
    e.train.load_state_dict(d.train.state_dict())
    for x in epoch[2:] + [a.train.next_batch()]:
        y = e.train.next_batch()
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.segments, y.segments)


def test_packing_with_streaming_is_refused():
    with pytest.raises(SpecError, match="packing"):
        build_spec(overrides={"packing": True, "streaming": True})
