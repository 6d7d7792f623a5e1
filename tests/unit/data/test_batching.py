"""mlx_tune.data.batching and the epoch plan: shapes, padding, determinism, drops."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_tune.data import DataError, load_data
from mlx_tune.data.batching import bucket, pad_batch, padded_length
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl
from mlx_tune.config.schema import Spec


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def varied(n):
    return [chat(f"dish {i}", "Mix flour and eggs. " * (1 + i % 9)) for i in range(n)]


def quiet(_):
    pass


def test_padded_length_rounds_to_32_and_caps():
    assert [padded_length(n, 1024) for n in (1, 32, 33, 64, 65)] == [32, 32, 64, 64, 96]
    assert padded_length(90, 80) == 80 and padded_length(33, 40) == 40


def test_pad_batch_arrays():
    b = pad_batch([([5, 6, 7], [0, 1, 1]), ([8], [0])], pad_id=9, max_length=100)
    assert b.tokens.dtype == np.int32 and b.mask.dtype == np.float32
    assert b.tokens.shape == (2, 32) and b.mask.shape == (2, 32)
    assert b.tokens[0, :4].tolist() == [5, 6, 7, 9] and (b.tokens[1, 1:] == 9).all()
    assert b.mask[0, :3].tolist() == [0, 1, 1] and b.mask.sum() == 2


def test_bucket_sorts_drops_and_shuffles():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    groups = bucket(lengths, 3, np.random.default_rng(0))
    assert len(groups) == 3 and all(len(g) == 3 for g in groups)
    flat = sorted(i for g in groups for i in g)
    assert len(set(flat)) == 9  # one random record sits this epoch out
    for g in groups:  # each batch is a contiguous run of the sorted kept lengths
        kept = sorted(lengths[i] for i in flat)
        ls = sorted(lengths[i] for i in g)
        start = kept.index(ls[0])
        assert kept[start:start + 3] == ls
    # Evaluation: stable sort, incomplete batch kept.
    assert bucket(lengths, 4, None, drop_last=False) == [[1, 5, 3, 7], [0, 8, 4, 6], [2, 9]]


def test_batches_shapes_padding_and_mask(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", varied(30))
    bundle = load_data(Spec(data=str(tmp_path), batch_size=4, max_length=100, prefetch=0), tok,
                       log=quiet)
    pad = tok.pad_token_id
    for _ in range(14):  # two epochs of 7 batches (30 // 4)
        b = bundle.train.next_batch()
        assert b.tokens.shape[0] == 4 and b.tokens.dtype == np.int32
        T = b.tokens.shape[1]
        lengths = (b.tokens != pad).sum(1)
        assert T == min(100, -(-lengths.max() // 32) * 32)
        assert (b.mask[:, 0] == 0).all()
        for row, n in zip(range(4), lengths):
            assert (b.tokens[row, n:] == pad).all() and (b.mask[row, n:] == 0).all()
    assert bundle.train.epoch == 1 and bundle.train.position == 7


def test_each_epoch_drops_the_incomplete_batch(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", varied(10))
    bundle = load_data(Spec(data=str(tmp_path), batch_size=4, prefetch=0), tok, log=quiet)
    states = []
    for _ in range(5):
        bundle.train.next_batch()
        states.append((bundle.train.epoch, bundle.train.position))
    assert states == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]


def collect(spec, tok, n):
    bundle = load_data(spec, tok, log=quiet)
    out = [bundle.train.next_batch() for _ in range(n)]
    bundle.close()
    return out


def same(a, b):
    return all(np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask)
               for x, y in zip(a, b))


def test_order_is_deterministic_per_seed_and_epoch(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", varied(40))
    spec = Spec(data=str(tmp_path), batch_size=4, prefetch=0)
    a, b = collect(spec, tok, 20), collect(spec, tok, 20)
    assert same(a, b)
    assert not same(a[:10], a[10:])  # epoch 1 is ordered differently from epoch 0
    c = collect(Spec(data=str(tmp_path), batch_size=4, prefetch=0, seed=1), tok, 10)
    assert not same(a[:10], c)


def test_fewer_records_than_batch_size(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", varied(5))
    with pytest.raises(DataError, match=r"5 usable training records, fewer than batch_size=8"):
        load_data(Spec(data=str(tmp_path), batch_size=8), tok, log=quiet)


def test_batch_size_must_split_across_ranks(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", varied(12))
    with pytest.raises(DataError, match="batch_size=6 cannot be split evenly across 4"):
        load_data(Spec(data=str(tmp_path), batch_size=6), tok, world_size=4, log=quiet)
    logs = []
    bundle = load_data(Spec(data=str(tmp_path), batch_size=4, prefetch=0), tok, rank=1,
                       world_size=2, log=logs.append)
    assert logs == []  # only rank 0 logs
    assert bundle.train.next_batch().split(2)[1].size == 2
