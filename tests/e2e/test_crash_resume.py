"""Fault injection: SIGKILL a real training run (between checkpoints, in the middle of a
save, twice in a row), resume with --auto-resume, and demand the final adapter be
bit-identical to an uninterrupted run's, with the same logged losses after resume.

The uninterrupted reference runs without the first-step memory check; the killed and
resumed runs run it (the default) at each start: the discarded step on the widest batch
must change nothing, before the first step or after a resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

SPEC = """
model: {model}
data: {data}
batch_size: 4
max_length: 128
max_steps: 16
learning_rate: 1.0e-3
warmup_steps: 2
lora: {{rank: 4, dropout: 0.05}}
checkpoint_interval: 4
eval_steps: 8
val_batches: 1
report_every: 1
num_samples: 0
prefetch: 2
dashboard: plain
early_stopping: {{warmup: 1000}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory, recipe_slice) -> Path:
    """One epoch of the recipes (16 steps x 4 rows): every start tokenizes 64 rows, not 1500."""
    return recipe_slice(tmp_path_factory.mktemp("data"), train=64, valid=4, test=4)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model, data) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_model, data=data))
    return path


def command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlx_tune", "train", "--config", str(config),
            "--output-dir", str(out), "--auto-resume", *extra]


def run_to_end(config: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(config, out, *extra), env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def train_records(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not duplicate steps"
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def kill_when(config: Path, out: Path, env: dict, ready) -> None:
    """Start a run and SIGKILL it as soon as ready(out) is true."""
    proc = subprocess.Popen(command(config, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ready(out):
        if proc.poll() is not None:
            raise AssertionError("the run ended before the kill point: "
                                 + proc.stderr.read().decode()[-2000:])
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def past_step(step: int):
    def ready(out: Path) -> bool:
        try:
            return max(train_records(out), default=0) >= step
        except (OSError, json.JSONDecodeError):
            return False
    return ready


def saving(out: Path) -> bool:
    return any((out / "checkpoints").glob(".tmp-step-*/arrays-*.safetensors"))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> tuple[dict, dict]:
    import os
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_to_end(config, out, {**os.environ, "HF_HUB_OFFLINE": "1"}, "--no-memory-first-step-check")
    return load_file(str(out / "adapters" / "adapters.safetensors")), train_records(out)


def assert_identical(out: Path, reference: tuple[dict, dict], resumed_from: int) -> None:
    weights, losses = reference
    final = load_file(str(out / "adapters" / "adapters.safetensors"))
    assert final.keys() == weights.keys()
    for name in weights:
        assert np.array_equal(final[name], weights[name]), f"{name} differs after resume"
    resumed = train_records(out)
    after = [s for s in losses if s > resumed_from]
    assert after and all(resumed[s] == losses[s] for s in after)
    # Every start of this run (the first and each resume) ran the discarded first step.
    starts = [json.loads(line)["info"] for line in (out / "metrics.jsonl").read_text()
              .splitlines() if line.strip() and json.loads(line)["type"] == "start"]
    assert starts and all(info["first_step"]["peak_mb"] > 0 for info in starts)


def test_kill_in_the_middle_of_a_save(config, reference, tmp_path, subprocess_env):
    out = tmp_path / "run"
    env = {**subprocess_env, "MLX_TUNE_FAULTS": "save_sleep=5"}
    kill_when(config, out, env, saving)  # the first save (step 4) is torn: no manifest
    assert not (out / "checkpoints" / "step-0000004").exists()
    done = run_to_end(config, out, subprocess_env)  # the torn save is not resumed from
    assert "resumed from" not in done.stdout + done.stderr
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_identical(out, reference, resumed_from=0)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(config, reference, tmp_path,
                                                              subprocess_env):
    out = tmp_path / "run"
    kill_when(config, out, subprocess_env, past_step(10))
    newest = out / "checkpoints" / "step-0000008"
    shard = next(newest.glob("arrays-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of tensor data
    shard.write_bytes(bytes(data))
    done = run_to_end(config, out, subprocess_env)
    text = done.stdout + done.stderr
    assert "step-0000008" in text and "sha256" in text  # skipped with its reason
    assert "resumed from" in text and "step-0000004" in text
    assert_identical(out, reference, resumed_from=4)


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(config, reference, tmp_path,
                                                               subprocess_env):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(config, out), env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not past_step(5)(out):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted by SIGINT" in output and "--auto-resume" in output
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    step = int(saved[-1].split("-")[1])
    assert step >= 5  # the interrupted step was saved, not only the last interval checkpoint
    run_to_end(config, out, subprocess_env)
    assert_identical(out, reference, resumed_from=step)


def test_three_failed_saves_in_a_row_stop_the_run(config, tmp_path, subprocess_env):
    out = tmp_path / "run"
    env = {**subprocess_env, "MLX_TUNE_FAULTS": "disk_full"}
    done = subprocess.run(command(config, out), env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    text = done.stdout + done.stderr
    assert done.returncode == 7, text[-2000:]
    assert text.count("No space left on device") >= 3
    assert "3 checkpoint saves failed in a row" in text
    # Training went on between the failures: saves were tried at steps 4, 8 and 12.
    assert max(train_records(out)) == 12
    assert not list((out / "checkpoints").glob("step-*"))
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model, data) -> tuple[Path, tuple[dict, dict]]:
    """The same run with packing on: rows of 256 tokens, one compiled shape."""
    import os
    path = tmp_path_factory.mktemp("packed-spec") / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_model, data=data) + "packing: true\n"
                    "pack_length: 256\n")
    out = tmp_path_factory.mktemp("packed-uninterrupted") / "run"
    run_to_end(path, out, {**os.environ, "HF_HUB_OFFLINE": "1"})
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["compiled_shapes"] for r in records if r["type"] == "train"][-1] == 1
    return path, (load_file(str(out / "adapters" / "adapters.safetensors")), train_records(out))


def test_kill_between_checkpoints_with_packing(packed, tmp_path, subprocess_env):
    config, reference = packed
    out = tmp_path / "run"
    kill_when(config, out, subprocess_env, past_step(6))
    run_to_end(config, out, subprocess_env)
    assert_identical(out, reference, resumed_from=4)
