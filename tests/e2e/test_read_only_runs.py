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


def writable(path):
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def run_cli(argv, env):
    return subprocess.run(unprivileged([sys.executable, "-m", "mlx_tune", *argv]), env=env,
                          capture_output=True, text=True, timeout=600)


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
        writable(run)


@pytest.fixture(scope="module")
def trained(tiny_model, recipe_slice, tmp_path_factory):
    from mlx_tune.config.spec import build_spec
    from mlx_tune.training.recipe import train
    tmp = tmp_path_factory.mktemp("read-only")
    spec = build_spec(overrides={
        "model": str(tiny_model), "data": str(recipe_slice(tmp / "d", train=8, test=4)),
        "output_dir": str(tmp / "r"), "batch_size": 4, "max_length": 128, "max_steps": 2,
        "eval_steps": 2, "val_batches": 1, "checkpoint_interval": 2, "warmup_steps": 1,
        "num_samples": 0, "prefetch": 0, "dashboard": "plain", "tensorboard": False})
    assert train(spec, resume="fresh", log=lambda m: None).exit_code == 0
    return tmp / "r"


@pytest.mark.slow
def test_evaluate_and_fuse_on_a_read_only_run_show_the_result_then_warn(trained, tmp_path,
                                                                         subprocess_env):
    copy = tmp_path / "writable-copy"
    shutil.copytree(trained, copy)
    reference = run_cli(["evaluate", str(copy)], subprocess_env)
    assert reference.returncode == EXIT_OK, reference.stderr
    want = next(x for x in reference.stdout.splitlines() if x.startswith("test ("))
    before = (trained / "metrics.jsonl").read_bytes()
    read_only(trained)
    try:
        done = run_cli(["evaluate", str(trained)], subprocess_env)
        assert done.returncode == EXIT_OK, done.stderr
        assert want in done.stdout.splitlines()  # the same score as the writable copy's
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("mlx-tune: warning: could not append the test record to "
                               f"{trained / 'metrics.jsonl'}") and "Traceback" not in done.stderr
        fused = tmp_path / "fused"
        done = run_cli(["fuse", str(trained), "--output", str(fused)], subprocess_env)
        assert done.returncode == EXIT_OK, done.stderr
        assert f"fused final (step 2) into {fused}" in done.stdout
        assert (fused / "model.safetensors").is_file() and (fused / "fused_from.json").is_file()
        assert "could not append the fuse record" in done.stderr.strip().splitlines()[-1]
        assert (trained / "metrics.jsonl").read_bytes() == before
    finally:
        writable(trained)
