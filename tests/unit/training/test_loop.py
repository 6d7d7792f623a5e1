"""Unit tests of the training loop itself (training/loop.py ``Trainer``).

The loop runs against ``FakeBackend``: the backend Protocol in pure numpy, whose losses,
gradient norms and validation losses are scripted per step, so each rule can be driven
to fire at a step computed by hand. Everything else is the product's: a real
``CheckpointManager`` (numpy codec) under tmp_path, the reporters ``make_reporters``
builds (metrics.jsonl), ``EarlyStopping``, the schedule. The tests read what a run
leaves behind: metrics.jsonl records and checkpoint directories.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_tune.backends.base import (AppliedLimits, EvalResult, MemoryLimits,
                                    MemoryReading, StepResult)
from mlx_tune.backends.common import (EMA, OPTIMIZER, TRAINABLE, state_undone, weights_swapped,
                                      with_prefix)
from mlx_tune.checkpoint import faults
from mlx_tune.checkpoint.format import NumpyCodec
from mlx_tune.checkpoint.manager import CheckpointManager, Loaded
from mlx_tune.config.schema import EarlyStoppingSpec, EmaSpec, MemorySpec, Spec
from mlx_tune.data.batch import Batch
from mlx_tune.exit_codes import (EXIT_CHECKPOINT_FAILURES, EXIT_GRAD_SPIKE, EXIT_INTERRUPTED,
                                 EXIT_MEMORY_GROWTH, EXIT_NONFINITE, EXIT_OK, EXIT_PLATEAU,
                                 EXIT_VAL_PLATEAU)
from mlx_tune.reporting.factory import make_reporters
from mlx_tune.system.memory import resident_bytes
from mlx_tune.training.loop import RunResult, Trainer
from mlx_tune.training.state import restore

WIDTH = 8  # tokens per row of the fake data
LR = 1e-3  # weights move < 0.05 per step: scripted validation losses stay in charge


# ------------------------------------------------------------------ the fake backend
class Lazy:
    """A step value the loop may only read through ``to_floats`` (as with MLX's lazy
    arrays, where anything else would force a host sync per step)."""

    def __init__(self, value: float) -> None:
        self._value = float(value)

    def __float__(self) -> float:
        raise AssertionError("the loop read a step value outside to_floats")

    __bool__ = __index__ = __int__ = __float__  # type: ignore[assignment]


class Script:
    """Per-step values (1-based step -> value), a default elsewhere."""

    def __init__(self, default: float, **at: float) -> None:
        self.default, self.at = default, {int(k[1:]): v for k, v in at.items()}

    def __call__(self, step: int) -> float:
        return self.at.get(step, self.default)


def constant(v: float) -> Callable[[int], float]:
    return lambda step: v


class FakeBackend:
    """The backend Protocol (backends/base.py) in numpy, one process.

    Weights ``w`` move by ``-lr * g`` where ``g`` depends on the batch (so the data
    position matters) and on Python's RNG (so the loop's RNG restore matters); skipped
    (non-finite) steps change nothing, as on the real backends. The optimizer state is
    the step count and a momentum-like sum. Validation's per-token loss is
    ``val_loss(step) + sum(weights in use)``: live weights, or EMA ones inside
    ``ema_weights()``. ``leak_bytes``: each step keeps a reference to that many more
    bytes (written, so they are resident), a planted leak the process's resident set
    shows.
    """

    name = "fake"
    rank, world_size = 0, 1
    tokenizer = None

    def __init__(self, spec: Spec, *, loss: Callable[[int], float] = constant(2.0),
                 grad_norm: Callable[[int], float] = constant(1.0),
                 finite: Callable[[int], float] = constant(1.0),
                 val_loss: Callable[[int], float] = constant(2.0),
                 on_step: Callable[[int], None] | None = None, leak_bytes: int = 0) -> None:
        self.codec = NumpyCodec()
        self.leak_bytes, self.leaked = leak_bytes, []
        self.loss, self.grad_norm, self.finite, self.val_loss = loss, grad_norm, finite, val_loss
        self.on_step = on_step or (lambda step: None)
        self.w = np.zeros(4, np.float32)
        self.opt = {"t": np.zeros((), np.int64), "m": np.zeros(4, np.float32)}
        self.decay = spec.ema.decay if spec.ema.enabled else None
        self.ema = {"weights": self.w.copy()} if self.decay is not None else {}
        self.shapes: set[tuple] = set()

    # -- collectives (one process: each returns its input) ----------------------
    def all_sum_ints(self, values: Sequence[int]) -> list[int]:
        return list(values)

    def broadcast_bytes(self, data: bytes) -> bytes:
        return data

    def broadcast_arrays(self, arrays: dict | None) -> dict:
        return dict(arrays or {})

    # -- training ----------------------------------------------------------------
    def step(self, micro_batches: Sequence[Batch], lr: float, noise_std: float) -> StepResult:
        self.opt["t"] = self.opt["t"] + 1
        t = int(self.opt["t"])
        self.on_step(t)
        if self.leak_bytes:
            self.leaked.append(np.ones(self.leak_bytes, np.uint8))
        self.shapes.update(b.tokens.shape for b in micro_batches)
        tokens = sum(b.n_targets for b in micro_batches)
        loss, norm, ok = self.loss(t), self.grad_norm(t), self.finite(t)
        if ok and math.isfinite(loss) and math.isfinite(norm):
            position = int(micro_batches[0].tokens[0, 0])
            g = np.float32((1 + position % 5) * (1 + random.random())) * np.ones(4, np.float32)
            self.w = self.w - np.float32(lr) * g
            self.opt["m"] = self.opt["m"] + g
            if self.ema:
                d = np.float32(self.decay)
                self.ema["weights"] = d * self.ema["weights"] + (1 - d) * self.w
        return StepResult(Lazy(loss), Lazy(tokens), Lazy(norm), Lazy(ok))

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        per_token = self.val_loss(int(self.opt["t"])) + float(self.w.sum())
        total = EvalResult()
        for b in batches:
            n = b.n_targets
            total = total + EvalResult(per_token * n, n, {"accuracy": (n / 2, n),
                                                          "confidence": (n / 4, n),
                                                          "entropy": (n, n)})
        return total

    def score_rows(self, batch: Batch) -> np.ndarray:
        # Each row's share of evaluate()'s loss sum, negated: a log-prob sum.
        per_token = self.val_loss(int(self.opt["t"])) + float(self.w.sum())
        return (-per_token * batch.mask[:, 1:].sum(axis=1)).astype(np.float32)

    def to_floats(self, values: Sequence[Any]) -> list[float]:
        return [v._value if isinstance(v, Lazy) else float(v) for v in values]

    def memory(self) -> MemoryReading:
        # The allocator's figures stay flat: a leak shows only in the resident set.
        return MemoryReading(32 * 2**20, 48 * 2**20, 0, resident_bytes())

    def reset_peak_memory(self) -> None:
        pass

    def memory_limits(self, limits: MemoryLimits) -> AbstractContextManager[AppliedLimits]:
        return nullcontext(AppliedLimits(limits.cache))

    def trial_step(self, micro_batch: Batch) -> int:
        with state_undone(self.state_dict, self.load_state_dict, np.copy):
            self.step([micro_batch], 0.0, 0.0)
            return self.memory().peak

    def compiled_shapes(self) -> int:
        return len(self.shapes)

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict]:
        arrays = {TRAINABLE + "w": self.w, **{OPTIMIZER + k: v for k, v in self.opt.items()}}
        arrays.update({EMA + k: v for k, v in self.ema.items()})
        return arrays, {"backend": "fake"}

    def load_state_dict(self, arrays: dict[str, Any], meta: dict) -> None:
        assert meta == {"backend": "fake"}  # what state_dict() returned, nothing else
        self.w = with_prefix(arrays, TRAINABLE)["w"]
        self.opt = with_prefix(arrays, OPTIMIZER)
        if self.ema:
            self.ema = with_prefix(arrays, EMA)

    def ema_weights(self) -> AbstractContextManager[None]:
        # Trees of named arrays, as in the real backends.
        return weights_swapped({"w": self.ema["weights"]} if self.ema else None,
                               lambda: {"w": self.w}, lambda tree: setattr(self, "w", tree["w"]))

    def save_adapter(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w}, str(Path(directory) / "adapters.safetensors"))

    def generate(self, messages: list[dict], max_tokens: int, tools=None) -> str:
        return "ok"


# ------------------------------------------------------------------ the fake data
class FakeTrain:
    """A resumable stream of batches; row 0 starts with the stream position, and the
    number of target tokens varies with it."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.position = batch_size, 0

    @property
    def epoch(self) -> int:
        return self.position // 10

    def next_batch(self) -> Batch:
        self.position += 1
        tokens = np.full((self.batch_size, WIDTH), self.position, np.int32)
        mask = np.zeros((self.batch_size, WIDTH), np.float32)
        mask[:, 1:3 + self.position % 4] = 1
        return Batch(tokens, mask)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class FakeValid:
    def __init__(self, batch_size: int) -> None:
        mask = np.ones((batch_size, WIDTH), np.float32)
        mask[:, 0] = 0
        self._batches = [Batch(np.zeros((batch_size, WIDTH), np.int32), mask)] * 2

    def batches(self) -> list[Batch]:
        return list(self._batches)


class FakeData:
    def __init__(self, spec: Spec, valid: bool = True) -> None:
        self.train = FakeTrain(spec.batch_size)
        self.valid = FakeValid(spec.batch_size) if valid else None


# ------------------------------------------------------------------ running the loop
def make_spec(tmp_path: Path, **kw: Any) -> Spec:
    es = {"enabled": True, "monitor": "none", "warmup": 0, **kw.pop("early_stopping", {})}
    base = dict(output_dir=str(tmp_path / "run"), max_steps=12, batch_size=2,
                report_every=1, eval_steps=1000, eval_at_start=False, checkpoint_interval=1000,
                keep_checkpoints=10, num_samples=0, tensorboard=False, dashboard="plain",
                early_stopping=EarlyStoppingSpec(**es))
    return Spec(**{**base, **kw})


def run_dir(spec: Spec) -> Path:
    return Path(spec.output_dir)


def manager_of(spec: Spec) -> CheckpointManager:
    return CheckpointManager(run_dir(spec) / "checkpoints", NumpyCodec(),
                             keep=spec.keep_checkpoints, log=lambda m: None)


def trainer(spec: Spec, backend: FakeBackend, *, manager: CheckpointManager | None = None,
            loaded: Loaded | None = None, accumulation: int = 1) -> Trainer:
    """A Trainer wired as recipe.train wires it: the checkpoint ``loaded`` restored first,
    then reporters from make_reporters continuing from its step."""
    data = FakeData(spec)
    progress = (restore(spec, backend, data, loaded.arrays, loaded.meta, str(loaded.path))
                if loaded is not None else None)
    reporters = make_reporters("plain", output_dir=run_dir(spec), total_steps=spec.max_steps,
                               resume_step=loaded.step if loaded else -1, report_to=[])
    return Trainer(spec, backend, data, reporters, manager or manager_of(spec),
                   schedule=lambda step: LR, accumulation=accumulation, progress=progress)


def run(t: Trainer) -> RunResult:
    try:
        return t.run()
    finally:
        t.reporters.close()


def records(spec: Spec, kind: str | None = None) -> list[dict]:
    lines = (run_dir(spec) / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [r for r in recs if kind is None or r["type"] == kind]


def steps_of(spec: Spec, kind: str) -> list[int]:
    return [r["step"] for r in records(spec, kind)]


def saved_steps(spec: Spec) -> list[int]:
    return sorted(step for _, step in manager_of(spec).discover())


# ------------------------------------------------------------------ stop rules
STOP_CASES = {
    # rule: (early_stopping settings, backend script, step at which the rule fires)
    # plateau: checks every 2 steps of a constant loss; the first sets the reference,
    # the next two do not improve on it: the second of them (step 6) stops.
    "plateau": ({"monitor": "train_loss", "check_every": 2, "loss_window": 2, "patience": 2},
                {}, 6, EXIT_PLATEAU),
    # val_plateau: evaluations every 2 steps of a flat validation loss, after a baseline
    # at step 0: steps 2 and 4 do not improve; step 4 stops.
    "val_plateau": ({"monitor": "val_loss", "val_patience": 2, "val_min_delta": 0.5},
                    {"val_loss": constant(3.0)}, 4, EXIT_VAL_PLATEAU),
    # grad_spike: norms of 100 > 10 from step 5; the third in a row (step 7) stops.
    "grad_spike": ({"grad_spike_threshold": 10.0, "grad_spike_patience": 3},
                   {"grad_norm": Script(1.0, s5=100.0, s6=100.0, s7=100.0, s8=100.0)}, 7,
                   EXIT_GRAD_SPIKE),
    # nonfinite: steps 3 (flagged) and 4 (NaN loss) are skipped; the second stops.
    "nonfinite": ({"max_nonfinite_steps": 2},
                  {"finite": Script(1.0, s3=0.0), "loss": Script(2.0, s4=float("nan"))}, 4,
                  EXIT_NONFINITE),
}


@pytest.mark.parametrize("rule", list(STOP_CASES))
def test_each_stop_rule_ends_the_run_with_its_exit_code_after_a_checkpoint(tmp_path, rule):
    es, script, stop_step, code = STOP_CASES[rule]
    spec = make_spec(tmp_path, early_stopping=es, eval_steps=2, eval_at_start=True)
    result = run(trainer(spec, FakeBackend(spec, **script)))

    assert (result.exit_code, result.step) == (code, stop_step)
    recs = records(spec)
    stop = recs[-1]
    assert stop["type"] == "stop" and stop["exit_code"] == code and stop["step"] == stop_step
    assert f"({rule})" in stop["reason"]
    # The checkpoint of the stop step is written before the stop is reported...
    assert recs[-2]["type"] == "checkpoint" and recs[-2]["step"] == stop_step
    # ...and it is complete, and holds the loop state of that step.
    loaded = manager_of(spec).latest_valid()
    assert loaded.step == stop_step and loaded.meta["step"] == stop_step
    assert int(loaded.arrays[OPTIMIZER + "t"]) == stop_step
    assert max(steps_of(spec, "train")) == stop_step  # no step trained past the decision


def test_a_planted_leak_trips_the_growth_stop_after_a_checkpoint(tmp_path):
    # Each step keeps 16 MB more, resident (the OS's own count, /proc/self/statm): after
    # the baseline at step 2, growth passes 25% of it (and the 32 MB floor) at some
    # step; the rule waits for 2 reports over it in a row, then stops with exit 12,
    # the stop step checkpointed first. The same settings without the leak never trip.
    memory = {"growth_warmup": 2, "growth_stop": 0.25, "growth_warning": 0.1,
              "growth_min_gb": 0.032, "growth_patience": 2}
    spec = make_spec(tmp_path, max_steps=400, memory=MemorySpec(**memory))
    backend = FakeBackend(spec, leak_bytes=16 * 2**20)
    result = run(trainer(spec, backend))

    assert result.exit_code == EXIT_MEMORY_GROWTH and 2 < result.step < 400
    train = records(spec, "train")
    baseline = train[1]  # step 2
    assert baseline["step"] == 2 and baseline["memory_delta_mb"] == 0
    over = [r["step"] for r in train[2:] if r["resident_mb"] - baseline["resident_mb"]
            > max(0.25 * baseline["resident_mb"], 32e6 / 2**20)]
    assert result.step == over[1]  # the second report over the limit stops
    assert train[-1]["resident_mb"] - baseline["resident_mb"] >= 16 * (result.step - 2) * 0.9
    assert any(r["leak_warning"] for r in train) and not train[0]["leak_warning"]
    recs = records(spec)
    assert recs[-1]["type"] == "stop" and recs[-1]["exit_code"] == EXIT_MEMORY_GROWTH
    assert "(memory_growth)" in recs[-1]["reason"] and "resident memory grew" in recs[-1]["reason"]
    assert recs[-2]["type"] == "checkpoint" and recs[-2]["step"] == result.step
    assert manager_of(spec).latest_valid().step == result.step

    healthy = make_spec(tmp_path / "healthy", max_steps=40, memory=MemorySpec(**memory))
    assert run(trainer(healthy, FakeBackend(healthy))).exit_code == EXIT_OK


def test_a_stop_decided_mid_interval_is_acted_on_at_the_report_boundary(tmp_path):
    # The spike rule fires at step 7 but step values are read every 4 steps (one host
    # sync per interval): the run ends at step 8, saving step 8, with the rule's code.
    es, script, _, code = STOP_CASES["grad_spike"]
    spec = make_spec(tmp_path, early_stopping=es, report_every=4)
    result = run(trainer(spec, FakeBackend(spec, **script)))
    assert (result.exit_code, result.step) == (code, 8)
    assert saved_steps(spec) == [8] and records(spec)[-1]["exit_code"] == code
    assert "(steps 5-7)" in records(spec)[-1]["reason"]


def test_a_stop_found_at_a_checkpoint_boundary_is_acted_on_there(tmp_path):
    # The spike rule fires at step 7; reports come every 4 steps but a checkpoint is due
    # at step 7, where the interval's values are read. The run stops there, as a run that
    # reads every step does, instead of training on to the report at step 8.
    es, script, _, code = STOP_CASES["grad_spike"]
    every = make_spec(tmp_path / "every-step", early_stopping=es, report_every=1)
    reference = run(trainer(every, FakeBackend(every, **script)))
    spec = make_spec(tmp_path / "boundary", early_stopping=es, report_every=4,
                     checkpoint_interval=7)
    backend = FakeBackend(spec, **script)
    result = run(trainer(spec, backend))
    assert reference.step == 7 and (result.exit_code, result.step) == (code, reference.step)
    assert int(backend.opt["t"]) == 7  # no step trained past the decision
    assert saved_steps(spec) == [7] and records(spec)[-1]["exit_code"] == code
    assert records(spec)[-1]["reason"] == records(every)[-1]["reason"]


def test_an_interrupt_saves_then_exits_130(tmp_path):
    spec = make_spec(tmp_path)
    backend = FakeBackend(spec, on_step=lambda t: t == 5 and os.kill(os.getpid(), signal.SIGINT))
    result = run(trainer(spec, backend))
    assert (result.exit_code, result.step) == (EXIT_INTERRUPTED, 5)
    assert saved_steps(spec) == [5] and records(spec)[-1]["exit_code"] == EXIT_INTERRUPTED


# ------------------------------------------------------------------ cadence
def test_report_interval_and_checkpoint_cadence_include_the_last_step(tmp_path):
    spec = make_spec(tmp_path, max_steps=10, report_every=3, checkpoint_interval=4,
                     eval_steps=5, eval_at_start=True, keep_checkpoints=2)
    losses = {s: 1.0 + 0.1 * s for s in range(1, 11)}
    # Validation only gets worse after the baseline: no best/ save joins the cadence.
    backend = FakeBackend(spec, loss=losses.__getitem__, grad_norm=lambda s: 0.5 * s,
                          val_loss=lambda s: 2.0 + s)
    result = run(trainer(spec, backend))

    assert (result.exit_code, result.step) == (EXIT_OK, 10)
    assert steps_of(spec, "train") == [3, 6, 9, 10]
    assert steps_of(spec, "eval") == [0, 5, 10]
    assert steps_of(spec, "checkpoint") == [4, 8, 10]
    assert saved_steps(spec) == [8, 10]  # keep_checkpoints=2 pruned step 4

    # Each report is the token-weighted mean loss of its own interval, as the data's
    # target counts (2 rows x (2 + position % 4) targets) weight it.
    data = FakeTrain(spec.batch_size)
    tokens = {s: data.next_batch().n_targets for s in range(1, 11)}
    intervals = [(1, 3), (4, 6), (7, 9), (10, 10)]
    for rec, (a, b) in zip(records(spec, "train"), intervals):
        steps = range(a, b + 1)
        want = sum(losses[s] * tokens[s] for s in steps) / sum(tokens[s] for s in steps)
        assert rec["loss"] == pytest.approx(want, rel=1e-12)
        assert rec["grad_norm"] == 0.5 * b  # the norm of the interval's last step
        assert rec["trained_tokens"] == sum(tokens[s] for s in range(1, b + 1))
    ckpt = {r["step"]: r["steps_since_checkpoint"] for r in records(spec, "train")}
    assert ckpt == {3: 3, 6: 2, 9: 1, 10: 2}


def test_the_report_label_follows_the_loss_window(tmp_path):
    # loss_avg is early stopping's moving average over loss_window steps.
    spec = make_spec(tmp_path, max_steps=6, report_every=6,
                     early_stopping={"loss_window": 3})
    losses = {s: float(s) for s in range(1, 7)}
    run(trainer(spec, FakeBackend(spec, loss=losses.__getitem__)))
    (rec,) = records(spec, "train")
    assert rec["loss_window"] == 3
    assert rec["loss_avg"] == pytest.approx((4 + 5 + 6) / 3)


# ------------------------------------------------------------------ best/
class BestProbe:
    """A reporter that reads which step best/ holds at every report."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager, self.seen = manager, {}

    def on_train(self, r) -> None:
        self.seen[r.step] = self.manager.best_step()

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def test_best_follows_the_lowest_validation_loss(tmp_path):
    val = {0: 5.0, 2: 3.0, 4: 3.5, 6: 2.0, 8: 2.2, 10: 2.5}  # at the step evaluated
    spec = make_spec(tmp_path, max_steps=10, eval_steps=2, eval_at_start=True,
                     checkpoint_interval=4, keep_checkpoints=1)
    manager = manager_of(spec)
    t = trainer(spec, FakeBackend(spec, val_loss=val.__getitem__), manager=manager)
    probe = BestProbe(manager)
    t.reporters.append(probe)
    run(t)

    # Hand-derived from the script: the step of the running minimum at each evaluation.
    best_at = {0: 0, 2: 2, 4: 2, 6: 6, 8: 6, 10: 6}
    evals = records(spec, "eval")
    assert {r["step"]: r["best_step"] for r in evals} == best_at
    assert [r["step"] for r in evals if r["is_best"]] == [0, 2, 6]
    # On disk, at each report (which comes before that step's evaluation): best/ holds
    # the newest best step already evaluated; none before the first evaluation after step 0.
    assert probe.seen == {1: None, 2: None, 3: 2, 4: 2, 5: 2, 6: 2, 7: 6, 8: 6, 9: 6, 10: 6}
    # best/ is a verified copy of the step-6 checkpoint, though step 6 itself was pruned.
    assert saved_steps(spec) == [10]
    _, meta = manager.load(manager.best_path)
    assert meta["step"] == 6 and meta["last_val_loss"] == min(r["val_loss"] for r in evals)


# ------------------------------------------------------------------ EMA
def test_evaluation_uses_ema_weights_when_asked_and_training_keeps_the_live_ones(tmp_path):
    decay = 0.5
    runs = {}
    for use in (True, False):
        spec = make_spec(tmp_path / str(use), max_steps=4, eval_steps=2, seed=1,
                         ema=EmaSpec(enabled=True, decay=decay, use_for_eval=use))
        random.seed(7)
        backend = FakeBackend(spec, val_loss=constant(0.0))
        run(trainer(spec, backend))
        runs[use] = (spec, backend)

    # Both runs trained the same live weights: the EMA swap put them back each time.
    (spec_ema, ema_backend), (spec_live, live_backend) = runs[True], runs[False]
    assert np.array_equal(ema_backend.w, live_backend.w)
    assert records(spec_ema, "train") and [
        (r["step"], r["loss"]) for r in records(spec_ema, "train")] == [
        (r["step"], r["loss"]) for r in records(spec_live, "train")]

    # The fake's validation loss is sum(weights in use); the EMA of weights that only
    # decrease lags behind them, so EMA evaluations read higher.
    val_ema = [r["val_loss"] for r in records(spec_ema, "eval")]
    val_live = [r["val_loss"] for r in records(spec_live, "eval")]
    assert val_live[-1] == pytest.approx(float(live_backend.w.sum()), rel=1e-6)
    assert val_ema[-1] == pytest.approx(float(ema_backend.ema["weights"].sum()), rel=1e-6)
    assert all(e > v for e, v in zip(val_ema, val_live))


def test_ema_evaluation_matches_a_hand_computed_average(tmp_path):
    decay = 0.5
    spec = make_spec(tmp_path, max_steps=3, eval_steps=3, batch_size=2,
                     ema=EmaSpec(enabled=True, decay=decay, use_for_eval=True))
    random.seed(3)
    draws = [random.random() for _ in range(3)]
    random.seed(3)
    run(trainer(spec, FakeBackend(spec, val_loss=constant(0.0))))
    # w_t = w_{t-1} - LR * g_t with g_t = (1 + position % 5)(1 + draw_t) per element;
    # ema_t = d * ema_{t-1} + (1 - d) * w_t; 4 elements.
    w = ema = 0.0
    for step, draw in enumerate(draws, start=1):
        w -= LR * (1 + step % 5) * (1 + draw)
        ema = decay * ema + (1 - decay) * w
    (rec,) = records(spec, "eval")
    assert rec["val_loss"] == pytest.approx(4 * ema, rel=1e-5)
    assert rec["val_loss"] != pytest.approx(4 * w, rel=1e-3)


# ------------------------------------------------------------------ failed saves
def test_three_failed_saves_in_a_row_stop_with_7(tmp_path, monkeypatch):
    spec = make_spec(tmp_path, max_steps=20, checkpoint_interval=2)
    manager = manager_of(spec)
    monkeypatch.setenv("MLX_TUNE_FAULTS", "disk_full")
    faults.install(manager)  # as recipe.train does: every shard write fails with ENOSPC
    result = run(trainer(spec, FakeBackend(spec), manager=manager))

    assert (result.exit_code, result.step) == (EXIT_CHECKPOINT_FAILURES, 6)
    errors = records(spec, "message")
    assert [(m["step"], m["level"]) for m in errors] == [(2, "error"), (4, "error"), (6, "error")]
    assert [m["text"].split("(")[1][:3] for m in errors] == ["1/3", "2/3", "3/3"]
    assert "No space left on device" in errors[0]["text"]
    assert records(spec)[-1]["exit_code"] == EXIT_CHECKPOINT_FAILURES
    assert saved_steps(spec) == [] and not any((run_dir(spec) / "checkpoints").iterdir())


def test_a_failed_save_is_retried_at_the_next_interval(tmp_path):
    # The disk is full while steps 2, 4, 8 and 10 save: two failures in a row, then a
    # success resets the count, so the run goes on to the end.
    spec = make_spec(tmp_path, max_steps=12, checkpoint_interval=2)
    manager = manager_of(spec)
    backend = FakeBackend(spec)
    original = manager.codec.save_file

    def full_at_some_steps(arrays: dict, path: str) -> None:
        if int(backend.opt["t"]) in (2, 4, 8, 10):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        original(arrays, path)

    manager.codec.save_file = full_at_some_steps
    result = run(trainer(spec, backend, manager=manager))
    assert (result.exit_code, result.step) == (EXIT_OK, 12)
    assert steps_of(spec, "checkpoint") == [6, 12]
    texts = [m["text"] for m in records(spec, "message")]
    assert [(m["step"]) for m in records(spec, "message")] == [2, 4, 8, 10]
    assert [t.split("(")[1][:3] for t in texts] == ["1/3", "2/3", "1/3", "2/3"]
    assert saved_steps(spec) == [6, 12]


# ------------------------------------------------------------------ resume
NOISY = {"loss": lambda s: 2.0 + math.sin(s), "grad_norm": lambda s: 1.0 + s % 3,
         "val_loss": lambda s: 3.0 - 0.1 * s}


def comparable(spec: Spec) -> list[dict]:
    """metrics.jsonl without what depends on the clock, the process (its resident set) or
    the run's directory."""
    clock = {"wall_time", "tokens_per_second", "steps_per_second", "eta_seconds", "seconds",
             "resident_mb"}
    out = []
    for r in records(spec):
        if r["type"] == "start":
            continue
        r = {k: v for k, v in r.items() if k not in clock}
        for k in ("path", "last_checkpoint"):
            if isinstance(r.get(k), str):
                r[k] = os.path.relpath(r[k], spec.output_dir)
        out.append(r)
    return out


def resume_spec(tmp_path: Path, name: str) -> Spec:
    # Every piece of loop state in play: a report interval cut by the resume point, EMA,
    # the moving average and spike counter of early stopping, evaluations, Python's RNG.
    return make_spec(tmp_path / name, max_steps=16, report_every=3, eval_steps=4,
                     eval_at_start=True, checkpoint_interval=5, seed=3,
                     ema=EmaSpec(enabled=True, decay=0.9),
                     early_stopping={"monitor": "train_loss", "check_every": 2,
                                     "loss_window": 4, "patience": 50,
                                     "grad_spike_threshold": 2.5, "grad_spike_patience": 5})


class Crash(Exception):
    pass


def crash_at(step: int) -> Callable[[int], None]:
    def hook(t: int) -> None:
        if t == step:
            raise Crash(f"killed at step {t}")
    return hook


@pytest.mark.parametrize("how", ["interrupt", "crash"])
def test_resume_restores_the_loop_state_exactly(tmp_path, how):
    random.seed(11)
    np.random.seed(11)
    ref = resume_spec(tmp_path, "reference")
    ref_backend = FakeBackend(ref, **NOISY)
    assert run(trainer(ref, ref_backend, accumulation=2)).exit_code == EXIT_OK

    random.seed(11)
    np.random.seed(11)
    spec = resume_spec(tmp_path, "resumed")
    if how == "interrupt":  # SIGINT during step 7: the loop saves step 7 and exits 130
        hook = lambda t: t == 7 and os.kill(os.getpid(), signal.SIGINT)
        assert run(trainer(spec, FakeBackend(spec, **NOISY, on_step=hook),
                           accumulation=2)).exit_code == EXIT_INTERRUPTED
        resume_at = 7
    else:  # the process dies in step 12: the last checkpoint is the interval one at 10
        with pytest.raises(Crash):
            run(trainer(spec, FakeBackend(spec, **NOISY, on_step=crash_at(12)), accumulation=2))
        resume_at = 10
    # Whatever the process state was, the new one starts elsewhere.
    random.seed(999)
    np.random.seed(999)

    loaded = manager_of(spec).latest_valid()
    assert loaded.step == resume_at
    backend = FakeBackend(spec, **NOISY)
    assert run(trainer(spec, backend, loaded=loaded, accumulation=2)).exit_code == EXIT_OK

    got, want = comparable(spec), comparable(ref)
    # The interrupted run's own stop record is the only extra line.
    got = [r for r in got if not (r["type"] == "stop" and r["exit_code"] == EXIT_INTERRUPTED)]
    if how == "interrupt":  # the resumed run's checkpoint at 7 is not in the reference
        got = [r for r in got if not (r["type"] == "checkpoint" and r["step"] == 7)]
        got = [{**r, "steps_since_checkpoint": None, "last_checkpoint": None}
               if r["type"] == "train" and 7 <= r["step"] < 10 else r for r in got]
        want = [{**r, "steps_since_checkpoint": None, "last_checkpoint": None}
                if r["type"] == "train" and 7 <= r["step"] < 10 else r for r in want]
    assert got == want
    assert np.array_equal(backend.w, ref_backend.w)
    assert np.array_equal(backend.ema["weights"], ref_backend.ema["weights"])
