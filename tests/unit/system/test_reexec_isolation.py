"""The OpenBLAS re-exec must not put the current directory on the import path: a yaml.py
(or any module mlx-tune imports) lying in the folder a user runs from would run as code.

Runs the real re-exec in subprocesses, launched the way pip's console script launches
`mlx-tune` (a script whose folder, not the current directory, is sys.path[0]) and as
`python -m mlx_tune`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.system import blas

REPO_ROOT = Path(__file__).resolve().parents[3]
needs_reexec = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and blas._mlx_cpu_wheel() and blas.find_openblas()),
    reason="the re-exec happens only on Linux with the mlx CPU wheel and an OpenBLAS")

# What pip writes for [project.scripts] mlx-tune = "mlx_tune.cli:main".
CONSOLE_SCRIPT = """import sys
from mlx_tune.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""
EVIL = "open({marker!r}, 'w').write('pwned')\nraise SystemExit('evil yaml.py imported')\n"


def launch(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", blas.MARKER, blas.DISABLE)}
    # No empty entry: an empty PYTHONPATH element means "the current directory", which
    # would put the malicious folder on the path by the test's own doing.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO_ROOT), *env.get("PYTHONPATH", "").split(os.pathsep)] if p)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@needs_reexec
def test_console_script_ignores_a_malicious_module_in_cwd(tmp_path):
    bindir, work = tmp_path / "bin", tmp_path / "data"
    bindir.mkdir()
    work.mkdir()
    (bindir / "mlx-tune").write_text(CONSOLE_SCRIPT)
    marker = tmp_path / "PWNED"
    for name in ("yaml", "numpy", "runpy", "mlx_tune"):  # what the re-exec'd process imports
        (work / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    # `train` re-execs and says so (--version answers before any re-exec).
    done = launch([sys.executable, str(bindir / "mlx-tune"), "train", "--print-config",
                   "--max-steps", "7"], cwd=work)
    assert "mlx-tune: using " in done.stderr  # the re-exec did happen
    assert not marker.exists(), done.stderr
    assert done.returncode == 0, done.stderr
    assert "max_steps: 7" in done.stdout


@needs_reexec
def test_python_dash_m_still_works_through_the_reexec(tmp_path):
    # `python -m` puts the current directory first for the first process (Python's own rule);
    # the re-exec'd one runs from a clean path and finds the package all the same.
    done = launch([sys.executable, "-m", "mlx_tune", "train", "--print-config",
                   "--max-steps", "7"], cwd=tmp_path)
    assert "mlx-tune: using " in done.stderr and done.returncode == 0, done.stderr
    assert "max_steps: 7" in done.stdout
