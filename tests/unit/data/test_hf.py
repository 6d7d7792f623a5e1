"""Hugging Face datasets as data (data/hf.py), offline: local parquet and JSON lines
directories, a save_to_disk directory, a dataset repo in a temporary Hugging Face cache,
and the error when it is not cached. The reference for every loaded dataset is the same
rows written as a JSONL directory: both must give identical batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from mlx_tune.config.spec import SpecError, build_spec  # noqa: E402
from mlx_tune.data import DataError, load_data  # noqa: E402
from mlx_tune.data.hf import HFSplit, find_data  # noqa: E402
from mlx_tune.data.preflight import check_data  # noqa: E402
from mlx_tune.data.records import read_records  # noqa: E402
from mlx_tune.data.testing import chat, tiny_tokenizer, write_jsonl  # noqa: E402
from mlx_tune.training.testset import find_test_file  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
TOOLS = REPO / "data" / "tools"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and every cache in tmp_path (huggingface_hub reads its constants at
    import: patch them as well as the variables)."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("HF_HUB_CACHE", str(cache)),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    return cache


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(tiny_model))


def rows(n, tag="item"):
    return [chat(f"{tag} {i}", "Mix flour and eggs. " * (1 + i % 5), quality=0.5 + i % 2)
            for i in range(n)]


# Small batches, and every validation batch: what is compared is all of the data.
SMALL_BATCHES = {"batch_size": 2, "max_length": 64, "val_batches": -1}


def quiet(_):
    pass


def batches(bundle, n=4):
    train = [bundle.train.next_batch() for _ in range(n)]
    valid = bundle.valid.batches() if bundle.valid else []
    bundle.close()
    return [(b.tokens, b.mask) for b in train], [(b.tokens, b.mask) for b in valid]


def assert_same(a, b):
    (ta, va), (tb, vb) = a, b
    assert len(ta) == len(tb) and len(va) == len(vb) and va
    for (ia, ma), (ib, mb) in zip(ta + va, tb + vb):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)


def jsonl_reference(tmp_path, train, valid=None, **kw):
    d = tmp_path / "reference"
    write_jsonl(d / "train.jsonl", train)
    if valid is not None:
        write_jsonl(d / "valid.jsonl", valid)
    return d


def write_parquet(folder: Path, splits: dict) -> Path:
    for name, data in splits.items():
        path = folder / "data" / f"{name}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(data).to_parquet(str(path))
    return folder


# -- local directories -------------------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_directory_gives_the_batches_of_the_same_jsonl(tiny_spec, tmp_path, tok,
                                                               streaming):
    train, valid = rows(12), rows(5, "val")
    d = write_parquet(tmp_path / "pq", {"train": train, "validation": valid})
    ref = jsonl_reference(tmp_path, train, valid)
    got = batches(load_data(tiny_spec(SMALL_BATCHES, data=d, streaming=streaming), tok, log=quiet))
    want = batches(load_data(tiny_spec(SMALL_BATCHES, data=ref, streaming=streaming), tok,
                             log=quiet))
    assert_same(got, want)


def as_strings(record: dict) -> dict:
    """Tool-call arguments as JSON strings, as Hub datasets store them: an arrow column
    cannot hold objects in some rows and strings in others (the shipped data has both)."""
    for m in record["messages"]:
        for call in m.get("tool_calls") or ():
            args = call["function"]["arguments"]
            call["function"]["arguments"] = args if isinstance(args, str) else json.dumps(args)
    return record


def test_tool_calls_survive_arrow(tiny_spec, tmp_path, model_tok):
    """Arrow unifies struct keys across rows (every message gets tool_calls, every call's
    arguments every other tool's argument names, as None): records must come back as
    written, so the rendered tokens equal those of the shipped JSONL."""
    train, valid = ([as_strings(json.loads(line)) for line in
                     (TOOLS / name).read_text().splitlines()][:n]
                    for name, n in (("train.jsonl", 16), ("valid.jsonl", 6)))
    d = write_parquet(tmp_path / "pq", {"train": train, "validation": valid})
    files = find_data(tiny_spec(SMALL_BATCHES, data=d))
    for got, want in zip(read_records(files.train), read_records(jsonl_reference(
            tmp_path, train, valid) / "train.jsonl")):
        assert got.messages == want.messages and got.tools == want.tools
    kw = {"max_length": 1024}
    assert_same(batches(load_data(tiny_spec(SMALL_BATCHES, data=d, **kw), model_tok, log=quiet)),
                batches(load_data(tiny_spec(SMALL_BATCHES, data=tmp_path / "reference", **kw),
                                  model_tok, log=quiet)))
    notes = []
    check_data(tiny_spec(SMALL_BATCHES, data=d), model_tok, log=notes.append)
    assert any("split 'train'" in n and "16 tool-calling records" in n for n in notes)


def test_jsonl_files_with_a_column_mapping_and_a_named_val_split(tiny_spec, tmp_path, tok):
    train, valid = rows(10), rows(4, "val")
    d = tmp_path / "hub-style"

    def renamed(rs):
        return [{"conv": r["messages"], "score": r["quality"]} for r in rs]
    write_jsonl(d / "data" / "train-00000-of-00001.jsonl", renamed(train))
    write_jsonl(d / "data" / "heldout-00000-of-00001.jsonl", renamed(valid))
    spec = tiny_spec(SMALL_BATCHES, data=d, val_split="heldout",
                     data_fields={"messages": "conv", "quality": "score"})
    got = batches(load_data(spec, tok, log=quiet))
    reference = tiny_spec(SMALL_BATCHES, data=jsonl_reference(tmp_path, train, valid))
    assert_same(got, batches(load_data(reference, tok, log=quiet)))
    assert [r.quality for r in read_records(find_data(spec).train)] == \
        [r["quality"] for r in train]


def test_save_to_disk_directory_with_val_fraction_and_test_split(tiny_spec, tmp_path, tok):
    train, test = rows(20), rows(3, "test")
    d = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(d))
    spec = tiny_spec(SMALL_BATCHES, data=d, val_split=0.25)
    # Held-out rows are chosen by row number exactly as JSONL lines by line number.
    assert_same(batches(load_data(spec, tok, log=quiet)),
                batches(load_data(tiny_spec(SMALL_BATCHES, data=jsonl_reference(tmp_path, train),
                                            val_split=0.25),
                                  tok, log=quiet)))
    found = find_test_file(spec)
    assert isinstance(found, HFSplit) and found.split == "test"
    assert [r.messages for r in read_records(found)] == \
        [tuple(m for m in r["messages"]) for r in test]


def test_validation_split_is_not_read_until_the_first_evaluation(tiny_spec, tmp_path, tok):
    d = write_parquet(tmp_path / "pq", {"train": rows(10), "validation": rows(6, "val")})
    bundle = load_data(tiny_spec(SMALL_BATCHES, data=d), tok, log=quiet)
    for _ in range(8):
        bundle.train.next_batch()
    assert bundle.valid.path.split == "validation" and bundle.valid.path.rows_read == 0
    assert len(bundle.valid.batches()) == 3
    assert bundle.valid.path.rows_read == 6
    bundle.close()


# -- the Hugging Face cache ----------------------------------------------------------

def place_in_cache(cache: Path, repo_id: str, splits: dict) -> None:
    """A dataset repo in the hub cache layout: refs/main -> snapshots/<sha>/data/*.parquet
    (real caches hold links to blobs/; files read the same)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / ("datasets--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    write_parquet(storage / "snapshots" / sha, splits)


def test_hub_id_is_read_from_the_cache_offline(tiny_spec, tmp_path, tok, offline):
    train, valid = rows(12), rows(4, "val")
    place_in_cache(offline, "chefs/recipes", {"train": train, "validation": valid})
    lines = []
    got = batches(load_data(tiny_spec(SMALL_BATCHES, data="chefs/recipes"), tok, log=lines.append))
    reference = tiny_spec(SMALL_BATCHES, data=jsonl_reference(tmp_path, train, valid))
    assert_same(got, batches(load_data(reference, tok, log=quiet)))
    assert any("chefs/recipes" in line and "'train'" in line for line in lines)


def test_hub_id_not_cached_offline_is_one_clear_line(tiny_spec, tok):
    with pytest.raises(DataError) as err:
        load_data(tiny_spec(SMALL_BATCHES, data="chefs/missing"), tok, log=quiet)
    text = str(err.value)
    assert "'chefs/missing'" in text and "HF_HUB_OFFLINE" in text and "\n" not in text
    assert "datasets--chefs--missing" in text


# -- errors ---------------------------------------------------------------------------

def test_a_bad_row_names_dataset_split_and_row(tiny_spec, tmp_path, tok):
    bad = rows(5)
    bad[3]["messages"][0]["role"] = "robot"
    d = write_parquet(tmp_path / "pq", {"train": bad})
    with pytest.raises(DataError, match=r"pq split 'train' row 3: message 0 has role 'robot'"):
        load_data(tiny_spec(SMALL_BATCHES, data=d), tok, log=quiet)


def test_unknown_split_and_missing_column_are_named(tiny_spec, tmp_path, tok):
    d = write_parquet(tmp_path / "pq", {"train": rows(4), "validation": rows(2)})
    with pytest.raises(DataError, match=r"val_split: .* no split 'dev' \(splits: train, "
                                        "validation\\)"):
        load_data(tiny_spec(SMALL_BATCHES, data=d, val_split="dev"), tok, log=quiet)
    with pytest.raises(DataError, match=r"data_split: .* no split 'training'"):
        load_data(tiny_spec(SMALL_BATCHES, data=d, data_split="training"), tok, log=quiet)
    with pytest.raises(DataError, match=r"data_fields.messages: .* no column 'conv' \(columns: "
                                        "messages, quality\\)"):
        load_data(tiny_spec(SMALL_BATCHES, data=d, data_fields={"messages": "conv"}), tok,
                  log=quiet)


def test_split_names_and_fields_are_refused_for_jsonl_directories(tiny_spec, tmp_path, tok):
    d = write_jsonl(tmp_path / "j" / "train.jsonl", rows(4)).parent
    with pytest.raises(DataError, match="'val_split' applies to Hugging Face datasets.*"
                                        "give a fraction"):
        load_data(tiny_spec(SMALL_BATCHES, data=d, val_split="validation"), tok, log=quiet)


@pytest.mark.parametrize("overrides, message", [
    ({"val_split": 0.9}, "'val_split' is 0.9; expected a split name or a number >= 0 and "
                         "<= 0.5"),
    ({"val_split": [1]}, r"'val_split' is \[1\]; expected a split name or a number"),
    ({"data_fields": {"mesages": "conv"}}, "'data_fields' has 'mesages'.*did you mean "
                                           "'messages'"),
    ({"data_fields": {"messages": 3}}, "'data_fields.messages' is 3; expected a dataset "
                                       "column name"),
    ({"data_fields": "messages"}, "'data_fields' is 'messages'; expected a mapping"),
])
def test_spec_errors(overrides, message):
    with pytest.raises(SpecError, match=message):
        build_spec(overrides={"data": "x", **overrides})
