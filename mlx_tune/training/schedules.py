"""Learning-rate schedules as pure functions of the optimizer step.

Conventions (shared by every schedule):

* ``step`` is the number of optimizer updates already done, so ``lr(0)`` is
  the learning rate of the *first* update and ``lr(total_steps - 1)`` the
  last one. ``lr`` depends on ``step`` only (no hidden state), so a run
  resumed from a checkpoint at step ``k`` simply continues with ``lr(k)``.
* Warmup (all schedules except ``onecycle``): for ``step < warmup_steps``::

      lr(step) = learning_rate * (step + 1) / warmup_steps

  The first update therefore already uses ``learning_rate / warmup_steps``
  (an update at lr 0 would be wasted compute) and the last warmup update,
  ``step = warmup_steps - 1``, runs at the full ``learning_rate``. This is
  exactly torch ``LinearLR(start_factor=1/W, end_factor=1, total_iters=W-1)``.
  The decay phase then starts from ``learning_rate`` at ``step = warmup_steps``
  (so the peak is used for two consecutive updates; deliberate, it keeps the
  decay phase identical to torch's schedulers shifted by ``warmup_steps``).
* ``warmup_ratio`` (a fraction of ``total_steps``) is converted with Python's
  ``round(warmup_ratio * total_steps)``; giving it together with a non-zero
  ``warmup_steps`` is a ``ValueError``.
* After ``total_steps`` the lr holds its end value instead of raising:
  ``cosine``/``linear``/``constant`` hold ``lr(total_steps)`` (== ``min_lr``
  for the decaying ones, matching torch where ``eta_min`` is reached at
  ``T_max``); ``onecycle`` and ``cosine_restarts`` hold
  ``lr(total_steps - 1)``, the last scheduled update (OneCycleLR reaches its
  minimum there, and a restart schedule has no natural end point).

Schedules (``s = step - warmup_steps``, ``D = total_steps - warmup_steps``):

* ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * s / D)) / 2``.
* ``cosine_restarts`` (SGDR, torch ``CosineAnnealingWarmRestarts``): cycles of
  ``t_0, t_0*t_mult, t_0*t_mult**2, ...`` steps each going from
  ``learning_rate`` down towards ``min_lr`` (``eta_min``); ``t_0=None`` means a
  single cycle spanning the whole decay phase.
* ``onecycle``: torch ``OneCycleLR`` (``three_phase=False``) bit for bit:
  ``initial_lr = max_lr / div_factor``, warm up to ``max_lr`` until step
  ``pct_start * total_steps - 1``, then anneal to
  ``initial_lr / final_div_factor`` at step ``total_steps - 1``.
  ``max_lr`` defaults to ``learning_rate``; warmup and ``min_lr`` are ignored.
* ``linear``: ``min_lr + (lr - min_lr) * (1 - s / D)``.
* ``constant``: ``learning_rate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlx_tune.config.schema import Spec

SCHEDULES = ("cosine", "cosine_restarts", "onecycle", "linear", "constant")
ANNEAL_STRATEGIES = ("cos", "linear")


def resolve_warmup_steps(total_steps: int, warmup_steps: int = 0, warmup_ratio: float | None = None) -> int:
    """Return the warmup length in steps from either ``warmup_steps`` or ``warmup_ratio``."""
    if warmup_ratio is not None:
        if warmup_steps:
            raise ValueError(
                f"give either warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), not both"
            )
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return int(round(warmup_ratio * total_steps))
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return int(warmup_steps)


@dataclass(frozen=True)
class Schedule:
    """A resolved, immutable schedule; call it with a step to get the lr.

    Built by :func:`build_schedule` (which validates); a frozen dataclass
    rather than a closure so it can be logged (``repr``) and pickled.
    """

    name: str
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    t_0: int = 1
    t_mult: int = 1
    max_lr: float = 0.0
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.name == "onecycle":
            return self._onecycle(min(step, self.total_steps - 1))
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.learning_rate
        if self.name == "cosine_restarts":
            return self._restarts(min(step, self.total_steps - 1) - self.warmup_steps)
        decay = self.total_steps - self.warmup_steps
        if decay <= 0:  # warmup covers the whole run; past it we sit at the end value
            return self.min_lr
        progress = (min(step, self.total_steps) - self.warmup_steps) / decay
        if self.name == "cosine":
            return self.min_lr + (self.learning_rate - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
        # linear
        return self.min_lr + (self.learning_rate - self.min_lr) * (1.0 - progress)

    def _restarts(self, s: int) -> float:
        # Integer cycle bookkeeping (not torch's log-based closed form) so
        # long runs never hit float rounding at cycle boundaries; this equals
        # torch's step-by-step T_cur/T_i updates exactly.
        if s < 0:  # only reachable when total_steps <= warmup_steps
            return self.learning_rate
        t_i = self.t_0
        if self.t_mult == 1:
            t_cur = s % t_i
        else:
            t_cur = s
            while t_cur >= t_i:
                t_cur -= t_i
                t_i *= self.t_mult
        return self.min_lr + (self.learning_rate - self.min_lr) * (1 + math.cos(math.pi * t_cur / t_i)) / 2

    def _onecycle(self, step: int) -> float:
        # Mirrors torch.optim.lr_scheduler.OneCycleLR.get_lr (three_phase=False),
        # including its float phase boundaries, so values match to the last bit.
        initial_lr = self.max_lr / self.div_factor
        min_lr = initial_lr / self.final_div_factor
        phases = (
            (float(self.pct_start * self.total_steps) - 1, initial_lr, self.max_lr),
            (self.total_steps - 1, self.max_lr, min_lr),
        )
        start_step = 0.0
        for i, (end_step, start_lr, end_lr) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                span = end_step - start_step
                # torch divides by zero here (pct_start*total_steps == 1 or
                # pct_start == 1.0); a zero-length phase has reached its end.
                pct = (step - start_step) / span if span != 0 else 1.0
                if self.anneal_strategy == "cos":
                    return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (end_lr - start_lr) * pct + start_lr
            start_step = end_step
        raise AssertionError("unreachable")


def build_schedule(
    name: str,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float | None = None,
    min_lr: float = 0.0,
    t_0: int | None = None,
    t_mult: int = 1,
    max_lr: float | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """Validate the parameters and return a pure ``step -> lr`` callable.

    See the module docstring for the exact formulas and conventions.
    Raises ``ValueError`` on an unknown name or inconsistent parameters.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
    total_steps = int(total_steps)
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate}")
    warmup = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
    if warmup > total_steps:
        raise ValueError(f"warmup_steps ({warmup}) exceeds total_steps ({total_steps})")
    if not isinstance(min_lr, (int, float)):  # e.g. an unresolved None default from a config
        raise ValueError(f"min_lr must be a number, got {min_lr!r}")
    if name != "onecycle" and not 0.0 <= min_lr <= learning_rate:
        raise ValueError(f"min_lr must be in [0, learning_rate={learning_rate}], got {min_lr}")

    params: dict = {}
    if name == "cosine_restarts":
        t_0 = max(total_steps - warmup, 1) if t_0 is None else t_0
        if int(t_0) != t_0 or t_0 < 1:
            raise ValueError(f"t_0 must be a positive integer, got {t_0}")
        if int(t_mult) != t_mult or t_mult < 1:
            raise ValueError(f"t_mult must be an integer >= 1, got {t_mult}")
        params.update(t_0=int(t_0), t_mult=int(t_mult))
    if name == "onecycle":
        peak = learning_rate if max_lr is None else max_lr
        if not peak > 0:
            raise ValueError(f"max_lr must be positive, got {peak}")
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
        if anneal_strategy not in ANNEAL_STRATEGIES:
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        if not div_factor > 0 or not final_div_factor > 0:
            raise ValueError("div_factor and final_div_factor must be positive")
        # pct_start is onecycle's warmup, so warmup_steps/ratio are dropped.
        warmup = 0
        params.update(
            max_lr=float(peak),
            pct_start=float(pct_start),
            anneal_strategy=anneal_strategy,
            div_factor=float(div_factor),
            final_div_factor=float(final_div_factor),
        )
    return Schedule(
        name=name,
        learning_rate=float(learning_rate),
        total_steps=total_steps,
        warmup_steps=warmup,
        min_lr=float(min_lr),
        **params,
    )


def effective_lr_args(spec: Spec) -> dict[str, Any]:
    """Keyword arguments for build_schedule from a spec."""
    # A short test run (--max-steps 10) with the default warmup of 50 warms up throughout.
    warmup = 0 if spec.warmup_ratio is not None else min(spec.warmup_steps, spec.max_steps)
    return dict(learning_rate=spec.learning_rate, total_steps=spec.max_steps,
                warmup_steps=warmup,
                warmup_ratio=spec.warmup_ratio, min_lr=spec.min_lr,
                t_0=spec.cosine_restarts.t_0, t_mult=spec.cosine_restarts.t_mult,
                max_lr=spec.onecycle.max_lr, pct_start=spec.onecycle.pct_start,
                anneal_strategy=spec.onecycle.anneal_strategy)
