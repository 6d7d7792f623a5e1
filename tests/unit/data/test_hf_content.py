"""A Hugging Face split's content hash follows its data in every source and mode: a split
rewritten before ``--auto-resume`` must be caught streamed or not (the resume check in
data/__init__.py compares this hash with the checkpoint's)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

datasets = pytest.importorskip("datasets")

from mlx_tune.data.hf import find_data  # noqa: E402


def rows(n: int, tag: str) -> list[dict]:
    return [{"text": f"{tag} {i}"} for i in range(n)]


def write_jsonl_splits(folder: Path, splits: dict) -> Path:
    for split, rs in splits.items():
        path = folder / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return folder


def write_parquet_splits(folder: Path, splits: dict) -> Path:
    for split, rs in splits.items():
        (folder / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rs).to_parquet(str(folder / "data" / f"{split}.parquet"))
    return folder


def write_saved(folder: Path, splits: dict) -> Path:
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}
                         ).save_to_disk(str(folder))
    return folder


def train_hash(folder: Path, streaming: bool) -> str:
    spec = SimpleNamespace(data=str(folder), data_fields=None, data_split="train", val_split=0,
                           streaming=streaming)
    return find_data(spec).train.content_hash()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


@pytest.mark.parametrize("writer", [write_jsonl_splits, write_parquet_splits])
def test_rewritten_split_changes_the_hash_streamed_or_not(tmp_path, writer):
    folder = tmp_path / "ds"
    writer(folder, {"train": rows(6, "a"), "validation": rows(2, "v")})
    before = {mode: train_hash(folder, mode) for mode in (False, True)}
    assert before[False] == before[True]  # one hash for both modes: a switch is no change
    writer(folder, {"validation": rows(3, "w")})  # another split: not training's data
    assert train_hash(folder, True) == before[True]
    writer(folder, {"train": rows(6, "b")})  # same count, other text
    after = {mode: train_hash(folder, mode) for mode in (False, True)}
    assert after[False] != before[False] and after[True] != before[True]


def test_save_to_disk_split_rewritten_changes_the_hash(tmp_path):
    first = write_saved(tmp_path / "a", {"train": rows(6, "a"), "test": rows(2, "t")})
    second = write_saved(tmp_path / "b", {"train": rows(6, "b"), "test": rows(2, "t")})
    assert train_hash(first, False) != train_hash(second, False)
    assert train_hash(first, False) == train_hash(first, False)
