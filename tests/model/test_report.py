"""`mlx-tune report`: the morning report of a finished run, from the metrics.jsonl it
wrote. Images are opened with Pillow; numbers are checked against what train() itself
returned. A run killed mid-way: tests/e2e/test_report.py."""

from __future__ import annotations

import json

import pytest

from mlx_tune.cli import main
from mlx_tune.training.recipe import train

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

SERIES = ("train loss", "validation loss", "learning rate", "gradient norm", "tokens/s",
          "peak memory", "cache memory", "resident memory")
PLOTS = ("loss", "lr", "grad_norm", "tokens_per_second", "memory")


def check_report(out, capsys) -> str:
    assert main(["report", str(out)]) == 0
    terminal = capsys.readouterr().out
    page = (out / "report.html").read_text()
    for series in SERIES:
        assert series in page, series
    # One more panel per metric the evaluations carried (sft: perplexity, accuracy, ...).
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if x.strip()]
    metrics = {n for r in records if r.get("type") == "eval" for n in r["metrics"]}
    assert metrics == {"perplexity", "accuracy", "confidence", "entropy"}
    plots = PLOTS + tuple(f"metric_{n}" for n in metrics)
    assert page.count("data:image/png;base64,") == len(plots)
    for name in plots:
        with Image.open(out / "report" / f"{name}.png") as img:
            img.load()
            assert img.format == "PNG" and img.size == (800, 360)
    return terminal


def test_report_of_a_finished_run(tiny_spec, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # Every checkpoint save hits a full disk: the report must list the failed saves.
    monkeypatch.setenv("MLX_TUNE_FAULTS", "disk_full")
    result = train(tiny_spec(output_dir=out, lora={"rank": 4}), resume="fresh",
                   log=lambda m: None)
    capsys.readouterr()
    terminal = check_report(out, capsys)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert result.step == 8
    assert "finished" in terminal and result.reason in terminal
    assert f"{result.best_val_loss:.4f} at step" in terminal
    assert "failed saves: " in terminal
    trained = [r for r in records if r["type"] == "train"][-1]["trained_tokens"]
    assert f"{trained:,}" in terminal and len(evals) >= 2
    # The memory line: the highest figures of the reports, and the first-step check.
    train_recs = [r for r in records if r["type"] == "train"]
    start = next(r for r in records if r["type"] == "start")["info"]
    resident = max(r["resident_mb"] for r in train_recs)
    flat = " ".join(terminal.replace("│", " ").split())  # rich wraps long rows
    assert f"resident up to {resident:,.0f} MB" in flat
    assert f"(limit {start['cache_limit_mb']:,.0f} MB)" in flat
    assert f"first step at the widest batch {start['first_step']['peak_mb']:,.0f} MB" in flat

