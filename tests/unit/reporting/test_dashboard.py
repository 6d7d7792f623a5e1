"""Tests for mlx_tune.reporting.dashboard: what the live view shows, and that reporting costs the
training loop nothing (rendering happens only in the refresh thread)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from mlx_tune.exit_codes import EXIT_VAL_PLATEAU
from mlx_tune.reporting import dashboard as dash
from mlx_tune.reporting.dashboard import LEAK_MARK, RichDashboard, fmt_duration
from mlx_tune.reporting.records import EvalReport, TrainReport
from tests.report_fixtures import counters


def train(step: int = 900, **kw) -> TrainReport:
    base = dict(
        step=step, total_steps=2000, epoch=1, loss=3.2, loss_avg=3.4, loss_window=50,
        loss_trend=-0.02, learning_rate=1.8e-4, grad_norm=0.85, tokens_per_second=1510.3,
        steps_per_second=0.42, eta_seconds=6.5 * 3600, trained_tokens=1_234_567,
        memory_mb=14051.4, peak_memory_mb=15020.0, memory_delta_mb=245.2, leak_warning=True,
        cache_memory_mb=512.3, resident_mb=15220.1, steps_since_checkpoint=150, last_checkpoint="runs/x/checkpoints/step-0000750",
        # A skipped step, a plateau check, then two skipped steps in a row.
        skipped_steps=3, early_stopping=counters([float("nan"), 3.0, float("nan"), float("nan")]),
    )
    base.update(kw)
    return TrainReport(**base)


def evalr(step: int = 900, **kw) -> EvalReport:
    base = dict(
        step=step, val_loss=2.91, metrics={"perplexity": 18.36, "accuracy": 0.412,
                                           "confidence": 0.37, "entropy": 2.1}, best_val_loss=2.85, best_step=750, is_best=False, seconds=12.5,
        samples=[{"prompt": "Say hi [bold]", "text": "Hello there,\nfriend. " + "x" * 500,
                  "metrics": {}}],
    )
    base.update(kw)
    return EvalReport(**base)


def quiet_console() -> Console:
    # Not a terminal: rich's Live then draws nothing until stop, so tests stay silent.
    return Console(file=io.StringIO(), width=120, record=True)


def text_of(d: RichDashboard) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(d.render())
    return console.export_text()


def test_render_shows_the_key_fields():
    d = RichDashboard(2000, console=quiet_console())
    d._info = {"model": "Qwen/Qwen3-0.6B", "backend": "mlx", "trainable_params": 1_500_000,
               "cache_limit_mb": 4096.0, "wired_limit_mb": 49152.0, "memory_cap_mb": 41779.2}
    d.on_train(train())
    d.on_eval(evalr())
    d.close()
    out = text_of(d)
    for needle in (
        "Qwen/Qwen3-0.6B", "mlx", "1.5M trainable params",
        "45%", "900/2000",  # progress
        "3.2000", "avg50 3.4000", "↓",  # loss, moving average, trend
        "1.8e-4", "0.85",  # lr, grad norm
        "1510", "0.42",  # tokens/s, steps/s
        "6h 30m",  # eta
        "14051 MB", "peak 15020 MB", "+245 MB", LEAK_MARK,  # memory
        "512 MB  (limit 4096 MB)", "15220 MB",  # cache and its bound, resident
        "49152 MB", "41779 MB",  # wired limit and memory cap (macOS)
        "-150 steps", "runs/x/checkpoints/step-0000750",  # checkpoint
        "2.91", "val perplexity", "18.36", "2.85 @ 750",  # validation
        "plateau 1", "non-finite in a row 2",  # early stopping counters
        "Say hi [bold]", "Hello there,\\nfriend.",  # latest sample, markup not interpreted
    ):
        assert needle in out, needle
    assert "x" * 300 not in out  # the sample is truncated


def test_no_leak_mark_without_warning_and_rising_trend():
    d = RichDashboard(2000, console=quiet_console())
    d.on_train(train(leak_warning=False, loss_trend=0.5))
    d.close()
    out = text_of(d)
    assert LEAK_MARK not in out and "↑" in out


def test_checkpoint_event_newer_than_report_wins():
    d = RichDashboard(2000, console=quiet_console())
    d.on_train(train())
    d.on_checkpoint(900, "runs/x/checkpoints/step-0000900")
    d.close()
    out = text_of(d)
    assert "just saved" in out and "step-0000900" in out


def test_render_before_any_report_and_after_stop():
    d = RichDashboard(100, console=quiet_console())
    assert "waiting for the first report" in text_of(d)
    d.on_stop("early stop (val_plateau): validation loss plateaued", EXIT_VAL_PLATEAU)
    assert "stopped: early stop (val_plateau): validation loss plateaued (exit 4)" in text_of(d)


def test_render_failure_does_not_escape(monkeypatch):
    def boom(*a):
        raise ZeroDivisionError("bad")

    monkeypatch.setattr(dash, "render_dashboard", boom)
    d = RichDashboard(100, console=quiet_console())
    assert "dashboard render failed" in text_of(d)


def test_on_train_only_stores_the_record(monkeypatch):
    # The loop's cost is what on_train does in the loop's thread: no rendering there, ever
    # (rich's refresh thread renders at its own rate), and a trend of bounded length.
    main = threading.current_thread()
    in_loop_thread = []
    real = dash.render_dashboard
    monkeypatch.setattr(dash, "render_dashboard",
                        lambda *a: in_loop_thread.append(threading.current_thread() is main)
                        or real(*a))
    d = RichDashboard(20_000, refresh_per_second=2, console=quiet_console())
    d.on_start({"model": "m"})  # starts Live: one initial render, in this thread
    in_loop_thread.clear()
    reports = [train(step=i) for i in range(10_000)]
    for r in reports:
        d.on_train(r)
    assert not any(in_loop_thread)  # renders, if any, came from the refresh thread
    snap = d.snapshot()
    d.close()
    assert snap.train is reports[-1]
    assert [step for step, _ in snap.losses] == list(range(10_000 - dash.TREND_WIDTH, 10_000))
    assert len(d._losses) <= 4 * dash.TREND_WIDTH  # the stored history stays bounded


def test_refresh_thread_renders_at_its_own_rate(monkeypatch):
    calls = []
    real = dash.render_dashboard
    monkeypatch.setattr(dash, "render_dashboard", lambda *a: calls.append(1) or real(*a))
    d = RichDashboard(100, refresh_per_second=20, console=quiet_console())
    d.on_train(train(step=1, total_steps=100))  # also starts the view lazily
    time.sleep(0.4)
    d.close()
    assert len(calls) >= 3  # renders happened with no further reporter calls


def test_messages_print_above_the_view():
    console = quiet_console()
    d = RichDashboard(100, console=console)
    d.on_start({"model": "m"})
    d.on_message("resumed from [step 40]")
    d.on_message("loss spike", "warning")
    d.on_train(train(step=41, total_steps=100))
    d.close()
    out = console.export_text()
    assert "resumed from [step 40]" in out and "warning: loss spike" in out
    assert out.index("loss spike") < out.index("41/100")  # final frame comes after messages


def test_close_is_idempotent_and_stops_live():
    d = RichDashboard(100, console=quiet_console())
    d.on_start({})
    d.close()
    d.close()
    d.on_train(train(step=2, total_steps=100))  # after close: stored, no new Live
    assert d._live is None


@pytest.mark.parametrize("sec,text", [(None, "?"), (5, "5s"), (65, "1m 05s"), (6.5 * 3600, "6h 30m"),
                                      (90000, "1d 1h"), (float("inf"), "?")])
def test_fmt_duration(sec, text):
    assert fmt_duration(sec) == text


def test_counters_have_readable_labels_and_skipped_steps_appear_once():
    r = train(early_stopping=counters([3.0, 3.0, 3.0, 3.0, float("nan")]), skipped_steps=1)
    d = RichDashboard(2000, console=quiet_console())
    d.on_train(r)
    d.close()
    text = text_of(d)
    assert "plateau 1" in text and "no val improvement 0" in text and "grad spikes 0" in text
    assert "non-finite in a row 1" in text
    assert "_counter" not in text and "consecutive_nonfinite" not in text
    assert text.lower().count("skipped") == 1


def test_the_moving_average_label_names_its_window():
    d = RichDashboard(2000, console=quiet_console())
    d.on_train(train(loss_window=20))
    d.close()
    text = text_of(d)
    assert "avg20 3.4000" in text and "avg50" not in text


def test_sparkline_puts_val_points_on_the_train_scale():
    line, points, scale = dash.sparkline([(1, 4.0), (2, 3.0), (3, 2.0)], [(2, 4.0)])
    # levels: (v - 2) / (4 - 2) * 7 -> 7, 3.5 (rounds to 4), 0
    assert line.plain == "█▅▁" and points.plain == " █ " and scale == "2.0–4.0"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_dashboard_in_a_real_terminal_shows_the_trend(tmp_path):
    """The live view in a real pseudo-terminal (tmux), captured from the screen."""
    script = tmp_path / "live.py"
    script.write_text(f"""
import sys, time
sys.path[:0] = [{str(Path(__file__).resolve().parents[3])!r}]
from mlx_tune.reporting.dashboard import RichDashboard
from tests.unit.reporting.test_dashboard import train, evalr
d = RichDashboard(2000, refresh_per_second=10)
d.on_start({{"model": "tiny", "backend": "mlx"}})
for i in range(30):
    d.on_train(train(step=10 * (i + 1), loss=3.0 - 0.05 * i, leak_warning=False))
    if i % 10 == 9:
        d.on_eval(evalr(step=10 * (i + 1), val_loss=3.1 - 0.05 * i, samples=[]))
time.sleep(1.0)
open({str(tmp_path / "ready")!r}, "w").close()
time.sleep(30)
""")
    session = f"mlxtune-dash-{os.getpid()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "40",
                    f"{sys.executable} {script}"], check=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert time.time() < deadline, "the dashboard never came up"
            time.sleep(0.1)
        # A capture can land mid-redraw (a loaded machine): read the screen until a full
        # frame shows, within the deadline; the assertions below then check its content.
        while True:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True, check=True).stdout
            if "loss trend" in screen and "val points" in screen or time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "loss trend" in screen and "val points" in screen, screen
    trend = next(line for line in screen.splitlines() if "loss trend" in line)
    assert "█" in trend and "▁" in trend  # falling loss: from the top block to the bottom
    assert "plateau 1" in screen and "plateau_counter" not in screen
