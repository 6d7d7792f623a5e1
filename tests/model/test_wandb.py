"""Weights & Biases as a tracker (report_to: [wandb]), offline.

A real run of the tiny model, stopped at a checkpoint and resumed, with WANDB_MODE=offline.
The .wandb files wandb itself wrote are decoded with wandb's own protobuf schema
(``wandb.proto.wandb_internal_pb2.Record``) and compared with the metrics.jsonl that the
same run wrote: the values, the steps, one run id across the resume, the spec as config.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from mlx_tune.reporting.wandb_reporter import RUN_ID_FILE
from mlx_tune.training.recipe import train

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768  # the LevelDB log layout of .wandb files: 32 KiB blocks, 7-byte chunk headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every Record of one .wandb file. wandb >= 0.2x reads these in Go (wandb-core); the
    container is LevelDB's log format behind a 7-byte ':W&B' header."""
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def complete_records(path: Path, timeout: float = 30.0) -> list:
    """The records once wandb-core has written the run's exit record: ``finish()`` can
    return before the service process has flushed the file (seen under CPU load)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
        except (struct.error, AssertionError, DecodeError):  # still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) \
                or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                         for i in r.history.item})
    return rows


# Samples reach wandb too; TensorBoard is left to follow report_to (off: wandb alone).
WANDB_RUN = {"max_steps": 4, "num_samples": 1, "sample_max_tokens": 4, "report_to": ["wandb"],
             "tensorboard": None, "eval_at_start": False, "lora": {"rank": 4}}


def test_offline_run_and_resume_are_one_wandb_run(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_PROJECT", "mlx-tune-test")
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "run"
    first = train(tiny_spec(WANDB_RUN, output_dir=out), resume="fresh", log=lambda m: None)
    assert first.exit_code == 0 and first.step == 4
    second = train(tiny_spec(WANDB_RUN, output_dir=out, max_steps=8), resume="auto",
                   log=lambda m: None)
    assert second.exit_code == 0 and second.step == 8
    assert not (out / "tensorboard").exists()  # report_to: [wandb] alone

    run_id = (out / RUN_ID_FILE).read_text().strip()
    files = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per process, both the same wandb run
    attempts = [complete_records(f) for f in files]
    for records in attempts:
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert runs and runs[0].run_id == run_id and runs[0].project == "mlx-tune-test"
        config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
        assert config["lora"]["rank"] == 4 and config["report_to"] == ["wandb"]
    first_rows, second_rows = (history(r) for r in attempts)
    # The resumed attempt continues at the checkpoint's step; steps never go back.
    steps = [row["global_step"] for row in first_rows + second_rows]
    assert steps == sorted(steps) and min(r["global_step"] for r in second_rows) > 4

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = first_rows + second_rows
    train_logged = {r["global_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    train_jsonl = {m["step"]: m["loss"] for m in metrics if m["type"] == "train"}
    assert train_logged == pytest.approx(train_jsonl) and sorted(train_jsonl) == [2, 4, 6, 8]
    lr_logged = {r["global_step"]: r["train/learning_rate"] for r in rows if "train/loss" in r}
    assert lr_logged == pytest.approx({m["step"]: m["learning_rate"]
                                       for m in metrics if m["type"] == "train"})
    val_logged = {r["global_step"]: r["val/loss"] for r in rows if "val/loss" in r}
    val_jsonl = {m["step"]: m["val_loss"] for m in metrics if m["type"] == "eval"}
    assert val_logged == pytest.approx(val_jsonl) and sorted(val_jsonl) == [4, 8]
    # Each evaluation's generated samples: a wandb table file holding what metrics.jsonl holds.
    for f, attempt_rows in zip(files, (first_rows, second_rows)):
        for row in (r for r in attempt_rows if "val/loss" in r):
            table = json.loads((f.parent / "files" / row["samples/path"]).read_text())
            sample = next(m for m in metrics if m["type"] == "eval"
                          and m["step"] == row["global_step"])["samples"][0]
            assert table["columns"][:3] == ["step", "prompt", "output"]
            assert table["data"][0][:3] == [row["global_step"], sample["prompt"], sample["text"]]
    summaries = [u for rec in attempts[1] if rec.WhichOneof("record_type") == "summary"
                 for u in rec.summary.update]
    stop = [m for m in metrics if m["type"] == "stop"][-1]
    assert any(u.key == "stop_reason" and json.loads(u.value_json) == stop["reason"]
               for u in summaries)
