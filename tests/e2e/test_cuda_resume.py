"""Exact resume on the torch backend in real processes: SIGKILL a run mid-way, resume with
--auto-resume, and compare the final adapter with an uninterrupted run's.

Marked ``cuda``: it is part of `pytest -m cuda` in scripts/gpu_check.sh and skips without
a GPU; ``MLX_TUNE_CUDA_TESTS_ON_CPU=1`` runs it on the CPU (gpu_check.sh --cpu does), so
the script's test step is exercised where there is no GPU. Imports neither mlx nor mlx-lm.

Settings: float32 weights and math, CUBLAS_WORKSPACE_CONFIG=:4096:8 and the same shapes in
both runs, so cuBLAS picks the same kernels and reduction order. The adapter must then be
bit-identical; should a GPU kernel reduce with atomics (SDPA backward can), the test says
how far apart the runs are instead of a bare failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from safetensors.numpy import load_file  # noqa: E402

ON_CPU = os.environ.get("MLX_TUNE_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.slow, pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() or ON_CPU),
    reason="needs an NVIDIA GPU (MLX_TUNE_CUDA_TESTS_ON_CPU=1 runs it on the CPU)")]

REPO = Path(__file__).resolve().parents[2]
SPEC = """
model: {model}
data: {data}
backend: torch
dtype: float32
batch_size: 4
max_length: 128
max_steps: 12
learning_rate: 1.0e-3
warmup_steps: 2
lora: {{rank: 4, dropout: 0.0}}
checkpoint_interval: 4
eval_steps: 1000
val_batches: 1
report_every: 1
num_samples: 0
dashboard: plain
"""


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
             CUBLAS_WORKSPACE_CONFIG=":4096:8", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def command(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mlx_tune", "train", "--config", str(spec),
            "--output-dir", str(out), "--auto-resume"]


def finish(spec: Path, out: Path) -> None:
    done = subprocess.run(command(spec, out), env=env(), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]


def adapter(out: Path) -> dict[str, np.ndarray]:
    (path,) = (out / "adapters").glob("*.safetensors")
    return load_file(str(path))


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    tiny = REPO / "mlx_tune" / "assets" / "tiny-mistral"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model=tiny, data=REPO / "data" / "recipes"))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(spec, whole)
    proc = subprocess.Popen(command(spec, killed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    # a checkpoint is published by renaming its finished directory to step-NNNNNNN
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapters").exists(), "killed too late: the run had finished"
    finish(spec, killed)
    a, b = adapter(whole), adapter(killed)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a), \
        f"resumed adapter differs from the uninterrupted one by up to {worst:.3g}"
