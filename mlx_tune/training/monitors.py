"""Training-health monitors: early stopping, moving averages, ETA.

Pure Python and backend-agnostic: callers feed plain floats and get values or
decisions back. What a checkpoint keeps (early stopping with its moving average)
has ``state_dict()`` (JSON-serialisable: only finite floats, ints, None, lists) and
``load_state_dict(d)``, so a resumed run makes exactly the decisions an uninterrupted
run would have made. The throughput meter starts afresh after a resume: its rates are
about this process (as memory growth is, training/memory.py).

Each stop rule ends the run with its own exit code (``STOP_RULE_EXIT_CODES`` in
mlx_tune/exit_codes.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict

from mlx_tune.config.schema import EarlyStoppingSpec
from mlx_tune.exit_codes import StopDecision


# Relative slack on min_delta comparisons so decimal thresholds behave as
# written: 2.45 -> 2.44 is an improvement of "0.01" despite binary floats.
_TOL = 1e-12


def _improved(best: float | None, new: float, min_delta: float) -> bool:
    """True when ``new`` is strictly below ``best`` by at least ``min_delta``."""
    if best is None:
        return True
    return new < best and best - new >= min_delta - _TOL * max(1.0, abs(best))


def _not_improved_by(min_delta: float) -> str:
    return f"has not improved by {min_delta:g}" if min_delta > 0 else "has not improved"


class _Stateful:
    """``state_dict``/``load_state_dict`` over the plain attributes in ``_STATE``."""

    _STATE: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, d: dict) -> None:
        for k in self._STATE:
            setattr(self, k, d[k])


class MovingAverage:
    """Mean of the last ``window`` finite values.

    ``value``: the mean (None before the first value). ``trend``: mean of the
    newer half of the window minus the mean of the older half (halves of
    ``len // 2`` values; the middle one is left out when ``len`` is odd), in
    the units of the values, negative when they decrease; None below 2 values.
    ``len(ma)``: values in the window.
    Non-finite values are ignored (``add`` returns False): one NaN must not
    poison the mean for a whole window.
    """

    def __init__(self, window: int = 50) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._values: deque[float] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: float) -> bool:
        if not math.isfinite(value := float(value)):
            return False
        self._values.append(value)
        return True

    @property
    def value(self) -> float | None:
        return math.fsum(self._values) / len(self._values) if self._values else None

    @property
    def trend(self) -> float | None:
        half, vals = len(self._values) // 2, list(self._values)
        return (math.fsum(vals[-half:]) - math.fsum(vals[:half])) / half if half else None

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self._values)}

    def load_state_dict(self, d: dict) -> None:
        # The constructor's window wins, so a resumed run may change it.
        self._values = deque((float(v) for v in d["values"]), maxlen=self.window)


class EarlyStopping(_Stateful):
    """Applies the spec's ``early_stopping`` section (``EarlyStoppingSpec``: its fields,
    defaults and ranges) to a stream of per-step values; ``enabled=False`` tracks
    everything and stops nothing. ``monitor`` picks the plateau rule: ``train_loss``
    (moving average checked every ``check_every`` steps), ``val_loss`` (each
    ``observe_eval``) or ``none``; the safety rules (non-finite, gradient spike) are
    always on.

    Feed every step, in increasing order, through ``observe_step`` (batches
    fed after the fact are fine: decisions carry the step they refer to).
    Conventions:

    * A step is non-finite when ``finite`` is False or loss/grad_norm is NaN
      or inf. It counts in ``skipped_steps`` and ``consecutive_nonfinite``,
      never enters the moving average, and neither increments nor resets the
      gradient-spike counter (it is no evidence of health; the non-finite
      rule handles it), so a spike range may span skipped steps.
    * Warmup: no rule fires at ``step < warmup``. The safety counters still
      run, so a streak of NaNs or spikes that began during warmup stops the
      run at the first step ``>= warmup`` at which the streak is still long
      enough. Plateau rules only count after warmup: the train-loss check
      happens at steps ``>= warmup`` with ``step % check_every == 0``; evals
      before warmup set the references but a non-improvement is not counted.
    * Improvement means strictly lower by at least ``min_delta`` than the
      reference, which only moves on such an improvement (so slow creep
      accumulates). ``best_val_loss``/``best_step`` are instead the plain
      minimum, for picking the best checkpoint; ``is_new_best`` flags it.
    * Once a rule has fired the decision is sticky: later calls return it
      again without updating counters (``observe_eval`` still tracks the best).
    """

    def __init__(self, config: EarlyStoppingSpec | None = None) -> None:
        self.config = config or EarlyStoppingSpec()
        self.moving_average = MovingAverage(self.config.loss_window)  # finite losses only
        self.skipped_steps = self.consecutive_nonfinite = self.spike_counter = 0
        self.plateau_counter = self.val_counter = 0
        # Steps (int) and losses (float) that stay None until first seen.
        self.last_step = self.spike_start = self.best_loss_step = self.val_ref_step = self.best_step = None
        self.best_loss_avg: float | None = None
        self.val_ref: float | None = None  # reference for val_patience (moves by val_min_delta)
        self.best_val_loss: float | None = None
        self.is_new_best = False
        self.decision: StopDecision | None = None

    def counters(self) -> dict[str, int]:
        """The dashboard counters, by attribute name."""
        names = ("plateau_counter", "val_counter", "spike_counter", "consecutive_nonfinite", "skipped_steps")
        return {k: getattr(self, k) for k in names}

    def _fire(self, rule: str, reason: str, step: int) -> StopDecision | None:
        if self.config.enabled:
            self.decision = StopDecision(rule, reason, step)
        return self.decision

    def observe_step(
        self, step: int, loss: float, grad_norm: float | None, finite: bool = True
    ) -> StopDecision | None:
        """Record one step (``grad_norm`` None = not measured: no spike check)."""
        if self.decision is not None:
            return self.decision
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_step}")
        self.last_step = step
        cfg, active = self.config, step >= self.config.warmup
        loss, grad_norm = float(loss), 0.0 if grad_norm is None else float(grad_norm)
        bad = [f"{k}={v:g}" for k, v in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(v)]
        if bad or not finite:
            self.skipped_steps += 1
            self.consecutive_nonfinite = n = self.consecutive_nonfinite + 1
            if active and cfg.max_nonfinite_steps <= n:
                what = ", ".join(bad) or f"loss={loss:.4f}, flagged non-finite"
                return self._fire("nonfinite", f"{n} consecutive non-finite steps ({what}) at step {step}", step)
        else:
            self.consecutive_nonfinite = 0
            self.moving_average.add(loss)
            thr = cfg.grad_spike_threshold
            if grad_norm > thr:
                self.spike_counter += 1
                if self.spike_counter == 1:
                    self.spike_start = step
                if active and self.spike_counter >= cfg.grad_spike_patience:
                    reason = (f"gradient norm {grad_norm:g} > {thr:g} for {self.spike_counter} consecutive steps "
                              f"(steps {self.spike_start}-{step})")
                    return self._fire("grad_spike", reason, step)
            else:
                self.spike_counter, self.spike_start = 0, None
        if cfg.monitor == "train_loss" and active and step % cfg.check_every == 0:
            return self._check_plateau(step)
        return None

    def _check_plateau(self, step: int) -> StopDecision | None:
        cfg, avg = self.config, self.moving_average.value
        if avg is None:  # nothing finite seen yet; the non-finite rule owns this
            return None
        if _improved(self.best_loss_avg, avg, cfg.min_delta):
            self.best_loss_avg, self.best_loss_step, self.plateau_counter = avg, step, 0
            return None
        self.plateau_counter += 1
        if self.plateau_counter >= cfg.patience:
            best = f"best {self.best_loss_avg:.4f} at step {self.best_loss_step}"
            reason = (f"training loss plateaued: moving average {avg:.4f} {_not_improved_by(cfg.min_delta)} "
                      f"over {self.plateau_counter} checks ({best})")
            return self._fire("plateau", reason, step)
        return None

    def observe_eval(self, step: int, val_loss: float) -> StopDecision | None:
        """Record an evaluation: best-checkpoint tracking always, the val rule if monitored."""
        finite = math.isfinite(val_loss := float(val_loss))
        self.is_new_best = finite and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if self.is_new_best:
            self.best_val_loss, self.best_step = val_loss, step
        cfg = self.config
        if self.decision is not None or cfg.monitor != "val_loss":
            return self.decision
        if finite and _improved(self.val_ref, val_loss, cfg.val_min_delta):
            self.val_ref, self.val_ref_step, self.val_counter = val_loss, step, 0
            return None
        if step < cfg.warmup:
            return None
        self.val_counter += 1
        if self.val_counter >= cfg.val_patience:
            ref = "none" if self.val_ref is None else f"{self.val_ref:.4f} at step {self.val_ref_step}"
            reason = (f"validation loss plateaued: {val_loss:.4f} {_not_improved_by(cfg.val_min_delta)} "
                      f"over {self.val_counter} evaluations (best {ref})")
            return self._fire("val_plateau", reason, step)
        return None

    _STATE = ("last_step", "skipped_steps", "consecutive_nonfinite", "spike_counter", "spike_start",
              "plateau_counter", "best_loss_avg", "best_loss_step", "val_counter", "val_ref", "val_ref_step",
              "best_val_loss", "best_step", "is_new_best")

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["moving_average"] = self.moving_average.state_dict()
        d["decision"] = asdict(self.decision) if self.decision else None
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.moving_average.load_state_dict(d["moving_average"])
        self.decision = StopDecision(**d["decision"]) if d["decision"] else None


class ThroughputMeter:
    """Steps/s and tokens/s over the last ``window`` steps, and the ETA.

    Feed ``update(step, wall_time, tokens)`` after each step: ``wall_time`` is
    when the step finished (any monotonic clock) and ``tokens`` is what that
    step processed. Rates use the last ``window + 1`` records, i.e. ``window``
    intervals; a step or clock going backwards starts a fresh window.
    """

    def __init__(self, window: int = 50) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._records: deque[tuple[int, float, int]] = deque(maxlen=self.window + 1)

    def update(self, step: int, wall_time: float, tokens: int = 0) -> None:
        if self._records and (step <= self._records[-1][0] or wall_time < self._records[-1][1]):
            self._records.clear()
        self._records.append((int(step), float(wall_time), int(tokens)))

    def _elapsed(self) -> float | None:
        dt = self._records[-1][1] - self._records[0][1] if len(self._records) > 1 else 0.0
        return dt if dt > 0 else None

    @property
    def steps_per_second(self) -> float | None:
        dt = self._elapsed()
        return None if dt is None else (self._records[-1][0] - self._records[0][0]) / dt

    @property
    def tokens_per_second(self) -> float | None:
        # The first record's tokens were processed before its timestamp, i.e.
        # outside the measured interval.
        dt = self._elapsed()
        return None if dt is None else sum(r[2] for r in list(self._records)[1:]) / dt

    def eta_seconds(self, current_step: int, total_steps: int) -> float | None:
        """Seconds until ``total_steps`` at the recent rate; None until measurable."""
        if current_step >= total_steps:
            return 0.0
        rate = self.steps_per_second
        return None if not rate else (total_steps - current_step) / rate
