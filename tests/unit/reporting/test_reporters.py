"""Tests for mlx_tune.reporting.records / reporters / tb / keepawake: exact lines, resume-safe
metrics.jsonl, TensorBoard events read back from disk, reporter selection."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.exit_codes import EXIT_PLATEAU
from mlx_tune.system import keepawake
from mlx_tune.reporting.text import (
    JsonlReporter,
    PlainReporter,
    fmt_dec,
    fmt_lr,
    format_eval_line,
    format_train_line,
)
from mlx_tune.reporting.records import EvalReport, NullReporter, Reporters, TrainReport
from mlx_tune.reporting.factory import make_reporters
from tests.report_fixtures import counters

EXAMPLE_LINE = (
    "step 900/2000 45% | loss=3.2 | loss_avg=3.4 | lr=1.8e-4 | tok/s=1510 | eta_h=6.5"
    " | ckpt=-150 | mem_mb=14051 | cache_mb=512 | rss_mb=15220 | mem_delta=+245"
)


def train(step: int = 900, **kw) -> TrainReport:
    base = dict(
        step=step, total_steps=2000, epoch=1, loss=3.2, loss_avg=3.4, loss_window=50, loss_trend=-0.02,
        learning_rate=1.8e-4, grad_norm=0.85, tokens_per_second=1510.3, steps_per_second=0.42,
        eta_seconds=6.5 * 3600, trained_tokens=1_234_567, memory_mb=14051.4,
        peak_memory_mb=15020.0, memory_delta_mb=245.2, leak_warning=False,
        cache_memory_mb=512.3, resident_mb=15220.1, steps_since_checkpoint=150,
        last_checkpoint="runs/x/checkpoints/step-0000750",
        skipped_steps=0, early_stopping=counters([3.0, 3.0, 3.0, 3.0]),  # a plateau check
        wall_time=1_700_000_000.0 + step,
    )
    base.update(kw)
    return TrainReport(**base)


def evalr(step: int = 900, **kw) -> EvalReport:
    base = dict(
        step=step, val_loss=2.91, metrics={"perplexity": 18.36, "accuracy": 0.412,
                                           "confidence": 0.37, "entropy": 2.1}, best_val_loss=2.85, best_step=750, is_best=False, seconds=12.5,
        samples=[{"prompt": "Say hi", "text": "hi\nthere", "metrics": {"len": 2.0}}],
    )
    base.update(kw)
    return EvalReport(**base)


# ------------------------------------------------------------------ plain lines
def test_train_line_reproduces_the_documented_example():
    assert format_train_line(train()) == EXAMPLE_LINE


def test_train_line_formats_edges():
    r = train(step=1, total_steps=3, loss=2.847123, loss_avg=3.0, learning_rate=2e-5,
              tokens_per_second=0.4, eta_seconds=None, steps_since_checkpoint=0,
              memory_mb=99.5, memory_delta_mb=-12.4, skipped_steps=2, leak_warning=True,
              cache_memory_mb=0.0, resident_mb=None)  # where the OS gives no resident set
    assert format_train_line(r) == (
        "step 1/3 33% | loss=2.8471 | loss_avg=3.0 | lr=2.0e-5 | tok/s=0 | eta_h=?"
        " | ckpt=0 | mem_mb=100 | cache_mb=0 | mem_delta=-12 | skipped=2 | LEAK?"
    )
    nan = train(loss=float("nan"), loss_avg=float("inf"))
    assert "loss=nan | loss_avg=inf" in format_train_line(nan)


@pytest.mark.parametrize("lr,text", [(1.8e-4, "1.8e-4"), (1e-10, "1.0e-10"), (0.0, "0.0e+0"),
                                     (3.0, "3.0e+0"), (12.5, "1.2e+1")])
def test_lr_format_drops_exponent_zeros(lr, text):
    assert fmt_lr(lr) == text


def test_dec_format():
    assert [fmt_dec(x, 4) for x in (3.2, 3.0, 0.00004, 10.123456)] == ["3.2", "3.0", "0.0", "10.1235"]


def test_eval_line():
    assert format_eval_line(evalr()) == (
        "eval step 900 | val_loss=2.91 | perplexity=18.36 | accuracy=0.412 | confidence=0.37"
        " | entropy=2.1 | best=2.85@750"
    )


def test_plain_reporter_lines_messages_and_stop():
    out = io.StringIO()
    rep = PlainReporter(out)
    rep.on_start({"model": "m", "backend": "mlx"})
    rep.on_train(train())
    rep.on_eval(evalr())
    rep.on_checkpoint(900, "runs/x/checkpoints/step-0000900")
    rep.on_message("loaded 1,000 records [train.jsonl]")
    rep.on_message("disk almost full", "warning")
    rep.on_stop("early stop (plateau): training loss plateaued", EXIT_PLATEAU)
    assert out.getvalue().splitlines() == [
        "start | model=m | backend=mlx",
        EXAMPLE_LINE,
        format_eval_line(evalr()),
        "sample 0 | prompt=Say hi | text=hi\\nthere",
        "checkpoint step 900 | runs/x/checkpoints/step-0000900",
        "loaded 1,000 records [train.jsonl]",
        "warning: disk almost full",
        "stop | reason=early stop (plateau): training loss plateaued | exit_code=3",
    ]


def test_plain_reporter_error_only_for_other_ranks():
    out = io.StringIO()
    rep = PlainReporter(out, min_level="error")
    rep.on_train(train())
    rep.on_eval(evalr())
    rep.on_message("hello")
    rep.on_message("careful", "warning")
    rep.on_message("rank 1 died", "error")
    rep.on_stop("completed", 0)
    assert out.getvalue() == "error: rank 1 died\n"


# ------------------------------------------------------------------ fan-out
class Recorder(NullReporter):
    def __init__(self):
        self.calls = []

    def on_train(self, r):
        self.calls.append(("train", r.step))

    def on_message(self, text, level="info"):
        self.calls.append(("message", level))

    def close(self):
        self.calls.append(("close",))


class Broken(NullReporter):
    def on_train(self, r):
        raise OSError("disk full")

    def close(self):
        raise OSError("still full")


def test_fanout_calls_each_and_survives_a_failing_reporter(capsys):
    a, b = Recorder(), Recorder()
    reps = Reporters([a, Broken(), b])
    reps.on_train(train(step=1))
    reps.on_train(train(step=2))
    reps.close()
    # each (reporter, method) failure is announced once to the healthy reporters
    msg = ("message", "error")
    assert a.calls == [("train", 1), msg, ("train", 2), ("close",), msg]
    assert b.calls == [msg, ("train", 1), ("train", 2), msg, ("close",)]
    assert "Broken.on_train failed" in capsys.readouterr().err


# ------------------------------------------------------------------ jsonl
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_are_strict_json_and_typed(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    rep = JsonlReporter(path, None)
    rep.on_start({"model": "m", "output_dir": tmp_path})
    rep.on_train(train(step=10, loss=float("nan")))
    rep.on_eval(evalr(step=10))
    rep.on_checkpoint(10, "ck/step-10")
    rep.on_message("just info")
    rep.on_message("spike", "warning")
    rep.on_stop("completed", 0)
    rep.close()
    text = path.read_text()
    assert "NaN" not in text
    recs = read_jsonl(path)
    assert [r["type"] for r in recs] == ["start", "train", "eval", "checkpoint", "message", "stop"]
    assert recs[1]["loss"] is None and recs[1]["early_stopping"]["plateau_counter"] == 1
    assert recs[2]["samples"][0]["text"] == "hi\nthere"
    assert recs[5] == {**recs[5], "step": 10, "reason": "completed", "exit_code": 0}


def test_jsonl_resume_truncates_then_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rep = JsonlReporter(path, None)
    for step in range(10, 51, 10):
        rep.on_train(train(step=step))
        if step % 20 == 0:
            rep.on_eval(evalr(step=step))
            rep.on_checkpoint(step, f"ck/step-{step}")
    rep.close()
    with open(path, "a") as fh:
        fh.write('{"type": "train", "step": 60, "lo')  # killed mid-write

    rep = JsonlReporter(path, resume_step=30)
    assert [r["step"] for r in read_jsonl(path)] == [10, 20, 20, 20, 30]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    rep.on_train(train(step=40))
    rep.on_stop("completed", 0)
    rep.close()
    recs = read_jsonl(path)
    assert [(r["type"], r["step"]) for r in recs] == [
        ("train", 10), ("train", 20), ("eval", 20), ("checkpoint", 20), ("train", 30),
        ("train", 40), ("stop", 40),
    ]


def test_jsonl_fresh_open_only_drops_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 5}\n{"type": "train", "step": 9}\n{"type": "tr')
    rep = JsonlReporter(path, None)
    assert rep.dropped == 1
    rep.on_train(train(step=12))
    rep.close()
    assert [r["step"] for r in read_jsonl(path)] == [5, 9, 12]


def test_jsonl_untouched_when_nothing_to_drop(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 5}\n')
    before = path.stat().st_ino
    JsonlReporter(path, resume_step=5).close()
    assert path.stat().st_ino == before  # not rewritten


# ------------------------------------------------------------------ tensorboard
def read_events(logdir: Path) -> list[list]:
    """Events per file, in name order, parsed from the TFRecord framing:
    u64 length, u32 crc, payload, u32 crc."""
    from tensorboardX.proto.event_pb2 import Event

    files = sorted(p for p in logdir.iterdir() if "tfevents" in p.name)
    out = []
    for f in files:
        data, pos, events = f.read_bytes(), 0, []
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
        out.append(events)
    return out


def scalars(events: list, tag: str) -> list[tuple[int, float]]:
    return [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == tag]


def texts(events: list, tag: str) -> list[tuple[int, str]]:
    return [(e.step, v.tensor.string_val[0].decode()) for e in events
            for v in e.summary.value if v.tag == tag + "/text_summary"]


def test_tensorboard_writes_expected_tags_and_purges_on_resume(tmp_path):
    from mlx_tune.reporting.tensorboard import TensorBoardReporter

    logdir = tmp_path / "tensorboard"
    tb = TensorBoardReporter(logdir, None)
    assert tb.purge_step is None
    tb.on_start({"model": "m"})
    for step in range(10, 51, 10):
        tb.on_train(train(step=step, loss=step / 10))
    tb.on_eval(evalr(step=50))
    tb.on_stop("early stop (plateau): training loss plateaued", EXIT_PLATEAU)
    tb.close()

    (events,) = read_events(logdir)
    assert scalars(events, "train/loss") == [(s, s / 10) for s in range(10, 51, 10)]
    for tag in ("train/loss_avg", "train/learning_rate", "train/grad_norm",
                "train/tokens_per_second", "system/memory"):
        assert [s for s, _ in scalars(events, tag)] == [10, 20, 30, 40, 50], tag
    assert scalars(events, "system/memory")[0][1] == pytest.approx(14051.4)
    assert scalars(events, "system/cache_memory")[0][1] == pytest.approx(512.3)
    assert scalars(events, "system/resident_memory")[0][1] == pytest.approx(15220.1)
    for tag, value in (("val/loss", 2.91), ("val/perplexity", 18.36), ("val/accuracy", 0.412)):
        assert scalars(events, tag) == [(50, pytest.approx(value))]
    (sample,) = texts(events, "samples/0")
    assert sample[0] == 50 and "Say hi" in sample[1] and "hi\nthere" in sample[1]
    assert texts(events, "run/stop_reason") == [(50, "early stop (plateau): training loss plateaued (exit code 3)")]

    # resume from step 30: a new file that starts with a purge marker at step 31
    tb = TensorBoardReporter(logdir, resume_step=30)
    assert tb.purge_step == 31 and tb.writer.purge_step == 31
    tb.on_train(train(step=40, loss=9.0))
    tb.close()
    first, second = read_events(logdir)
    assert len(first) == len(events)  # the earlier file is left intact
    assert any(e.step == 31 and e.session_log.status == e.session_log.START for e in second)
    assert scalars(second, "train/loss") == [(40, 9.0)]


# ------------------------------------------------------------------ selection
def test_make_reporters_plain_without_terminal(tmp_path, monkeypatch):
    from mlx_tune.reporting.tensorboard import TensorBoardReporter

    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a TTY
    reps = make_reporters("auto", output_dir=tmp_path, total_steps=10, resume_step=None,
                          report_to=["tensorboard"])
    try:
        assert [type(r) for r in reps] == [PlainReporter, JsonlReporter, TensorBoardReporter]
        assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "tensorboard").is_dir()
    finally:
        reps.close()
    reps = make_reporters("plain", output_dir=tmp_path, total_steps=10, resume_step=0,
                          report_to=[])
    assert [type(r) for r in reps] == [PlainReporter, JsonlReporter]
    reps.close()


def test_make_reporters_rich_and_auto_terminal(tmp_path, monkeypatch):
    from mlx_tune.reporting.dashboard import RichDashboard

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", FakeTTY())
    monkeypatch.setenv("TERM", "xterm-256color")
    for mode in ("auto", "rich"):
        reps = make_reporters(mode, output_dir=tmp_path, total_steps=10, resume_step=None,
                              report_to=[])
        assert isinstance(reps[0], RichDashboard)
        reps.close()


def test_make_reporters_other_ranks_print_only_errors(tmp_path, capsys):
    reps = make_reporters("auto", output_dir=tmp_path / "r1", total_steps=10, resume_step=None,
                          report_to=["tensorboard"], is_main_rank=False)
    reps.on_train(train())
    reps.on_message("hello")
    reps.on_message("boom", "error")
    reps.close()
    assert capsys.readouterr().err == "error: boom\n"
    assert not (tmp_path / "r1").exists()  # no files from non-main ranks


def test_make_reporters_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="report mode"):
        make_reporters("fancy", output_dir=tmp_path, total_steps=1, resume_step=None,
                       report_to=[])


# ------------------------------------------------------------------ keep awake
class FakePopen:
    calls: list = []

    def __init__(self, args, **kw):
        FakePopen.calls.append((args, kw))


def test_keep_awake_spawns_caffeinate_on_macos(monkeypatch):
    FakePopen.calls = []
    monkeypatch.setattr(keepawake.sys, "platform", "darwin")
    monkeypatch.setattr(keepawake.shutil, "which", lambda name: "/usr/bin/caffeinate")
    monkeypatch.setattr(keepawake.subprocess, "Popen", FakePopen)
    proc = keepawake.keep_awake(4242, allow_sleep=False)
    assert isinstance(proc, FakePopen)
    (args, kw), = FakePopen.calls
    assert args == ["/usr/bin/caffeinate", "-i", "-w", "4242"]
    assert kw["start_new_session"] is True


def test_keep_awake_does_nothing_elsewhere_or_when_allowed(monkeypatch):
    FakePopen.calls = []
    monkeypatch.setattr(keepawake.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(keepawake.shutil, "which", lambda name: "/usr/bin/caffeinate")
    reasons: list[str] = []
    monkeypatch.setattr(keepawake.sys, "platform", "linux")
    assert keepawake.keep_awake(1, allow_sleep=False, log=reasons.append) is None
    monkeypatch.setattr(keepawake.sys, "platform", "darwin")
    assert keepawake.keep_awake(1, allow_sleep=True, log=reasons.append) is None
    assert FakePopen.calls == [] and len(reasons) == 2


def test_keep_awake_never_raises_without_caffeinate(monkeypatch):
    monkeypatch.setattr(keepawake.sys, "platform", "darwin")
    reasons: list[str] = []
    monkeypatch.setattr(keepawake.shutil, "which", lambda name: None)
    assert keepawake.keep_awake(1, allow_sleep=False, log=reasons.append) is None
    assert "caffeinate not found" in reasons[-1]

    def boom(*a, **kw):
        raise PermissionError("denied")

    monkeypatch.setattr(keepawake.shutil, "which", lambda name: "/usr/bin/caffeinate")
    monkeypatch.setattr(keepawake.subprocess, "Popen", boom)
    assert keepawake.keep_awake(1, allow_sleep=False, log=reasons.append) is None
    assert "denied" in reasons[-1]
    assert keepawake.keep_awake(1, allow_sleep=False) is None  # no log: still quiet


def test_release_stops_a_running_process():
    proc = subprocess.Popen(["sleep", "30"])
    keepawake.release(proc)
    assert proc.poll() is not None
    keepawake.release(None)  # no-op


def test_tensorboard_reporter_does_not_import_torch(tmp_path):
    # tensorboardX imports torch eagerly when installed; an MLX run must not pay for it.
    code = (
        "import sys; from mlx_tune.reporting.tensorboard import TensorBoardReporter as T; "
        f"t = T({str(tmp_path)!r}); t.close(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
