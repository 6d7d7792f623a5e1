"""--supervise on real runs of the tiny model (slow): SIGKILLs at random steps end with
the adapter of an uninterrupted run, bit for bit; a planted out-of-memory at a long batch
is answered by one halving of the micro-batch and the run finishes on the same data
order; a run that cannot start gives up after max_restarts with the reason."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_tune.checkpoint.rundir import RunDirInUse, RunLock
from mlx_tune.exit_codes import EXIT_SUPERVISOR_GAVE_UP

pytestmark = pytest.mark.slow

# Seed 3 gives batches of widths 224, 224, 96, 128, 224, 256, ...: with oom_tokens=896 a
# micro-batch of 4 rows crashes at the first 256-wide batch (step 6, after the checkpoint
# of step 4); 2 rows of 256 pass. No dropout: the masks of a micro-batch of 2 are other
# draws than those of 4, and the losses are compared. The first-step check is off: it
# would meet the widest batch before step 1 (the way a real night catches it first), and
# this test plants the out-of-memory mid-run, where a long batch arrives after bedtime.
SPEC = """
model: {model}
data: {data}
batch_size: 4
max_length: 256
max_steps: 8
seed: 3
learning_rate: 1.0e-3
warmup_steps: 2
lora: {{rank: 4, dropout: 0.0}}
checkpoint_interval: 4
eval_steps: 4
val_batches: 1
report_every: 1
num_samples: 0
dashboard: plain
tensorboard: false
early_stopping: {{warmup: 1000}}
supervise: {{backoff_s: 0, max_restarts: 5}}
memory: {{first_step_check: false}}
"""
PLANTED_OOM = "oom_tokens=896"


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model, recipe_slice) -> Path:
    where = tmp_path_factory.mktemp("supervised")
    data = recipe_slice(where / "data", train=64, valid=4, test=2)
    path = where / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_model, data=data))
    return path


def train(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlx_tune", "train", "--config", str(config),
            "--output-dir", str(out), *extra]


def records(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out_ = []
    for line in lines:
        try:
            out_.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out_


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if r["type"] == "train"}


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapters" / "adapters.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(train(config, out, "--no-supervise"), env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def trainer_pid(out: Path) -> int | None:
    try:
        return json.loads((out / ".mlx-tune.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for_step(out: Path, starts: int, step: int, parent: subprocess.Popen) -> int:
    """Wait until the (starts+1)-th run has reported ``step``; return its pid."""
    deadline = time.time() + 400
    while True:
        recs = records(out)
        begun = [i for i, r in enumerate(recs) if r["type"] == "start"]
        if len(begun) > starts:
            since = recs[begun[-1]:]
            if max((r["step"] for r in since if r["type"] == "train"), default=0) >= step:
                pid = trainer_pid(out)
                if pid is not None:
                    return pid
        assert parent.poll() is None, f"the supervisor ended early ({parent.returncode})"
        assert time.time() < deadline, f"step {step} never reached"
        time.sleep(0.02)


def test_sigkills_at_random_steps_end_with_the_uninterrupted_adapter(
        config, uninterrupted, tmp_path, subprocess_env):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    first = rng.randint(1, 3)
    second = rng.randint(first + 1, 6)
    print(f"kill steps {first}, {second} (seed {seed})")
    out = tmp_path / "run"
    log = open(tmp_path / "supervisor.log", "w")
    parent = subprocess.Popen(train(config, out, "--supervise"), env=subprocess_env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for n, step in enumerate((first, second)):
            pid = wait_for_step(out, n, step, parent)
            if n == 0:  # the parent holds no model: MLX is not even loaded in it
                maps = Path(f"/proc/{parent.pid}/maps")
                if maps.exists():
                    assert "libmlx" not in maps.read_text()
            os.kill(pid, signal.SIGKILL)
        # The third run: kill -9 its supervisor. The run goes on alone and keeps the
        # directory to itself (the run lock refuses a second trainer).
        pid = wait_for_step(out, 2, 0, parent)
        parent.kill()
        parent.wait()
        with pytest.raises(RunDirInUse, match=f"pid {pid}"):
            RunLock(out).acquire()
        deadline = time.time() + 400
        while True:  # the orphan finishes and frees the lock
            try:
                RunLock(out).acquire().release()
                break
            except RunDirInUse:
                assert time.time() < deadline, "the orphaned run never finished"
                time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
    text = (tmp_path / "supervisor.log").read_text()
    reference = adapter(uninterrupted)
    final = adapter(out)
    assert final.keys() == reference.keys()
    for name in reference:
        assert np.array_equal(final[name], reference[name]), f"{name} differs ({text[-3000:]})"
    assert losses(out) == losses(uninterrupted)
    events = [r for r in records(out) if r["type"] == "supervisor"]
    assert [e["event"] for e in events] == ["restart"] * 2
    assert all(e["cause"] == "killed by SIGKILL" and not e["memory"] for e in events)
    assert [r["exit_code"] for r in records(out) if r["type"] == "stop"] == [0]
    report = subprocess.run([sys.executable, "-m", "mlx_tune", "report", str(out),
                             "--html", str(tmp_path / "r.html")], env=subprocess_env,
                            capture_output=True, text=True, timeout=120)
    assert "2 restart(s), 0 adaptation(s)" in report.stdout, report.stdout + report.stderr


def test_a_planted_out_of_memory_halves_the_micro_batch_once_then_succeeds(
        config, uninterrupted, tmp_path, subprocess_env):
    out = tmp_path / "run"
    env = {**subprocess_env, "MLX_TUNE_FAULTS": PLANTED_OOM}
    done = subprocess.run(train(config, out, "--supervise"), env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [r for r in records(out) if r["type"] == "supervisor"]
    assert [e["event"] for e in events] == ["adaptation", "restart"]
    adapted = events[0]
    assert adapted["memory"] and "Insufficient Memory" in adapted["evidence"]
    assert (adapted["accumulation_from"], adapted["accumulation_to"]) == (1, 2)
    assert adapted["step"] == 5  # the long batch is step 6's
    starts = [r for r in records(out) if r["type"] == "start"]
    assert [s["info"]["accumulation"] for s in starts] == [1, 2]
    assert starts[-1]["resume_step"] == 4  # resumed across the accumulation change
    assert "micro-batch 2 (halved 1x" in starts[-1]["info"]["supervisor"]
    assert "gradient_accumulation_steps" in done.stdout  # the changed setting, reported
    # The same rows in the same order: step 5's loss comes from step 4's weights (the same
    # checkpoint) on the same batch, split in two; later steps differ by rounding only.
    ours, theirs = losses(out), losses(uninterrupted)
    assert sorted(ours) == sorted(theirs)
    assert ours[5] == pytest.approx(theirs[5], rel=1e-5)
    for step in range(6, 9):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-3), step
    assert "1 restart(s), 1 adaptation(s) and 0 cooldown(s)" in done.stderr


def test_a_run_that_cannot_start_gives_up_after_max_restarts(config, tiny_model, tmp_path,
                                                             subprocess_env):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: every start fails alike
    out = tmp_path / "run"
    done = subprocess.run(train(config, out, "--supervise", "--model", str(broken),
                                "--supervise-max-restarts", "1"), env=subprocess_env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          cwd=tmp_path)
    assert done.returncode == EXIT_SUPERVISOR_GAVE_UP, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlx-tune: error: the supervisor gave up: the run crashed 2 times")
    assert "max_restarts (1)" in last and "before the first report" in last
    own = [line for line in done.stderr.splitlines()[:-1] if line.startswith("mlx-tune: error:")]
    assert len(own) == 2 and own[-1][:200] in last  # the run's own error is the reason
    events = [r for r in records(out) if r["type"] == "supervisor"]
    assert [e["event"] for e in events] == ["restart", "gave_up"]
    assert done.stderr.count("Traceback") == 0
