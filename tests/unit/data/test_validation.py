"""LazyValidation (lazy, fixed), val_split (deterministic, disjoint), test files."""

from __future__ import annotations

import builtins
import pathlib
import re

import numpy as np
import pytest

from mlx_tune.data import load_data, load_eval_file
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def rows(n, tag="item"):
    return [chat(f"{tag} {i}", "Mix flour and eggs. " * (1 + i % 5)) for i in range(n)]


# Small batches; validation batches as the Spec sets them (each test may change them).
SMALL_BATCHES = {"batch_size": 2, "max_length": 64, "val_batches": None}


def quiet(_):
    pass


def test_validation_file_is_not_opened_until_used(tiny_spec, tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", rows(10))
    valid = write_jsonl(tmp_path / "valid.jsonl", rows(6, "val"))
    opened = []
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_path_open(self, *a, **k):
        opened.append(str(self))
        return real_path_open(self, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(pathlib.Path, "open", spy_path_open)
    bundle = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, prefetch=2), tok, log=quiet)
    for _ in range(12):
        bundle.train.next_batch()
    bundle.close()
    assert str(tmp_path / "train.jsonl") in opened
    assert str(valid) not in opened
    assert len(bundle.valid.batches()) == 3
    assert str(valid) in opened


def test_valid_batches_are_a_fixed_subset(tiny_spec, tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", rows(10))
    write_jsonl(tmp_path / "val.jsonl", rows(25, "val"))
    bundle = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, val_batches=4), tok, log=quiet)
    a, b = bundle.valid.batches(), bundle.valid.batches()
    again = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, val_batches=4), tok,
                      log=quiet).valid.batches()
    assert len(a) == 4
    for x, y, z in zip(a, b, again):
        assert x is y
        assert np.array_equal(x.tokens, z.tokens) and np.array_equal(x.mask, z.mask)
    every = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, val_batches=-1), tok,
                      log=quiet).valid.batches()
    # The last batch holds one record and one empty row (mask 0): every batch has one shape.
    assert len(every) == 13 and {x.size for x in every} == {2}
    assert sum(int(x.mask.any(axis=1).sum()) for x in every) == 25
    # Length-sorted batching: the batches' length ranges do not interleave.
    ranges = sorted((min(ls), max(ls)) for ls in (
        [int((row != tok.pad_token_id).sum()) for row, m in zip(x.tokens, x.mask) if m.any()]
        for x in every))
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))


def test_first_prompts_drop_the_final_answer(tiny_spec, tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    write_jsonl(tmp_path / "valid.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
        chat("e", "f"), chat("g", "h")])
    valid = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path), tok, log=quiet).valid
    assert valid.first_prompts(2) == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "e"}]]


def test_no_validation_data_logs_once(tiny_spec, tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    logs = []
    bundle = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path), tok, log=logs.append)
    assert bundle.valid is None
    assert logs.count("no validation data: evaluation is skipped") == 1


def ids_in(batches, tok):
    return {int(re.search(r"item (\d+)", tok.decode(row)).group(1))
            for b in batches for row, m in zip(b.tokens, b.mask) if m.any()}


@pytest.mark.parametrize("streaming", [False, True])
def test_val_split_deterministic_and_disjoint(tiny_spec, tmp_path, tok, streaming):
    write_jsonl(tmp_path / "train.jsonl", rows(80))
    spec = tiny_spec(SMALL_BATCHES, data=tmp_path, val_split=0.25, batch_size=1,
                     streaming=streaming, val_batches=-1)
    bundle = load_data(spec, tok, log=quiet)
    held = ids_in(bundle.valid.batches(), tok)
    train = ids_in([bundle.train.next_batch() for _ in range(bundle.train_records)], tok)
    assert bundle.train.epoch == 0 and bundle.train_records == 80 - len(held)
    assert 10 <= len(held) <= 30 and not held & train and held | train == set(range(80))
    prompts = bundle.valid.first_prompts(100)
    assert {int(p[-1]["content"].split()[1]) for p in prompts} == held
    # The same records every run, in either mode.
    again = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, val_split=0.25, batch_size=1,
                                streaming=not streaming, val_batches=-1), tok, log=quiet)
    assert ids_in(again.valid.batches(), tok) == held


def test_val_split_ignored_with_a_validation_file(tiny_spec, tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", rows(10))
    write_jsonl(tmp_path / "valid.jsonl", rows(3, "val"))
    logs = []
    bundle = load_data(tiny_spec(SMALL_BATCHES, data=tmp_path, val_split=0.3), tok,
                       log=logs.append)
    assert bundle.train_records == 10 and any("val_split=0.3 ignored" in m for m in logs)


def test_load_eval_file(tiny_spec, tmp_path, tok):
    path = write_jsonl(tmp_path / "test.jsonl", rows(7))
    batches = load_eval_file(path, tiny_spec(SMALL_BATCHES, data=tmp_path, batch_size=3), tok,
                             log=quiet)
    assert [b.size for b in batches] == [3, 3, 3]  # the last padded with empty rows
    assert [int(b.mask.any(axis=1).sum()) for b in batches] == [3, 3, 1]
    assert ids_in(batches, tok) == set(range(7))
    assert all(b.tokens.shape[1] % 32 == 0 or b.tokens.shape[1] == 64 for b in batches)
