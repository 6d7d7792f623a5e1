"""Memory over a night: the bounds a run sets, and the rule that stops a leak.

Two jobs, both framework-neutral (the backends apply the bounds, see
``Backend.memory_limits``):

* ``limits_for``: the spec's ``memory:`` section and the memory budget -> the cache bound
  and the cap fraction. MLX's buffer cache otherwise grows up to the memory limit while
  ``peak_memory`` stays flat (ml-explore/mlx #3993, mlx-lm #986); a bound costs almost
  nothing, clearing the cache every step costs speed, so ``0`` (no cache) is only ever
  what the user asked for.
* ``MemoryGrowth``: the process's footprint (``MemoryReading.footprint``: resident set,
  or active + cache where that is larger) at each report. After ``growth_warmup`` steps
  the first reading is the baseline; growth past ``growth_warning`` of it warns, growth
  past ``growth_stop`` for ``growth_patience`` reports in a row stops the run (exit 12,
  checkpointed first), so a leak ends with a checkpoint instead of in swap. Growth under
  ``growth_min_gb`` does neither: small models have small, noisy baselines. The readings
  are about this process, so a resumed run takes a fresh baseline (nothing is
  checkpointed).
"""

from __future__ import annotations

from typing import Any

from mlx_tune.backends.base import MemoryLimits
from mlx_tune.training.monitors import StopDecision

GB = 1e9
MB = 2**20
CACHE_SHARE = 0.25  # default cache bound, as a share of the memory budget


def limits_for(memory: Any, budget: float) -> MemoryLimits:
    """``memory``: the spec's ``memory`` section; ``budget``: bytes (planner.budget_bytes).
    Peak (planned to fit the budget) plus a cache of a quarter of it stays under the
    memory the budget was taken from (75% of it: 0.75 + 0.25 x 0.75 < 1)."""
    cache = memory.cache_limit_gb * GB if memory.cache_limit_gb is not None \
        else CACHE_SHARE * budget
    return MemoryLimits(cache=int(cache), limit_fraction=float(memory.limit_fraction))


class MemoryGrowth:
    """The growth rule over report-boundary readings (see the module docstring)."""

    def __init__(self, memory: Any) -> None:
        self.warmup = int(memory.growth_warmup)
        self.warning_fraction = float(memory.growth_warning)
        self.stop_fraction = None if memory.growth_stop is None else float(memory.growth_stop)
        self.min_bytes = float(memory.growth_min_gb) * GB
        self.patience = int(memory.growth_patience)
        self.baseline: int | None = None
        self.baseline_step: int | None = None
        self.current: int | None = None
        self.over = 0  # reports in a row over the stop threshold

    @property
    def delta(self) -> int:
        """Bytes since the baseline (0 before there is one)."""
        return 0 if self.baseline is None or self.current is None else self.current - self.baseline

    def _past(self, fraction: float | None) -> bool:
        if fraction is None or self.baseline is None:
            return False
        return self.delta > max(fraction * self.baseline, self.min_bytes)

    @property
    def leak_warning(self) -> bool:
        return self._past(self.warning_fraction)

    def observe(self, step: int, footprint: int) -> StopDecision | None:
        """Record the footprint (bytes) at a report boundary; a stop decision when the
        rule fires."""
        self.current = int(footprint)
        if self.baseline is None:
            if step >= self.warmup:
                self.baseline, self.baseline_step = self.current, step
            return None
        self.over = self.over + 1 if self._past(self.stop_fraction) else 0
        if self.over < self.patience:
            return None
        reason = (f"resident memory grew from {self.baseline / MB:,.0f} MB at step "
                  f"{self.baseline_step} to {self.current / MB:,.0f} MB at step {step} "
                  f"(+{100 * self.delta / self.baseline:.0f}%, over the +"
                  f"{100 * self.stop_fraction:.0f}% limit for {self.over} reports in a row): "
                  "a leak would end the night in swap; memory.growth_stop sets the limit")
        return StopDecision("memory_growth", reason, step)
