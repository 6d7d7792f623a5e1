"""The not-training guard on real runs: the mlx-lm-lora bug (a policy forward whose
log-probs are cut off from the differentiated function) stops training on both backends
with exit 13, checkpointed first; the same run unpatched trains on."""

from __future__ import annotations

import importlib

import pytest

from mlx_tune.config.spec import build_spec
from mlx_tune.exit_codes import EXIT_NOT_TRAINING, EXIT_OK
from mlx_tune.objectives.base import RowLogps
from mlx_tune.training.recipe import train


def detach_policy(monkeypatch, backend: str) -> None:
    module = importlib.import_module(f"mlx_tune.backends.{backend}.logps")
    real = module.row_logps
    if backend == "mlx":
        import mlx.core as mx
        cut = mx.stop_gradient
    else:
        def cut(x):
            return x.detach()

    def detached(*args, **kwargs) -> RowLogps:
        rows = real(*args, **kwargs)
        return RowLogps(cut(rows.logps), rows.tokens,
                        None if rows.smooth is None else cut(rows.smooth))
    monkeypatch.setattr(module, "row_logps", detached)


def spec_for(backend, tiny_model, data, out):
    return build_spec(overrides={
        "model": str(tiny_model), "data": str(data), "output_dir": str(out), "backend": backend,
        "batch_size": 2, "max_length": 64, "max_steps": 12, "warmup_steps": 2,
        "learning_rate": 1e-3, "eval_steps": 100, "eval_at_start": False,
        "checkpoint_interval": 100, "report_every": 1, "num_samples": 0, "prefetch": 0,
        "dashboard": "plain", "tensorboard": False, "torch_threads": 1, "lora.rank": 4})


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_detached_policy_forward_stops_the_run(backend, tiny_model, recipe_slice, tmp_path,
                                                 monkeypatch):
    if backend == "torch":
        pytest.importorskip("peft")
    data = recipe_slice(tmp_path / "data", train=16, valid=2, test=2)
    detach_policy(monkeypatch, backend)
    out = tmp_path / "run"
    result = train(spec_for(backend, tiny_model, data, out), resume="fresh", log=lambda m: None)
    assert result.exit_code == EXIT_NOT_TRAINING, result.reason
    assert "exactly zero" in result.reason
    assert result.step == 3  # the verdict comes after the first 3 steps (lr > 0 from step 1)
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved and saved[-1].name == "step-0000003"


def test_the_same_run_trains_on_unpatched(tiny_model, recipe_slice, tmp_path):
    data = recipe_slice(tmp_path / "data", train=16, valid=2, test=2)
    result = train(spec_for("mlx", tiny_model, data, tmp_path / "run"), resume="fresh",
                   log=lambda m: None)
    assert result.exit_code == EXIT_OK and result.step == 12
