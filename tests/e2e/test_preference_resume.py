"""kill -9 in the middle of a DPO run (adapter-off reference, LoRA dropout drawing from
the RNG), resumed with --auto-resume: the final adapter is bit-identical to an
uninterrupted run's, and so are the logged losses and DPO metrics after the resume. The
same with the precomputed reference from an init_adapter (the case that needs it): the
resume reloads the stored reference log-probs, and refuses them while the data differs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_crash_resume import (SPEC, assert_identical, command, kill_when,
                                         past_step, run_to_end, train_records)

pytestmark = pytest.mark.slow
PREFERENCE = Path(__file__).resolve().parents[2] / "data" / "preference"


def metric_records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["metrics"] for r in map(json.loads, filter(str.strip, lines))
            if r["type"] == "train"}


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, tiny_model):
    from mlx_tune.data.testing import write_jsonl

    root = tmp_path_factory.mktemp("dpo")
    for split, n in (("train", 64), ("valid", 8)):  # 16 steps of batch 4 see 64 pairs
        write_jsonl(root / "data" / f"{split}.jsonl",
                    (PREFERENCE / f"{split}.jsonl").read_text().splitlines()[:n])
    path = root / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_model, data=root / "data") + "objective: dpo\n")
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


@pytest.fixture(scope="module")
def dpo_from_adapter(tmp_path_factory, tiny_model):
    """A short DPO run from an init_adapter (reference auto: precomputed) on 16 pairs, and
    its uninterrupted result."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_tune.backends.select import make_backend
    from mlx_tune.config.spec import build_spec
    from mlx_tune.data.testing import write_jsonl

    root = tmp_path_factory.mktemp("dpo-adapter")
    for split, n in (("train", 16), ("valid", 4)):
        write_jsonl(root / "data" / f"{split}.jsonl",
                    (PREFERENCE / f"{split}.jsonl").read_text().splitlines()[:n])
    # A trained-looking adapter: lora_b away from its zero init, so its policy is not the
    # base model's.
    backend = make_backend("mlx")
    backend.load(build_spec(overrides={"model": str(tiny_model), "data": str(root / "data"),
                                       "lora.rank": 4}), tiny_model)
    backend.model.load_weights([(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.05)
                                for i, (k, v) in enumerate(tree_flatten(
                                    backend.model.trainable_parameters()))
                                if k.endswith("lora_b")], strict=False)
    backend.save_adapter(root / "sft")
    path = root / "spec.yaml"
    assert "max_steps: 16" in SPEC  # shortened below
    path.write_text(SPEC.format(model=tiny_model, data=root / "data").replace(
        "max_steps: 16", "max_steps: 8") + f"objective: dpo\ninit_adapter: {root / 'sft'}\n")
    out = root / "uninterrupted"
    run_to_end(path, out, {**os.environ, "HF_HUB_OFFLINE": "1"})
    from safetensors.numpy import load_file
    assert (out / "reference_logps.safetensors").is_file()
    return path, (load_file(str(out / "adapters" / "adapters.safetensors")),
                  train_records(out)), metric_records(out)


def test_kill_mid_dpo_run_with_precomputed_reference_resumes_bit_identical(
        dpo_from_adapter, tmp_path, subprocess_env):
    config, reference, metrics = dpo_from_adapter
    out = tmp_path / "run"
    kill_when(config, out, subprocess_env, past_step(6))  # checkpoint at 4, killed after 6
    table = (out / "reference_logps.safetensors").read_bytes()

    valid = config.parent / "data" / "valid.jsonl"
    kept = valid.read_text()
    valid.write_text("".join(reversed(kept.splitlines(keepends=True))))  # same records
    try:
        refused = subprocess.run(command(config, out), env=subprocess_env, capture_output=True,
                                 text=True, timeout=300, stdin=subprocess.DEVNULL)
    finally:
        valid.write_text(kept)
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]
    assert "the data changed" in line and "reference_logps.safetensors" in line, line

    done = run_to_end(config, out, subprocess_env)
    assert "precomputed rows from" in done.stdout + done.stderr  # loaded, not recomputed
    assert (out / "reference_logps.safetensors").read_bytes() == table
    assert_identical(out, reference, resumed_from=4)
    resumed = metric_records(out)
    assert all(resumed[s] == metrics[s] for s in metrics if s > 4)
