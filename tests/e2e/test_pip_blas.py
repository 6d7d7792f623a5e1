"""Training on the pip-installed OpenBLAS (ngsolve-openblas / cmeel-openblas) gives the
losses of the system OpenBLAS. Its private libgfortran directory and the re-exec that loads
it are tested in tests/unit/system/test_pip_openblas.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.system import blas_choice
from tests.unit.system.test_pip_openblas import clean_env, needs_pip_openblas

SPEC = """
model: {model}
data: {data}
batch_size: 4
max_length: 128
max_steps: 6
learning_rate: 1.0e-3
warmup_steps: 2
lora: {{rank: 4}}
eval_steps: 1000
val_batches: 1
report_every: 1
num_samples: 0
dashboard: plain
"""


def train_losses(tmp_path: Path, name: str, spec: Path, **env: str) -> tuple[list, str]:
    out = tmp_path / name
    done = subprocess.run([sys.executable, "-m", "mlx_tune", "train", "--config", str(spec),
                           "--output-dir", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=clean_env(HF_HUB_OFFLINE="1", **env))
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"], done.stderr


@pytest.mark.slow
@needs_pip_openblas
def test_pip_openblas_trains_to_the_system_openblas_losses(tmp_path, tiny_model, recipe_slice):
    system = next(iter(blas_choice.system_openblases()), None)
    if not system:
        pytest.skip("no system OpenBLAS to compare with")
    spec = tmp_path / "spec.yaml"
    data = recipe_slice(tmp_path / "data", train=24, valid=4, test=2)  # 6 steps x 4 rows
    spec.write_text(SPEC.format(model=tiny_model, data=data))
    with_system, err_system = train_losses(tmp_path, "system", spec, MLX_TUNE_OPENBLAS=system)
    with_pip, err_pip = train_losses(tmp_path, "pip", spec, MLX_TUNE_OPENBLAS="pip",
                                     MLX_TUNE_BLAS_LIBDIR=str(tmp_path / "cache"))
    assert f"using MLX_TUNE_OPENBLAS OpenBLAS ({system})" in err_system
    assert "using pip (" in err_pip
    assert len(with_pip) == len(with_system) == 6
    # Two OpenBLAS builds (Debian's, pip's) may pick other kernels and blocking,
    # which reorders float32 sums: not bit for bit (measured: 1.1e-7 relative, one float32
    # ulp, on 2 of 6 steps); 1e-5 leaves room for other CPUs.
    assert with_pip == pytest.approx(with_system, rel=1e-5)
