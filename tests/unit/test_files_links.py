"""Nothing of the user's is written through a link or over (issue 22): the run lock,
atomic_write's temporary file, output directories that must be new or empty."""

from __future__ import annotations

import os
import threading

import pytest

from mlx_tune.checkpoint.rundir import RunDirError, RunLock
from mlx_tune.files import WriteRefused, atomic_write, check_new_dir

NOTES = "my notes, not a report\n"


# ------------------------------------------------------------------ links and our files

def test_run_lock_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(NOTES)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".mlx-tune.lock").symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert victim.read_text() == NOTES
    (run / ".mlx-tune.lock").unlink()
    (run / ".mlx-tune.lock").symlink_to(tmp_path / "elsewhere" / "made-by-the-lock")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        RunLock(run).acquire()
    assert not (tmp_path / "elsewhere").exists()
    (run / ".mlx-tune.lock").unlink()
    os.mkfifo(run / ".mlx-tune.lock")
    with pytest.raises(RunDirError, match="not a regular file"):
        RunLock(run).acquire()


def test_atomic_write_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text(NOTES)
    target = tmp_path / "out.json"
    tmp = tmp_path / f".out.json.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.symlink_to(victim)
    atomic_write(target, "{}")
    assert victim.read_text() == NOTES and target.read_text() == "{}"
    assert not tmp.exists() and not tmp.is_symlink()


def test_a_new_directory_is_only_new_or_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_new_dir(tmp_path / "empty", "x") == tmp_path / "empty"
    assert check_new_dir(tmp_path / "absent", "x") == tmp_path / "absent"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text(NOTES)
    with pytest.raises(WriteRefused, match="not empty"):
        check_new_dir(tmp_path / "full", "x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(WriteRefused, match="symbolic link"):
        check_new_dir(tmp_path / "link", "x")


def test_metrics_are_never_appended_through_a_link_or_to_a_fifo(tmp_path):
    from mlx_tune.reporting.text import JsonlReporter, append_record, append_record_or_warn
    victim = tmp_path / "victim.txt"
    victim.write_text(NOTES)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(WriteRefused, match="symbolic link or not a regular file"):
        append_record(run / "metrics.jsonl", {"type": "test"})
    warnings = []
    assert not append_record_or_warn(run / "metrics.jsonl", {"type": "test"}, warnings.append)
    assert "could not append the test record" in warnings[0]
    with pytest.raises(WriteRefused):
        JsonlReporter(run / "metrics.jsonl")
    assert victim.read_text() == NOTES
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")  # would block a reader or writer forever
    with pytest.raises(WriteRefused):
        append_record(run / "metrics.jsonl", {"type": "test"})
    (run / "metrics.jsonl").unlink()
    append_record(run / "metrics.jsonl", {"type": "test", "step": 1})
    assert (run / "metrics.jsonl").read_text() == '{"type": "test", "step": 1}\n'
