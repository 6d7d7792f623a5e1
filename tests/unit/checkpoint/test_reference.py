"""The precomputed reference's table (checkpoint/reference.py, training/reference.py):
row keys that ignore padding and width but follow every token up to the last target,
a file written atomically and read back exactly, and one-line refusals of a missing,
corrupted or unpinned file and of data that changed since the values were computed."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_tune.checkpoint.reference import (TABLE_NAME, MissingRow, ReferenceError,
                                           ReferenceTable, load_table, row_keys, save_table)
from mlx_tune.config.spec import build_spec
from mlx_tune.data.batch import Batch
from mlx_tune.data.testing import write_jsonl

PREFERENCE = Path(__file__).resolve().parents[3] / "data" / "preference"


def padded(rows: list[tuple[list[int], list[int]]], width: int, pad: int = 0) -> Batch:
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (ids, m) in enumerate(rows):
        tokens[i, :len(ids)], mask[i, :len(m)] = ids, m
    return Batch(tokens, mask)


ROW = ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1])  # a prompt of 2, a completion of 3


def test_a_row_key_ignores_padding_and_width_and_follows_every_counted_token():
    narrow, wide = padded([ROW], 8), padded([ROW], 16, pad=3)
    assert row_keys(narrow) == row_keys(wide)
    # Tokens after the last target cannot change causal log-probs: not in the key.
    tail = padded([([5, 6, 7, 8, 9, 4, 4], [0, 0, 1, 1, 1, 0, 0])], 8)
    assert row_keys(tail) == row_keys(narrow)
    changed_target = padded([([5, 6, 7, 8, 2], [0, 0, 1, 1, 1])], 8)
    changed_prompt = padded([([1, 6, 7, 8, 9], [0, 0, 1, 1, 1])], 8)
    shifted_mask = padded([([5, 6, 7, 8, 9], [0, 1, 1, 1, 1])], 8)
    keys = {row_keys(b)[0] for b in (narrow, changed_target, changed_prompt, shifted_mask)}
    assert len(keys) == 4
    assert row_keys(padded([([0, 0], [0, 0])], 8)) == [None]  # no target: a padding row


def test_attach_finds_each_row_in_any_batch_and_a_missing_row_is_an_internal_error():
    other = ([5, 6, 3, 3], [0, 0, 1, 1])
    table = ReferenceTable({}, {})
    table.add(padded([ROW, other], 8), np.array([-1.5, -2.25], np.float32))
    attached = table.attach(padded([other, ([0], [0]), ROW], 16))
    assert attached.ref_logps.tolist() == [-2.25, 0.0, -1.5]
    assert attached.tokens.shape == (3, 16)
    with pytest.raises(MissingRow, match="not in the precomputed reference table"):
        table.attach(padded([([5, 6, 1], [0, 0, 1])], 8))


def test_the_file_reads_back_exactly_and_is_replaced_atomically(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    table = ReferenceTable({}, {"data": {"train": "1:ab"}, "max_length": 128})
    table.add(padded([([1, 2, int(t)], [0, 1, 1]) for t in range(3, 40)], 8),
              rng.normal(size=37).astype(np.float32) * 100)
    path = tmp_path / TABLE_NAME
    sha = save_table(table, path)
    back = load_table(path, sha)
    assert back.values == table.values and back.meta == table.meta
    before = path.read_bytes()
    # A write that dies before its rename leaves the old file whole and nothing else.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        save_table(ReferenceTable({}, {"other": 1}), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [TABLE_NAME]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-3] + b"xyz"), "not the one the checkpoint pinned"),
])
def test_a_missing_or_changed_file_is_one_line_never_a_recompute(tmp_path, damage, message):
    path = tmp_path / TABLE_NAME
    sha = save_table(ReferenceTable({b"k" * 16: 1.0}, {}), path)
    damage(path)
    with pytest.raises(ReferenceError, match=message) as info:
        load_table(path, sha)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and "--force-fresh" in text


def test_an_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / TABLE_NAME
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ReferenceError, match="unreadable") as info:
        load_table(path)
    assert "\n" not in str(info.value)


def data_dir(dest: Path) -> Path:
    for split, n in (("train", 8), ("valid", 4)):
        write_jsonl(dest / f"{split}.jsonl",
                    (PREFERENCE / f"{split}.jsonl").read_text().splitlines()[:n])
    return dest


def test_a_resume_on_changed_data_refuses_the_stored_values(tmp_path, tiny_model):
    from mlx_tune.training.reference import PIN_KEY, resumed_reference, table_meta

    data = data_dir(tmp_path / "data")
    spec = build_spec(overrides={"model": str(tiny_model), "data": str(data),
                                 "objective": "dpo", "fine_tune_type": "full",
                                 "output_dir": str(tmp_path / "run")})
    run = Path(spec.output_dir)
    run.mkdir()
    sha = save_table(ReferenceTable({b"k" * 16: -3.0}, table_meta(spec)), run / TABLE_NAME)
    checkpoint = SimpleNamespace(path=run / "checkpoints" / "step-0000004",
                                 meta={PIN_KEY: {"file": TABLE_NAME, "sha256": sha}})
    assert resumed_reference(run, checkpoint, spec).table.values == {b"k" * 16: -3.0}

    lines = (data / "valid.jsonl").read_text().splitlines()
    (data / "valid.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(ReferenceError, match="the data changed") as info:
        resumed_reference(run, checkpoint, spec)
    text = str(info.value)
    assert "\n" not in text and str(run / TABLE_NAME) in text and "data.valid" not in text
    assert "data:" in text and "--force-fresh" in text

    unpinned = SimpleNamespace(path=checkpoint.path, meta={})
    with pytest.raises(ReferenceError, match="written without a precomputed reference"):
        resumed_reference(run, unpinned, spec)
