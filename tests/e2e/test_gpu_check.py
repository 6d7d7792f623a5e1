"""scripts/gpu_check.sh --cpu: every step of the GPU check, small shapes, on the CPU, with
MLX made unimportable (the torch path must not need it), so the script cannot rot before
a GPU runs it. Its first step (`pytest -m cuda`) is left out here: on the CPU it is
tests/test_cuda_resume.py with MLX_TUNE_CUDA_TESTS_ON_CPU=1, two minutes on this machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.torch
def test_gpu_check_cpu_rehearsal(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu",
                           "--model-dir", str(tmp_path / "hermes"), "--steps", "quickstart",
                           "hermes", "throughput"],
                          env=dict(env, OUT=str(out)), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:]
    figures = {}
    for line in (out / "figures.jsonl").read_text().splitlines():
        record = json.loads(line)
        figures[record["step"]] = record
    assert figures["versions"]["cpu"] is True and figures["done"]["failed_steps"] == 0
    for step in ("quickstart", "hermes_qlora", "hermes_bf16_lora"):
        f = figures[step]
        assert f["exit"] == 0 and f["steps"] > 0 and f["tokens_per_s"] > 0, f
        assert f["peak_memory_gb"] > 0
    # the scaled-down Hermes keeps the real vocabulary: 32032 x 64 embeddings and head
    assert figures["hermes_build"]["params"] > 2 * 32032 * 64
    assert figures["hermes_qlora"]["planned_peak_gb"] > 0
    assert figures["throughput"]["exit"] == 0
    # every step's output was tee'd as it came, and the whole run's too
    for log in ("gpu_check.log", "quickstart.log", "hermes_qlora.log", "throughput.log"):
        assert (out / log).stat().st_size > 0, log
    assert "must not be imported" not in (out / "gpu_check.log").read_text()
