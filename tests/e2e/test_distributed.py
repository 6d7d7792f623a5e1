"""Data parallel on the engines' own launchers (MLX ring via mlx.launch, torchrun + gloo).

- 2 ranks x global batch 8 give the weights of 1 process x batch 8 (to float rounding);
- a rank killed with SIGKILL: the survivor exits with one line and EXIT_PEER_LOST, within
  MLX_TUNE_DIST_TIMEOUT, and --auto-resume on another world size continues the run from
  the last checkpoint to the same weights;
- rank 0's resume point, stop decisions and flags reach every rank bit for bit;
- a batch that the ranks cannot share is a one-line error on every rank.

The end-to-end runs are slow (subprocesses, the tiny model); they all start at once
when the module starts (``launches``), so the file costs the longest chain, not the sum.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_tune.distributed.peers import EXIT_PEER_LOST

K = 6  # steps of every run below
KILL_TIMEOUT = 20  # MLX_TUNE_DIST_TIMEOUT of the run whose rank is killed
# Largest |weight difference| allowed vs 1 process. The runs use SGD with momentum:
# weights then follow the gradients linearly, so equal gradients mean equal weights to
# float rounding (measured after 6 steps: 1.7e-8 MLX ring, 1.9e-8 torchrun + gloo, 2.2e-8
# killed + resumed on 1 process). AdamW divides each gradient by its own size, which
# turns rounding in a near-zero gradient into a full step: 8.7e-5 on one element of 65k
# with the same runs, while losses and gradient norms agreed to 1e-6. The per-step loss,
# gradient norm and token count are compared too (a rank that trains the whole batch,
# or gradients averaged where they should be summed, show there at once).
MLX_TOL = TORCH_TOL = 1e-6
CURVE_RTOL = 1e-4

SPEC = """
model: {model}
data: {data}
batch_size: 8
max_length: 96
max_steps: {steps}
optimizer: sgd
momentum: 0.9
learning_rate: 0.05
warmup_steps: 0
lora: {{rank: 4, dropout: 0.0}}
checkpoint_interval: 100
eval_steps: 1000
eval_at_start: false
val_batches: 1
report_every: 1
num_samples: 0
prefetch: 0
dashboard: plain
tensorboard: false
early_stopping: {{warmup: 1000}}
"""

MLX_LAUNCH = shutil.which("mlx.launch")
TORCHRUN = shutil.which("torchrun")
HAS_TORCH_BACKEND = importlib.util.find_spec("mlx_tune.backends.torch.backend") is not None
needs_mlx_launch = pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx.launch is not installed")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None or not HAS_TORCH_BACKEND,
                                    reason="torchrun or mlx_tune.backends.torch.backend is missing")




# -- processes ---------------------------------------------------------------------------

def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for port in (base, base + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


class Proc:
    """A child with its output in files (pipes can fill up and stall a rank)."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self.out, self.err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
        self.p = subprocess.Popen(cmd, env=env, stdout=self.out, stderr=self.err,
                                  stdin=subprocess.DEVNULL, cwd=log.parent)

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"{self.log.name} still running after {timeout} s:\n"
                                 + self.stderr()[-3000:]) from None

    def stdout(self) -> str:
        self.out.flush()
        return self.log.with_suffix(".out").read_text()

    def stderr(self) -> str:
        self.err.flush()
        return self.log.with_suffix(".err").read_text()


def train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "mlx_tune", "train", "--config", str(config), "--output-dir", str(out), *extra]


def ring_ranks(args: list[str], env: dict, where: Path, name: str) -> list[Proc]:
    """Two local ranks with exactly the environment `mlx.launch --backend ring` gives them
    (MLX_RANK, MLX_HOSTFILE), started directly so a test can kill one and read each
    rank's exit code (mlx.launch itself exits 0 whatever its ranks do)."""
    port = free_port_pair()
    hosts = where / f"{name}-hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return [Proc([sys.executable, *args],
                 {**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
                 where / f"{name}-rank{r}.log") for r in range(2)]


def curve(out: Path) -> np.ndarray:
    """(step, loss, grad_norm, trained_tokens) of every train record of rank 0."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["step"], r["loss"], r["grad_norm"], r["trained_tokens"]]
                     for r in records if r["type"] == "train"])


def same_curve(a: Path, b: Path) -> None:
    x, y = curve(a), curve(b)
    assert x.shape == y.shape == (K, 4), (x.shape, y.shape)
    assert np.array_equal(x[:, [0, 3]], y[:, [0, 3]]), "steps or token counts differ"
    np.testing.assert_allclose(x[:, 1:3], y[:, 1:3], rtol=CURVE_RTOL)


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x)


class KilledRun:
    """2 ranks; rank 0 (the one that writes checkpoints) is SIGKILLed once step 2 is
    saved; the survivor's exit is timed; then 1 process resumes with --auto-resume."""

    def __init__(self, config: Path, where: Path, env: dict):
        self.out = where / "killed"
        self.config, self.where, self.env = config, where, env
        slow_saves = {**env, "MLX_TUNE_FAULTS": "save_sleep=2",
                      "MLX_TUNE_DIST_TIMEOUT": str(KILL_TIMEOUT)}
        self.ranks = ring_ranks(train_cmd(config, self.out, "--checkpoint-interval", "2"),
                                slow_saves, where, "killed")
        self.error: str | None = None
        self.survivor_seconds: float | None = None
        self.resume: Proc | None = None
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            deadline = time.time() + 400
            while not (self.out / "checkpoints" / "step-0000002").exists():
                if any(r.p.poll() is not None for r in self.ranks):
                    self.error = "a rank ended before the kill: " + self.ranks[0].stderr()[-2000:]
                    return
                if time.time() > deadline:
                    self.error = "step 2 never saved"
                    return
                time.sleep(0.02)
            self.ranks[0].p.send_signal(signal.SIGKILL)
            killed_at = time.time()
            self.ranks[1].wait(timeout=KILL_TIMEOUT + 60)
            self.survivor_seconds = time.time() - killed_at
            self.ranks[0].wait()
            self.resume = Proc([sys.executable, *train_cmd(self.config, self.out, "--auto-resume")],
                               self.env, self.where / "resume.log")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        self.thread.join(timeout=500)
        assert self.error is None, self.error


def break_optimizer_state(checkpoint: Path) -> None:
    """Drop one optimizer tensor from a checkpoint and reseal its manifest: every file
    verifies, but the state does not load into the optimizer."""
    import mlx.core as mx
    from mlx_tune.checkpoint.format import read_safetensors_header, sha256_file

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for entry in manifest["files"]:
        path = checkpoint / entry["name"]
        if not path.name.endswith(".safetensors"):
            continue
        arrays = mx.load(str(path))
        dropped = sorted(k for k in arrays if k.startswith("optimizer/"))
        if dropped:
            del arrays[dropped[0]]
            mx.save_safetensors(str(path), arrays)
            entry.update(size=path.stat().st_size, sha256=sha256_file(path),
                         arrays=read_safetensors_header(path))
            (checkpoint / "manifest.json").write_text(json.dumps(manifest))
            return
    raise AssertionError(f"{checkpoint} holds no optimizer tensor")


class FallbackRun:
    """1 process trains K steps with a checkpoint every 2; the last checkpoint is removed
    and the one before it loses an optimizer tensor (its files still verify). 2 ranks
    resume with --auto-resume: both must skip it for step 2 and finish."""

    def __init__(self, config: Path, where: Path, env: dict):
        self.out = where / "fallback"
        self.config, self.where, self.env = config, where, env
        self.prepare = Proc([sys.executable, *train_cmd(config, self.out,
                                                          "--checkpoint-interval", "2")],
                            env, where / "fallback-prepare.log")
        self.ranks: list[Proc] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            if self.prepare.wait() != 0:
                self.error = "the 1-process run failed: " + self.prepare.stderr()[-2000:]
                return
            checkpoints = self.out / "checkpoints"
            shutil.rmtree(checkpoints / f"step-{K:07d}")
            shutil.rmtree(self.out / "adapters")
            break_optimizer_state(checkpoints / f"step-{K - 2:07d}")
            self.ranks = ring_ranks(train_cmd(self.config, self.out, "--auto-resume"),
                                    self.env, self.where, "fallback")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        self.thread.join(timeout=500)
        assert self.error is None, self.error


SHARE_SCRIPT = r"""
import json, sys
from pathlib import Path
import mlx.core as mx
import numpy as np
from mlx_tune.backends.mlx.collectives import MlxCollectives
from mlx_tune.distributed import decisions as D
from mlx_tune.checkpoint.manager import Loaded
from mlx_tune.exit_codes import StopDecision

backend = MlxCollectives()
out = Path(sys.argv[1])
arrays = {"w": mx.array([-0.0, 1.5, float("nan"), 3e-8], dtype=mx.bfloat16),
          "f32": mx.array([[1e-30, -2.0], [float("inf"), 7.0]]),
          "rng/mlx": mx.array([2**32 - 1, 12345], dtype=mx.uint32),
          "count": mx.array(2**40, dtype=mx.int64), "flag": mx.array([True, False])}
spec = type("S", (), {"batch_size": 8})()
first = D.share_resume_point(backend, None, out, spec, print)
loaded = Loaded(Path("/ckpt/step-0000003"), 3, arrays, {"step": 3, "world_size": 1, "x": [1, "a"]})
got = D.share_resume_point(backend, loaded if backend.rank == 0 else None, out, spec, print)
stop, signal = D.agree(StopDecision("val_plateau", "r", 9) if backend.rank == 0 else None,
                       "SIGTERM" if backend.rank == 1 else None, backend)
flag = D.broadcast_flag(backend.rank == 0, backend)
D.barrier(backend)
def bits(a):  # the exact bytes, whatever the dtype
    wire = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]
    return [str(a.dtype), a.shape, np.array(mx.view(a, wire)).tobytes().hex()]
(out / f"rank{backend.rank}.json").write_text(json.dumps({
    "arrays": {k: bits(v) for k, v in got.arrays.items()},
    "first": first, "step": got.step, "path": str(got.path), "meta": got.meta,
    "stop": [stop.rule, stop.step], "signal": signal, "flag": flag}))
"""


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory, tiny_model, recipes):
    """Start every scenario the selected tests need, all at once."""
    wanted = {item.name for item in request.session.items
              if item.module is request.module}
    where = tmp_path_factory.mktemp("dist")
    data = where / "data"  # a slice of the recipes: tokenizing 1500 records 9 times is waste
    data.mkdir()
    for name, n in (("train.jsonl", 160), ("valid.jsonl", 16)):
        lines = (recipes / name).read_text().splitlines()[:n]
        (data / name).write_text("\n".join(lines) + "\n")
    config = where / "spec.yaml"
    config.write_text(SPEC.format(model=tiny_model, data=data, steps=K))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    runs: dict = {"where": where, "config": config, "env": env}
    py = sys.executable
    mlx_e2e = {"test_two_ring_ranks_equal_one_process", "test_killed_rank_then_resume",
               "test_ranks_fall_back_together_from_a_checkpoint_that_does_not_load"}
    if wanted & mlx_e2e:
        runs["one"] = Proc([py, *train_cmd(config, where / "one")], env, where / "one.log")
    if "test_two_ring_ranks_equal_one_process" in wanted and MLX_LAUNCH:
        runs["two"] = Proc([MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port",
                            str(free_port_pair()), "--", py, *train_cmd(config, where / "two")],
                           env, where / "two.log")
    if "test_killed_rank_then_resume" in wanted:
        runs["killed"] = KilledRun(config, where, env)
    if "test_ranks_fall_back_together_from_a_checkpoint_that_does_not_load" in wanted:
        runs["fallback"] = FallbackRun(config, where, env)
    if "test_uneven_batch_fails_on_every_rank" in wanted:
        runs["uneven"] = ring_ranks(train_cmd(config, where / "uneven", "--batch-size", "7"),
                                    env, where, "uneven")
    if "test_rank0_state_reaches_every_rank_bit_for_bit" in wanted:
        script = where / "share.py"
        script.write_text(SHARE_SCRIPT)
        (where / "share").mkdir()
        runs["share"] = ring_ranks([str(script), str(where / "share")], env, where, "share")
    if "test_torchrun_gloo_equals_one_process" in wanted and TORCHRUN and HAS_TORCH_BACKEND:
        torch = ("--backend", "torch")
        runs["t1"] = Proc([py, *train_cmd(config, where / "t1", *torch)], env, where / "t1.log")
        runs["t2"] = Proc([TORCHRUN, "--standalone", "--nproc_per_node", "2",
                           *train_cmd(config, where / "t2", *torch)], env, where / "t2.log")
    yield runs
    for value in runs.values():  # a failed test must not leave ranks behind
        procs = value if isinstance(value, list) else [*getattr(value, "ranks", [value]),
                                                        getattr(value, "prepare", None)]
        for p in [*procs, getattr(value, "resume", None)]:
            if isinstance(p, Proc) and p.p.poll() is None:
                p.p.kill()


def ok(proc: Proc) -> str:
    assert proc.wait() == 0, proc.stderr()[-3000:]
    return proc.stdout()


@pytest.mark.slow
@needs_mlx_launch
def test_two_ring_ranks_equal_one_process(launches):
    ok(launches["one"])
    out = ok(launches["two"])
    diff = adapter_diff(launches["where"] / "one" / "adapters" / "adapters.safetensors",
                        launches["where"] / "two" / "adapters" / "adapters.safetensors")
    assert diff < MLX_TOL, f"2 ranks vs 1 process: max abs diff {diff:.3g}"
    same_curve(launches["where"] / "one", launches["where"] / "two")
    # Rank 0 alone reports: one copy of every line, not two.
    assert out.count(f"reason=finished {K} steps") == 1 and out.count("trainable ") == 1
    print(f"max abs diff, 2 ring ranks vs 1 process after {K} steps: {diff:.3g}")


@pytest.mark.slow
def test_killed_rank_then_resume(launches):
    run: KilledRun = launches["killed"]
    run.finish()
    survivor = run.ranks[1]
    assert survivor.p.returncode == EXIT_PEER_LOST, survivor.stderr()[-3000:]
    assert run.survivor_seconds < KILL_TIMEOUT + 30, run.survivor_seconds
    ours = [line for line in survivor.stderr().splitlines() if line.startswith("mlx-tune: error")]
    assert len(ours) == 1 and ours[0].startswith("mlx-tune: error: rank 1/2: "), ours
    assert "--auto-resume" in ours[0]
    assert survivor.stdout() == "", "a rank other than 0 printed more than errors"
    # 1 process takes over the 2-rank run (same global batch) and reaches the same weights.
    out = ok(run.resume)
    saved = sorted(p.name for p in (run.out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert "resumed from" in out and "written by a 2-rank run; continuing on 1 rank" in out
    assert f"reason=finished {K} steps" in out
    first = [line for line in out.splitlines() if line.startswith("step ")][0]
    assert not first.startswith(("step 1/", "step 2/")), f"did not resume: {first} ({saved})"
    ok(launches["one"])
    diff = adapter_diff(launches["where"] / "one" / "adapters" / "adapters.safetensors",
                        run.out / "adapters" / "adapters.safetensors")
    assert diff < MLX_TOL, f"killed + resumed vs uninterrupted: max abs diff {diff:.3g}"
    print(f"survivor exited {run.survivor_seconds:.1f} s after the kill; resumed run vs "
          f"uninterrupted: max abs diff {diff:.3g}")


@pytest.mark.slow
@needs_mlx_launch
def test_ranks_fall_back_together_from_a_checkpoint_that_does_not_load(launches):
    run: FallbackRun = launches["fallback"]
    run.finish()
    rank0, rank1 = run.ranks
    out = ok(rank0)
    assert rank1.wait() == 0, rank1.stderr()[-3000:]
    bad = f"step-{K - 2:07d}"
    assert f"{bad}: its state does not load" in out and "optimizer state" in out
    assert "resumed from" in out and f"step-{K - 4:07d} at step {K - 4}" in out
    assert f"reason=finished {K} steps" in out
    first = [line for line in out.splitlines() if line.startswith("step ")][0]
    assert first.startswith(f"step {K - 3}/"), first  # trained on from step 2, not 0 or 4
    ok(launches["one"])
    diff = adapter_diff(launches["where"] / "one" / "adapters" / "adapters.safetensors",
                        run.out / "adapters" / "adapters.safetensors")
    assert diff < MLX_TOL, f"fallen back + resumed on 2 ranks vs 1 process: {diff:.3g}"


@pytest.mark.slow
def test_uneven_batch_fails_on_every_rank(launches):
    for rank in launches["uneven"]:
        assert rank.wait(timeout=200) == 2, rank.stderr()[-2000:]
        lines = [line for line in rank.stderr().splitlines() if line.startswith("mlx-tune: error")]
        assert lines == ["mlx-tune: error: batch_size=7 cannot be split evenly across 2 "
                         "data-parallel ranks: use a multiple of 2 (batch_size is the global "
                         "batch, summed over all ranks)"], rank.stderr()


@pytest.mark.slow
def test_rank0_state_reaches_every_rank_bit_for_bit(launches):
    for rank in launches["share"]:
        assert rank.wait(timeout=200) == 0, rank.stderr()[-3000:]
    share = launches["where"] / "share"
    j0, j1 = (json.loads((share / f"rank{r}.json").read_text()) for r in range(2))
    assert len(j0["arrays"]) == 5
    assert j0["arrays"] == j1["arrays"]  # dtype, shape and bytes: -0.0 and NaN included
    for j in (j0, j1):
        assert j["first"] is None and j["step"] == 3 and j["path"] == "/ckpt/step-0000003"
        assert j["meta"] == {"step": 3, "world_size": 1, "x": [1, "a"]}
        assert j["stop"] == ["val_plateau", 9] and j["flag"] is True
    assert j0["signal"] == "a signal on another rank" and j1["signal"] == "SIGTERM"


@pytest.mark.slow
@needs_torchrun
def test_torchrun_gloo_equals_one_process(launches):
    ok(launches["t1"])
    out = ok(launches["t2"])
    diff = adapter_diff(launches["where"] / "t1" / "adapters" / "adapter_model.safetensors",
                        launches["where"] / "t2" / "adapters" / "adapter_model.safetensors")
    assert diff < TORCH_TOL, f"torchrun 2 ranks vs 1 process: max abs diff {diff:.3g}"
    same_curve(launches["where"] / "t1", launches["where"] / "t2")
    assert out.count(f"reason=finished {K} steps") == 1
    print(f"max abs diff, torchrun (gloo) 2 ranks vs 1 process after {K} steps: {diff:.3g}")
