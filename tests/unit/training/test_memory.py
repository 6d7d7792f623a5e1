"""training/memory.py: the memory-growth rule on crafted readings, the cache bound from
the budget, and which figure the rule watches."""

from __future__ import annotations

from mlx_tune.backends.base import MemoryLimits, MemoryReading
from mlx_tune.config.schema import MemorySpec
from mlx_tune.training.memory import GB, MemoryGrowth, limits_for

MB = 2**20


def test_growth_rule_baseline_after_warmup_then_warns_then_stops_after_patience():
    rule = MemoryGrowth(MemorySpec(growth_warmup=20, growth_warning=0.25, growth_stop=1.0,
                                   growth_min_gb=1.0, growth_patience=3))
    assert rule.observe(10, 9 * 2**30) is None and rule.baseline is None  # warmup: no baseline
    assert rule.delta == 0 and not rule.leak_warning
    assert rule.observe(20, 4 * 2**30) is None and rule.baseline == 4 * 2**30
    rule.observe(30, 5 * 2**30)  # +25% exactly: not past the warning
    assert not rule.leak_warning and rule.delta == 2**30
    rule.observe(40, 5 * 2**30 + 1)
    assert rule.leak_warning
    # Past +100% (4 GiB) three reports in a row; a dip back under it restarts the count.
    assert rule.observe(50, 8 * 2**30 + 1) is None
    assert rule.observe(60, 8 * 2**30 + 2) is None
    assert rule.observe(70, 7 * 2**30) is None and rule.over == 0
    assert rule.observe(80, 9 * 2**30) is None
    assert rule.observe(90, 9 * 2**30) is None
    stop = rule.observe(100, 10 * 2**30)
    assert stop is not None and stop.rule == "memory_growth" and stop.step == 100
    assert stop.exit_code == 12
    assert "4,096 MB at step 20 to 10,240 MB at step 100 (+150%" in stop.reason


def test_growth_rule_ignores_growth_under_the_floor_and_can_be_switched_off():
    small = MemoryGrowth(MemorySpec(growth_warmup=0, growth_min_gb=1.0, growth_patience=1))
    small.observe(0, 100 * MB)
    assert small.observe(10, 900 * MB) is None and not small.leak_warning  # +800% but < 1 GB
    off = MemoryGrowth(MemorySpec(growth_warmup=0, growth_stop=None, growth_min_gb=0,
                                  growth_patience=1))
    off.observe(0, 100 * MB)
    assert off.observe(10, 10_000 * MB) is None and off.leak_warning  # warns, never stops


def test_reading_footprint_is_the_larger_of_resident_and_active_plus_cache():
    assert MemoryReading(100, 200, 50, 120).footprint == 150
    assert MemoryReading(100, 200, 50, 400).footprint == 400
    assert MemoryReading(100, 200, 50, None).footprint == 150


def test_cache_limit_defaults_to_a_quarter_of_the_budget_and_follows_the_spec():
    assert limits_for(MemorySpec(), 40 * GB) == MemoryLimits(cache=int(10 * GB),
                                                             limit_fraction=0.85)
    assert limits_for(MemorySpec(cache_limit_gb=2.5, limit_fraction=0.7), 40 * GB) == \
        MemoryLimits(cache=int(2.5 * GB), limit_fraction=0.7)
    assert limits_for(MemorySpec(cache_limit_gb=0), 40 * GB).cache == 0
