"""`mlx-tune report` on a run killed mid-way (SIGKILL after its first checkpoint), from
the metrics.jsonl it wrote."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.model.test_report import check_report, overrides


@pytest.mark.slow
def test_report_of_a_killed_run(tiny_model, recipes, tmp_path, capsys, subprocess_env):
    out = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    import yaml
    from mlx_tune.config.spec import nest
    spec.write_text(yaml.safe_dump(nest(overrides(tiny_model, recipes, out, max_steps=40,
                                                  report_every=1))))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_tune", "train", "--config", str(spec)],
                            env=subprocess_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any((out / "checkpoints").glob("step-*")):  # killed after its first checkpoint
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    terminal = check_report(out, capsys)
    assert "killed or still running" in terminal and "no stop record" in terminal
    assert "step-0000004" in terminal
