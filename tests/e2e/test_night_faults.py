"""Never lose a night, round two (real signals to real runs of the tiny model): SIGTERM or
SIGHUP during the final save or mid-run still leaves a checkpoint and the adapter."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load_file

from mlx_tune.checkpoint.manager import CheckpointManager, NumpyCodec

from tests.model.test_night_faults import steps_of

SPEC = """
model: {model}
data: {data}
batch_size: 4
max_length: 128
max_steps: 4
warmup_steps: 1
checkpoint_interval: 100
eval_steps: 100
report_every: 1
num_samples: 0
prefetch: 0
dashboard: plain
early_stopping: {{warmup: 1000}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_signal_during_the_final_save_still_writes_checkpoint_and_adapter(
        sig, tiny_model, recipe_slice, tmp_path, subprocess_env):
    config = tmp_path / "spec.yaml"
    config.write_text(SPEC.format(model=tiny_model, data=recipe_slice(tmp_path / "data")))
    out = tmp_path / "run"
    env = {**subprocess_env, "MLX_TUNE_FAULTS": "save_sleep=1.5"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_tune", "train", "--config", str(config),
                             "--output-dir", str(out), "--auto-resume"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any((out / "checkpoints").glob(".tmp-step-0000004-*/arrays-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)  # the final checkpoint is half written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert steps_of(out) == [4]
    CheckpointManager(out / "checkpoints", NumpyCodec()).validate(
        out / "checkpoints" / "step-0000004")
    assert load_file(str(out / "adapters" / "adapters.safetensors"))


@pytest.mark.slow
def test_sighup_mid_run_checkpoints_and_exits_130(tiny_model, recipe_slice, tmp_path,
                                                  subprocess_env):
    config = tmp_path / "spec.yaml"
    data = recipe_slice(tmp_path / "data")
    config.write_text(SPEC.format(model=tiny_model, data=data).replace("max_steps: 4",
                                                                       "max_steps: 400"))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_tune", "train", "--config", str(config),
                             "--output-dir", str(out), "--auto-resume"], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists()
               and '"step": 2' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    (step,) = steps_of(out)
    assert 2 <= step < 400
    assert load_file(str(out / "adapters" / "adapters.safetensors"))
