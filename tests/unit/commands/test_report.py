"""`mlx-tune report` on a directory without metrics.jsonl: a one-line error. Reports of
real runs are in tests/model/test_report.py and tests/e2e/test_report.py."""

from __future__ import annotations

from mlx_tune.cli import main


def test_report_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and len(err.strip().splitlines()) == 1


def test_report_html_into_a_folder_that_does_not_exist_yet(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a crash would leave its log here, not in the checkout
    from tests.unit.training.test_loop import FakeBackend, make_spec, run, trainer
    spec = make_spec(tmp_path, max_steps=3)
    assert run(trainer(spec, FakeBackend(spec))).exit_code == 0
    page = tmp_path / "pages" / "tonight" / "report.html"
    assert main(["report", spec.output_dir, "--html", str(page)]) == 0, capsys.readouterr().err
    assert page.read_text().startswith("<!doctype html>")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main(["report", spec.output_dir, "--html", str(blocked / "report.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mlx-tune: error: --html {blocked / 'report.html'}: {blocked} is not a directory"
    assert not (tmp_path / "mlx-tune-crash.log").exists()
