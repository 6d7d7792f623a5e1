"""The training loop: backend-agnostic, readable top to bottom.

The loop owns time: the step counter, the learning rate at each step, gradient
accumulation boundaries, when to evaluate, when to save, when to stop. The backend
owns arrays. Step results stay lazy (MLX) until a report boundary, where one
``to_floats`` call reads a whole interval at once: no per-step host sync.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from mlx_tune.backends.base import Backend, MemoryReading, StepResult
from mlx_tune.training.cadence import gradient_noise_std, is_eval_step
from mlx_tune.checkpoint.manager import CheckpointManager, CheckpointSaveError
from mlx_tune.data.batch import shard_rows
from mlx_tune.distributed.decisions import agree, broadcast_flag, broadcast_stop
from mlx_tune.training.samples import run_samples
from mlx_tune.training.guard import TrainingGuard
from mlx_tune.training.signals import SignalGuard
from mlx_tune.training.memory import MB, MemoryGrowth
from mlx_tune.training.monitors import ThroughputMeter
from mlx_tune.training.state import Interval, Progress, python_rng_state
from mlx_tune.reporting.records import EvalReport, Reporters, TrainReport
from mlx_tune.config.schema import Spec, to_dict
from mlx_tune.checkpoint.resume import spec_fingerprint
from mlx_tune.data.records import DataError
from mlx_tune.exit_codes import (EXIT_BAD_DATA, EXIT_CHECKPOINT_FAILURES, EXIT_INTERRUPTED, EXIT_OK,
                                 StopDecision)

MAX_SAVE_FAILURES = 3


@dataclass
class RunResult:
    exit_code: int
    reason: str
    step: int
    best_val_loss: float | None = None
    first_val_loss: float | None = None
    last_val_loss: float | None = None


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


class Trainer:
    """Runs the loop for one spec with one backend: construct with everything it needs
    (``progress`` from ``state.restore`` when resuming), then ``run``."""

    def __init__(self, spec: Spec, backend: Backend, data: Any, reporters: Reporters,
                 manager: CheckpointManager | None, schedule: Callable[[int], float],
                 accumulation: int, *, fingerprint: dict | None = None,
                 progress: Progress | None = None, extra_meta: dict | None = None):
        self.spec, self.backend, self.data, self.reporters = spec, backend, data, reporters
        self.manager, self.schedule, self.accumulation = manager, schedule, accumulation
        progress = progress or Progress.fresh(spec)
        self.state, self.stopper = progress.state, progress.stopper
        self.throughput = ThroughputMeter(window=50)
        # "Is it actually training?" (training/guard.py), judged in the session that takes
        # the first steps; a resumed run has been judged already.
        self.guard = TrainingGuard(backend)
        self.guard.done = self.state.step > 0
        # Memory growth is about this process: a resumed run takes a fresh baseline.
        self.memory = MemoryGrowth(spec.memory)
        self._reading: MemoryReading | None = None
        self.rank, self.world_size = backend.rank, backend.world_size
        self.save_failures = 0
        self._failed_step: int | None = None
        # Distributed runs: the watchdog's beat (distributed.peers.Watchdog), called once a
        # step; ``run`` sets it.
        self._heartbeat: Callable[[], None] = lambda: None
        self._signals: SignalGuard | None = None
        self._agreed_interrupt: str | None = None  # a signal every rank has agreed on
        self._shapes_warned = False
        # Stored in every checkpoint: the recipe's includes the data content hash.
        self.fingerprint: dict = fingerprint if fingerprint is not None else spec_fingerprint(spec)
        # Also stored in every checkpoint: what the run pins (the precomputed reference's
        # sha256, training/reference.py).
        self.extra_meta: dict = dict(extra_meta or {})

    # -- checkpoint state -----------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        s = self.state
        return {"step": s.step, "trained_tokens": s.trained_tokens,
                "interval": vars(s.interval), "first_val_loss": s.first_val_loss,
                "last_val_loss": s.last_val_loss, "data": self.data.train.state_dict(),
                "early_stopping": self.stopper.state_dict(),
                "rng": python_rng_state(), "fingerprint": self.fingerprint,
                "spec": to_dict(self.spec), "world_size": self.world_size, **self.extra_meta}

    def save(self, *, best: bool = False) -> bool:
        """Save through the manager; a failure is reported and training goes on."""
        if self.manager is None or self.rank != 0:
            return True
        s = self.state
        if s.last_checkpoint is not None and s.last_checkpoint_step == s.step:
            if best:  # the interval checkpoint of this step becomes best/
                self.manager.mark_best(s.last_checkpoint)
            return True
        if self._failed_step == s.step:  # one attempt per step: the next interval retries
            return False
        arrays, backend_meta = self.backend.state_dict()
        meta = {**self.checkpoint_meta(), "backend": backend_meta}
        try:
            path = self.manager.save(s.step, arrays, meta, best=best)
        except CheckpointSaveError as e:
            self.save_failures += 1
            self._failed_step = s.step
            self.reporters.on_message(f"checkpoint at step {s.step} failed "
                                      f"({self.save_failures}/{MAX_SAVE_FAILURES} in a row): {e}",
                                      "error")
            return False
        self.save_failures = 0
        s.last_checkpoint, s.last_checkpoint_step = str(path), s.step
        self.reporters.on_checkpoint(s.step, str(path))
        return True

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self) -> StopDecision | None:
        if self.data.valid is None:
            return None
        tic = time.perf_counter()
        use_ema = self.spec.ema.enabled and self.spec.ema.use_for_eval
        batches = self.data.valid.batches()
        if self.world_size > 1:  # each rank evaluates its rows; the backend adds up the sums
            batches = [b for b in (shard_rows(b, self.rank, self.world_size) for b in batches)
                       if b is not None]
        # In training's micro-batches: the same (rows, width) shapes as the compiled step
        # already has, so evaluating adds no compiled traces (and no more memory).
        batches = [m for b in batches
                   for m in (b.split(self.accumulation) if b.size % self.accumulation == 0
                             else [b])]
        with (self.backend.ema_weights() if use_ema else nullcontext()):
            result = self.backend.evaluate(self._beating(batches))
        val_loss = result.loss_sum / max(result.tokens, 1.0)
        metrics = result.means()
        if self.spec.objective == "sft":  # token cross-entropy: its exponential means something
            metrics = {"perplexity": math.exp(min(val_loss, 50.0)), **metrics}
        s = self.state
        if s.first_val_loss is None:
            s.first_val_loss = val_loss
        s.last_val_loss = val_loss
        decision = self.stopper.observe_eval(s.step, val_loss)
        samples = run_samples(self.backend, self.spec, self.data) if self.rank == 0 else []
        self.reporters.on_eval(EvalReport(
            step=s.step, val_loss=val_loss, metrics=metrics,
            best_val_loss=self.stopper.best_val_loss,
            best_step=self.stopper.best_step, is_best=self.stopper.is_new_best,
            seconds=time.perf_counter() - tic, samples=samples))
        if self.stopper.is_new_best and s.step > 0:
            self.save(best=True)
        return broadcast_stop(decision, self.backend)  # rank 0 decides for every rank

    def _beating(self, batches: list) -> Any:
        for batch in batches:
            self._heartbeat()
            yield batch

    # -- reporting ------------------------------------------------------------------
    def flush(self, pending: list[tuple[int, StepResult, float, float]],
              read_memory: bool = False) -> Any:
        """Read the lazy results of the interval in one sync; feed monitors and reporters
        (at a report boundary, ``read_memory``: the memory reading too, before the ranks
        agree, so a growth stop is rank 0's decision for every rank). Returns a stop
        decision or None."""
        if read_memory:
            self._reading = self.backend.memory()
        if not pending:
            return None
        flat = [v for _, r, _, _ in pending for v in r.values()]
        values = iter(self.backend.to_floats(flat))
        decision, s = None, self.state
        for step, result, lr, wall in pending:
            loss, tokens, norm, finite, count = (next(values) for _ in range(5))
            sums = {name: (next(values), next(values)) for name in result.metrics}
            ok = bool(finite) and math.isfinite(loss)
            if ok:
                s.interval.loss_sum += loss * count
                s.interval.tokens += count
                s.trained_tokens += int(tokens)
                for name, (total, n) in sums.items():
                    acc = s.interval.metrics.setdefault(name, [0.0, 0.0])
                    acc[0] += total
                    acc[1] += n
            s.interval.steps += 1
            s.interval.grad_norm = norm
            self.throughput.update(step, wall, tokens)
            decision = (decision or self.stopper.observe_step(step, loss, norm, ok)
                        or self.guard.observe(step, lr, norm, ok))
        if read_memory:
            decision = self.memory.observe(s.step, self._reading.footprint) or decision
        pending.clear()
        self._last_lr = lr
        if self.world_size > 1:  # rank 0's decision, and any rank's signal, for every rank
            decision, self._agreed_interrupt = agree(
                decision, self._signals and self._signals.requested, self.backend)
        return decision

    def _interrupted(self) -> str | None:
        """The signal that ends the loop. Distributed ranks act on it at the next report
        boundary, where they agree (``flush``), so all of them stop after the same step."""
        if self.world_size > 1:
            return self._agreed_interrupt
        return self._signals.requested if self._signals else None

    def shapes(self) -> tuple[int, int]:
        """(distinct input shapes the backend compiled for, the bound the widths set);
        warns once when the count passes the bound."""
        count = self.backend.compiled_shapes()
        widths = getattr(self.data, "widths", None)
        bound = widths.bound if widths is not None else 0
        if bound and count > bound and not self._shapes_warned:
            self._shapes_warned = True
            self.reporters.on_message(
                f"the compiled step has seen {count} input shapes, more than the {bound} "
                "the run's bucket widths allow: each is a compiled trace kept for the whole "
                "run (on a Mac, Metal buffers that are never freed)", "warning")
        return count, bound

    def report(self) -> None:
        s, iv = self.state, self.state.interval
        shapes, bound = self.shapes()
        m = self._reading or self.backend.memory()
        self.reporters.on_train(TrainReport(
            step=s.step, total_steps=self.spec.max_steps, epoch=getattr(self.data.train, "epoch", 0),
            loss=iv.loss_sum / iv.tokens if iv.tokens else float("nan"),
            # Early stopping's own moving average of finite losses (its plateau rule uses it).
            loss_avg=_or_nan(self.stopper.moving_average.value),
            loss_window=self.stopper.moving_average.window,
            loss_trend=self.stopper.moving_average.trend or 0.0,
            learning_rate=self._last_lr, grad_norm=iv.grad_norm,
            tokens_per_second=self.throughput.tokens_per_second or 0.0,
            steps_per_second=self.throughput.steps_per_second or 0.0,
            eta_seconds=self.throughput.eta_seconds(s.step, self.spec.max_steps),
            trained_tokens=s.trained_tokens, memory_mb=m.active / MB,
            peak_memory_mb=m.peak / MB, memory_delta_mb=self.memory.delta / MB,
            cache_memory_mb=m.cache / MB,
            resident_mb=None if m.resident is None else m.resident / MB,
            leak_warning=self.memory.leak_warning,
            steps_since_checkpoint=s.step - s.last_checkpoint_step,
            last_checkpoint=s.last_checkpoint, skipped_steps=self.stopper.skipped_steps,
            early_stopping=self.stopper.counters(),
            compiled_shapes=shapes, shape_bound=bound,
            metrics={name: total / n if n else float("nan")
                     for name, (total, n) in iv.metrics.items()}))
        s.interval = Interval()

    # -- the loop -------------------------------------------------------------------
    def run(self, signals: SignalGuard | None = None,
            heartbeat: Callable[[], None] | None = None) -> RunResult:
        """Train to the end or to a stop. ``signals``: a guard the caller keeps installed
        past the run (the recipe holds it until the adapter is written); without one, the
        run installs its own around everything it writes. ``heartbeat``: called once a
        step and during evaluation (a distributed run's watchdog)."""
        if signals is None:
            with SignalGuard() as own:
                return self.run(own, heartbeat)
        self._signals = signals
        self._heartbeat = heartbeat or (lambda: None)
        spec, s = self.spec, self.state
        pending: list[tuple[int, StepResult, float, float]] = []
        self._last_lr = self.schedule(s.step)
        stop, bad_data = None, None
        try:
            if s.step == 0 and spec.eval_at_start:
                self.evaluate()
            while s.step < spec.max_steps and stop is None:
                if self._interrupted():
                    break
                batch = self.data.train.next_batch()
                if self.world_size > 1:
                    batch = batch.split(self.world_size)[self.rank]
                lr = self.schedule(s.step)
                noise = gradient_noise_std(s.step, spec.gradient_noise.eta, spec.gradient_noise.gamma)
                self.guard.before_step(lr)
                result = self.backend.step(batch.split(self.accumulation), lr, noise)
                self._heartbeat()
                s.step += 1
                pending.append((s.step, result, lr, time.perf_counter()))

                last = s.step == spec.max_steps
                if s.step % spec.report_every == 0 or last:
                    stop = self.flush(pending, read_memory=True)
                    self.report()
                if stop is None and is_eval_step(s.step, eval_steps=spec.eval_steps,
                                                 max_steps=spec.max_steps,
                                                 schedule=spec.eval_schedule):
                    stop = self.flush(pending) or self.evaluate()
                if stop is None and s.step % spec.checkpoint_interval == 0 and not last:
                    # A stop found here is acted on now: the run ends at this step (and
                    # saves it below) rather than training on to the next report.
                    stop = self.flush(pending)
                    if stop is not None:
                        break
                    self.save()  # rank 0 only; it tells the others whether to give up
                    if broadcast_flag(self.save_failures >= MAX_SAVE_FAILURES, self.backend):
                        return self._finish(EXIT_CHECKPOINT_FAILURES,
                                            f"{MAX_SAVE_FAILURES} checkpoint saves failed in a "
                                            "row; stopping so the run does not go on unprotected")
        except DataError as e:
            # A record that could not be read mid-run (the file changed under the run, or a
            # validation file broke): the steps done so far are kept before stopping. The
            # data position saved is that of the last batch handed out, so a resume after
            # the file is fixed continues exactly.
            bad_data = str(e)
        stop = stop or self.flush(pending)
        # A signal that arrives once every step is done (during the last evaluation's
        # save, say) ends nothing early: the run finished, and says so.
        interrupted = self._interrupted() if s.step < spec.max_steps else None
        # Every exit path below saves first: a stop never costs the steps since the
        # last checkpoint. The signal guard is still installed.
        self.save()
        if bad_data is not None:
            return self._finish(EXIT_BAD_DATA, f"stopped at step {s.step} on bad data: "
                                f"{bad_data} (step {s.step} is checkpointed; fix the record "
                                "and resume with --auto-resume)")
        if interrupted:
            return self._finish(EXIT_INTERRUPTED,
                                f"interrupted by {interrupted} at step {s.step}; "
                                "resume with the same command and --auto-resume")
        if stop is not None:
            return self._finish(stop.exit_code, f"early stop ({stop.rule}): {stop.reason}")
        return self._finish(EXIT_OK, f"finished {s.step} steps")

    def _finish(self, code: int, reason: str) -> RunResult:
        self.reporters.on_stop(reason, code)
        return RunResult(code, reason, self.state.step, self.stopper.best_val_loss,
                         self.state.first_val_loss, self.state.last_val_loss)
