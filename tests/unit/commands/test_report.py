"""`mlx-tune report` on a directory without metrics.jsonl: a one-line error. Reports of
real runs are in tests/model/test_report.py and tests/e2e/test_report.py."""

from __future__ import annotations

from mlx_tune.cli import main


def test_report_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and len(err.strip().splitlines()) == 1
