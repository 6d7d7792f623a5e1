"""The OpenBLAS notice is printed once per train / lr-find run, and never before --help,
--version or the other commands (it used to open every invocation)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.system.test_pip_openblas import clean_env

NOTICE = "for MLX's CPU matrix products"


def mlx_tune(*args: str, cwd) -> subprocess.CompletedProcess:
    # A fresh environment: the suite's own re-exec marker would silence every child.
    return subprocess.run([sys.executable, "-m", "mlx_tune", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_notice_comes_once_with_a_training_run_and_never_before_help(tmp_path):
    train = mlx_tune("train", "--model", "tiny-mistral", "--data", str(tmp_path / "nothing"),
                     "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    if train.stderr.count(NOTICE) == 0:
        pytest.skip("no OpenBLAS to switch to on this machine: the notice never applies")
    assert train.stderr.count(NOTICE) == 1, train.stderr
    assert train.returncode != 0 and "nothing" in train.stderr.splitlines()[-1]
    for args in (["--version"], ["--help"], ["train", "--help"], ["report", str(tmp_path)]):
        out = mlx_tune(*args, cwd=tmp_path)
        assert NOTICE not in out.stderr and NOTICE not in out.stdout, (args, out.stderr)
