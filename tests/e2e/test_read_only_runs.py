"""Read-only run directories (issue 22): the commands that only read a run do their work
and show it; what they cannot append is a warning, never a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mlx_tune.exit_codes import EXIT_ERROR, EXIT_OK
from tests.unit.commands.test_report_hostile import night, write_metrics


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run without the power to write where permissions forbid it: as root,
    without CAP_DAC_OVERRIDE (setpriv), so a read-only directory is read-only."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]


def read_only(path):
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)


@pytest.mark.slow
def test_report_of_a_read_only_run_directory(tmp_path, subprocess_env):
    run = tmp_path / "run"
    write_metrics(run, night())
    read_only(run)
    try:
        page = tmp_path / "page.html"
        cmd = unprivileged([sys.executable, "-m", "mlx_tune", "report", str(run), "--html",
                            str(page)])
        done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == EXIT_OK, done.stderr
        assert page.read_text().count("data:image/png;base64,") >= 1
        done = subprocess.run(cmd[:-2], env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
        err = done.stderr.strip().splitlines()[-1]
        assert done.returncode == EXIT_ERROR and "report.html: cannot write the report" in err
        assert "Traceback" not in done.stderr
    finally:
        run.chmod(0o755)
