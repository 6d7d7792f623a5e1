"""Report fixtures built from what the product emits, shared by the reporting tests."""

from __future__ import annotations

from mlx_tune.config.schema import EarlyStoppingSpec
from mlx_tune.training.monitors import EarlyStopping


def counters(losses: list[float]) -> dict[str, int]:
    """The early-stopping counters as a run reports them (``EarlyStopping.counters()``),
    after feeding ``losses`` (NaN = a skipped step) to a real EarlyStopping that checks
    for a plateau every 2 steps."""
    es = EarlyStopping(EarlyStoppingSpec(warmup=0, check_every=2, patience=5))
    for step, loss in enumerate(losses, start=1):
        es.observe_step(step, loss, 0.5)
    return es.counters()
