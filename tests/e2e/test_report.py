"""`mlx-tune report` on a run killed mid-way (SIGKILL after its first checkpoint), from
the metrics.jsonl it wrote."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mlx_tune.config.schema import to_yaml
from tests.model.test_report import check_report


@pytest.mark.slow
def test_report_of_a_killed_run(tiny_spec, tmp_path, capsys, subprocess_env):
    out = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(to_yaml(tiny_spec(output_dir=out, lora={"rank": 4}, max_steps=40,
                                      report_every=1)))
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
