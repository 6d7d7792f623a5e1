"""TrainStream: exact resume (memory, prefetch, augmentation, streaming), prefetch errors."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from mlx_tune.data import DataError, load_data
from mlx_tune.data import sources
from mlx_tune.data import tokenize as tokenize_module
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def data_dir(tmp_path):
    rows = [chat(f"dish {i}", "Mix flour and eggs. " * (1 + i % 7),
                 quality=round((i % 10) / 10, 1), difficulty=1 + i % 3) for i in range(45)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    return tmp_path


# Short rows; prefetch and validation batches as the Spec sets them (each test may change
# the prefetch).
STREAM = {"max_length": 64, "prefetch": None, "val_batches": None}


def quiet(_):
    pass


def batches(stream, n):
    return [stream.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask)


CONFIGS = {
    "memory": {"prefetch": 0},
    "memory-prefetch": {"prefetch": 3},
    "augmentation": {"prefetch": 2, "augmentation": {"enabled": True, "prob": 0.5}},
    "filters": {"prefetch": 0, "curriculum": [{"until_epoch": 1, "max_difficulty": 2}],
                "quality": {"start": 0.2, "end": 0.5, "ramp_epochs": 2}},
    "streaming": {"prefetch": 0, "streaming": True, "shuffle_buffer": 7},
    "streaming-prefetch": {"prefetch": 2, "streaming": True, "shuffle_buffer": 7,
                           "augmentation": {"enabled": True, "prob": 0.5}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cut", [5, 13])  # mid-epoch, and past an epoch boundary
def test_resume_gives_identical_batches(tiny_spec, data_dir, tok, monkeypatch, name, cut):
    monkeypatch.setattr(sources, "WINDOW_BATCHES", 2)  # several bucketing windows per pass
    spec = tiny_spec(STREAM, data=data_dir, **CONFIGS[name])
    reference = load_data(spec, tok, log=quiet)
    expected = batches(reference.train, cut + 12)
    reference.close()

    first = load_data(spec, tok, log=quiet)
    assert_same(batches(first.train, cut), expected[:cut])
    state = json.loads(json.dumps(first.train.state_dict()))  # must be JSON-able
    first.close()

    resumed = load_data(spec, tok, log=quiet)
    resumed.train.load_state_dict(state)
    assert resumed.train.epoch == state["epoch"]
    assert_same(batches(resumed.train, 12), expected[cut:])
    resumed.close()


def test_state_reflects_batches_handed_out_not_prefetched(tiny_spec, data_dir, tok):
    bundle = load_data(tiny_spec(STREAM, data=data_dir, prefetch=4), tok, log=quiet)
    batches(bundle.train, 3)
    thread = bundle.train._thread
    assert thread is not None and thread.is_alive()
    assert bundle.train.state_dict()["position"] == 3 and bundle.train.epoch == 0
    bundle.close()
    assert not thread.is_alive()


def test_prefetch_error_surfaces_in_next_batch(tiny_spec, tmp_path, tok):
    rows = [chat(f"dish {i}", "Cook.") for i in range(40)] + ['{"messages": 3}']
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    # Streaming validates lines as it reaches them: the bad line surfaces mid-run.
    bundle = load_data(tiny_spec(STREAM, data=tmp_path, streaming=True, shuffle_buffer=2,
                                 prefetch=2), tok, log=quiet)
    with pytest.raises(DataError, match=rf"{path}:41: 'messages' must be a list"):
        batches(bundle.train, 20)
    with pytest.raises(DataError):  # and keeps surfacing
        bundle.train.next_batch()
    bundle.close()
    assert not any(t.name == "mlx-tune-prefetch" for t in threading.enumerate())


def test_streaming_resume_tokenizes_nothing_it_skips(tiny_spec, data_dir, tok, monkeypatch):
    monkeypatch.setattr(sources, "WINDOW_BATCHES", 2)  # windows of 8 records
    spec = tiny_spec(STREAM, data=data_dir, streaming=True, shuffle_buffer=5, prefetch=0)
    first = load_data(spec, tok, log=quiet)
    batches(first.train, 9)  # four whole windows, then one batch of the fifth
    state = first.train.state_dict()
    assert (state["consumed"], state["batch_in_window"]) == (32, 1)
    expected = first.train.next_batch()
    calls = []
    real = tokenize_module.encode_record
    monkeypatch.setattr(tokenize_module, "encode_record",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = load_data(spec, tok, log=quiet)
    resumed.train.load_state_dict(state)
    assert_same([resumed.train.next_batch()], [expected])
    assert len(calls) == 8  # only the window being resumed is tokenized again


def test_streaming_reads_line_by_line(tiny_spec, data_dir, tok, monkeypatch):
    import pathlib
    monkeypatch.setattr(pathlib.Path, "read_text", lambda *a, **k: pytest.fail("read whole"))
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda *a, **k: pytest.fail("read whole"))
    bundle = load_data(tiny_spec(STREAM, data=data_dir, streaming=True, prefetch=0), tok,
                       log=quiet)
    assert bundle.train_records == 45
    assert batches(bundle.train, 12)[0].size == 4  # 11 per pass: crosses into epoch 1
    assert bundle.train.epoch == 1


def test_streaming_pass_covers_each_record_once(tiny_spec, tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"dish {i}", "Cook.") for i in range(24)])
    bundle = load_data(tiny_spec(STREAM, data=tmp_path, streaming=True, shuffle_buffer=4,
                                 batch_size=1, prefetch=0), tok, log=quiet)
    seen = [tok.decode(b.tokens[0]).split("dish ")[1].split("<")[0] for b in batches(bundle.train, 24)]
    assert sorted(seen, key=int) == [str(i) for i in range(24)]
    assert seen != [str(i) for i in range(24)]  # shuffled
    assert bundle.train.epoch == 0 and bundle.train.position == 24


def test_mode_change_restarts_epoch(tiny_spec, data_dir, tok):
    logs = []
    bundle = load_data(tiny_spec(STREAM, data=data_dir, prefetch=0), tok, log=logs.append)
    bundle.train.load_state_dict({"mode": "streaming", "epoch": 2, "consumed": 10,
                                  "position": 3})
    assert bundle.train.epoch == 2 and bundle.train.position == 0
    assert any("resuming at the start of epoch 2" in m for m in logs)


def test_changed_data_is_reported_on_resume(tiny_spec, data_dir, tok):
    first = load_data(tiny_spec(STREAM, data=data_dir, prefetch=0), tok, log=quiet)
    first.train.next_batch()
    state = first.train.state_dict()
    assert state["records"] == 45
    write_jsonl(data_dir / "train.jsonl", [chat(f"dish {i}", "Cook.") for i in range(30)])
    logs = []
    second = load_data(tiny_spec(STREAM, data=data_dir, prefetch=0), tok, log=logs.append)
    second.train.load_state_dict(state)
    assert any("train data has 30 records, 45 when this position was saved" in m for m in logs)
    assert second.train.next_batch().size == 4
