"""lr-find holds its output directory's run lock for the whole sweep (slow: subprocesses)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_a_second_lr_find_on_the_same_output_dir_is_refused(tiny_model, recipe_slice, tmp_path,
                                                              subprocess_env):
    """lr-find holds its output directory's run lock for the whole sweep: a second one (or
    a train) started meanwhile is refused with exit 9 before loading anything."""

    data = recipe_slice(tmp_path / "data", train=32, valid=4, test=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlx_tune", "lr-find", "--model", str(tiny_model),
           "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
           "--max-length", "64", "--start-lr", "1e-6", "--end-lr", "1e-5"]
    first = subprocess.Popen(cmd + ["--steps", "100000"], env=subprocess_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    try:
        lock = out / ".mlx-tune.lock"
        deadline = time.time() + 120
        while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first lr-find never took the lock"
            time.sleep(0.05)
        second = subprocess.run(cmd + ["--steps", "5"], env=subprocess_env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert second.returncode == 9, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another mlx-tune run" in lines[0]
        assert f"pid {first.pid}" in lines[0]
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()
        first.wait()
