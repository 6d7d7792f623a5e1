"""One run per directory, end to end: `mlx-tune train` on a directory another live process
holds exits with its code and writes nothing, whatever the resume flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlx_tune.checkpoint.rundir import LOCK_NAME
from mlx_tune.exit_codes import EXIT_DIR_IN_USE
from tests.unit.checkpoint.test_run_guards import hold_lock


@pytest.mark.slow
def test_second_train_on_a_held_directory_exits_with_its_code(tmp_path, subprocess_env,
                                                              tiny_model, recipes):
    out = tmp_path / "run"
    holder = hold_lock(out, subprocess_env)
    try:
        for flags in ([], ["--force-fresh"], ["--auto-resume"]):
            done = subprocess.run(
                [sys.executable, "-m", "mlx_tune", "train", "--model", str(tiny_model),
                 "--data", str(recipes), "--output-dir", str(out), "--max-steps", "2", *flags],
                env=subprocess_env, capture_output=True, text=True, timeout=120,
                stdin=subprocess.DEVNULL)
            assert done.returncode == EXIT_DIR_IN_USE, done.stderr
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln]
            assert len(errors) == 1 and "in use" in errors[0] and str(holder.pid) in errors[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
        assert not list(tmp_path.glob("run.old-*"))  # --force-fresh moved nothing
    finally:
        holder.kill()
        holder.wait()
