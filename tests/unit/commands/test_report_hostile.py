"""`mlx-tune report` against hostile input (issue 22): --html never replaces a file that
is not a report, damaged metrics.jsonl records are skipped and named, never a traceback."""

from __future__ import annotations

import json
import random


from mlx_tune.cli import main
from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE

NOTES = "my notes, not a report\n"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "traceback in" not in err, err
    return err



def write_metrics(run, records):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def night(steps=4):
    """Records as the reporters write them: a start, train reports, an eval, a stop."""
    out = [{"type": "start", "step": 0, "wall_time": 1000.0, "info": {"total_steps": steps}}]
    for s in range(1, steps + 1):
        out.append({"type": "train", "step": s, "loss": 3.0 - s / 10, "learning_rate": 1e-4,
                    "grad_norm": 1.0, "tokens_per_second": 500.0, "trained_tokens": 100 * s,
                    "total_steps": steps, "wall_time": 1000.0 + s})
    out.append({"type": "eval", "step": steps, "val_loss": 2.5, "wall_time": 1000.0 + steps})
    out.append({"type": "stop", "step": steps, "reason": f"finished {steps} steps",
                "exit_code": 0, "wall_time": 1010.0})
    return out


def test_report_html_replaces_only_a_report(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, night())
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    assert main(["report", str(run), "--html", str(notes)]) == EXIT_USAGE
    assert f"{notes}: exists and was not written by mlx-tune report" in one_line(capsys)
    assert notes.read_text() == NOTES
    page = tmp_path / "page.html"
    assert main(["report", str(run), "--html", str(page)]) == EXIT_OK
    assert main(["report", str(run), "--html", str(page)]) == EXIT_OK  # ours: replaced
    capsys.readouterr()
    link = tmp_path / "link.html"
    link.symlink_to(notes)
    assert main(["report", str(run), "--html", str(link), "--force"]) == EXIT_USAGE
    assert "symbolic link" in one_line(capsys) and notes.read_text() == NOTES
    assert main(["report", str(run), "--html", str(notes), "--force"]) == EXIT_OK
    assert notes.read_text().startswith("<!doctype html>")


def test_report_skips_damaged_records_and_names_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    records = night()
    records[2]["step"] = "two"
    records[3]["wall_time"] = [1]
    write_metrics(run, records)
    assert main(["report", str(run), "--html", str(tmp_path / "r.html")]) == EXIT_OK
    page = (tmp_path / "r.html").read_text()  # the terminal table wraps long lines
    assert "2 damaged record(s) skipped, the first" in page
    assert "metrics.jsonl:3: &#x27;step&#x27; is &#x27;two&#x27;; expected an integer" in page


def test_report_of_only_damaged_records_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, [{"type": "train", "step": None, "loss": "low"}, {"type": ["train"]}])
    assert main(["report", str(run)]) == EXIT_ERROR
    assert "metrics.jsonl: holds no usable training records (" in one_line(capsys)


def test_report_survives_randomly_damaged_metrics(tmp_path, capsys):
    """Fault injection: wrong types, nulls, huge and non-finite numbers in random fields
    of real-shaped records; every report ends in 0 or one line with exit 1."""
    rng = random.Random(22)
    bad = ["x", [1], {"a": 1}, True, None, 1e308, -5, 10 ** 30]
    for trial in range(6):
        run = tmp_path / f"run{trial}"
        records = night()
        for r in records:
            if rng.random() < 0.3:
                key = rng.choice(sorted(r) + ["info", "early_stopping"])
                r[key] = rng.choice(bad)
        write_metrics(run, records)
        (run / "metrics.jsonl").open("a").write('{"type": "train", "step": 9, "lo')  # torn
        code = main(["report", str(run), "--html", str(run / "r.html")])
        err = capsys.readouterr().err
        assert code in (EXIT_OK, EXIT_ERROR) and "Traceback" not in err
        assert "traceback in" not in err, (trial, err)


def test_report_never_writes_plots_through_a_planted_link(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, night())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere)
    assert main(["report", str(run)]) == EXIT_OK
    assert not list(elsewhere.iterdir())
    page = (run / "report.html").read_text()
    assert "data:image/png;base64," in page  # the plots are still in the page
    assert "is a symbolic link" in " ".join(capsys.readouterr().out.split())
