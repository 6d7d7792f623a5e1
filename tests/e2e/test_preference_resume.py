"""kill -9 in the middle of a DPO run (adapter-off reference, LoRA dropout drawing from
the RNG), resumed with --auto-resume: the final adapter is bit-identical to an
uninterrupted run's, and so are the logged losses and DPO metrics after the resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.test_crash_resume import (SPEC, assert_identical, kill_when, past_step,
                                         run_to_end, train_records)

pytestmark = pytest.mark.slow
PREFERENCE = Path(__file__).resolve().parents[2] / "data" / "preference"


def metric_records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["metrics"] for r in map(json.loads, filter(str.strip, lines))
            if r["type"] == "train"}


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("dpo") / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_model, data=PREFERENCE) + "objective: dpo\n")
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_to_end(path, out, {**os.environ, "HF_HUB_OFFLINE": "1"})
    from safetensors.numpy import load_file
    reference = load_file(str(out / "adapters" / "adapters.safetensors")), train_records(out)
    return path, reference, metric_records(out)


def test_kill_mid_dpo_run_resumes_bit_identical(dpo, tmp_path, subprocess_env):
    config, reference, metrics = dpo
    assert "rewards/accuracies" in metrics[1]
    out = tmp_path / "run"
    kill_when(config, out, subprocess_env, past_step(6))  # checkpoint at 4, killed after 6
    done = run_to_end(config, out, subprocess_env)
    assert "resum" in (done.stdout + done.stderr).lower()
    assert_identical(out, reference, resumed_from=4)
    resumed = metric_records(out)
    assert all(resumed[s] == metrics[s] for s in metrics if s > 4)
