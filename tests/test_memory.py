"""Memory over a night, no model loaded: the growth rule, the limits a run sets (MLX's
setters through a recording stand-in: the macOS path with a Metal-like device info, the
Linux no-op without one), the resident-set reading against the OS, the GPU-watchdog
line, and the keep-awake's exact arguments."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mlx_tune.backends.base import MemoryLimits, MemoryReading
from mlx_tune.backends.mlx.memory import WORKING_SET, memory_limits
from mlx_tune.config.schema import MemorySpec
from mlx_tune.system import keepawake
from mlx_tune.system.gpu_watchdog import WATCHDOG_ENV, watchdog_status
from mlx_tune.system.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from mlx_tune.training.memory import GB, MemoryGrowth, limits_for

MB = 2**20


# ------------------------------------------------------------------ the growth rule
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


# ------------------------------------------------------------------ the limits
def test_cache_limit_defaults_to_a_quarter_of_the_budget_and_follows_the_spec():
    assert limits_for(MemorySpec(), 40 * GB) == MemoryLimits(cache=int(10 * GB),
                                                             limit_fraction=0.85)
    assert limits_for(MemorySpec(cache_limit_gb=2.5, limit_fraction=0.7), 40 * GB) == \
        MemoryLimits(cache=int(2.5 * GB), limit_fraction=0.7)
    assert limits_for(MemorySpec(cache_limit_gb=0), 40 * GB).cache == 0


class RecordingMx:
    """mlx.core's four setters: each returns the value it replaces, as MLX's do."""

    def __init__(self, wired_max: int | None = None) -> None:
        self.values = {"wired": 0, "memory": 111, "cache": 222}
        self.calls: list[tuple[str, int]] = []
        self.wired_max = wired_max

    def _set(self, name: str, value: int) -> int:
        self.calls.append((name, value))
        old, self.values[name] = self.values[name], value
        return old

    def set_wired_limit(self, value: int) -> int:
        if self.wired_max is not None and value > self.wired_max:
            raise ValueError("[metal::set_wired_limit] Setting a wired limit larger than "
                             "the maximum working set size is not allowed.")
        return self._set("wired", value)

    def set_memory_limit(self, value: int) -> int:
        return self._set("memory", value)

    def set_cache_limit(self, value: int) -> int:
        return self._set("cache", value)


def test_on_macos_the_wired_limit_is_the_working_set_and_the_cap_its_fraction_restored_after():
    mx = RecordingMx()
    working = 48 * 2**30
    with memory_limits(mx, MemoryLimits(cache=3 * 2**30, limit_fraction=0.85),
                       {WORKING_SET: working, "memory_size": 64 * 2**30}) as applied:
        assert mx.values == {"wired": working, "memory": int(0.85 * working),
                             "cache": 3 * 2**30}
        assert (applied.wired, applied.cap, applied.cache) == (working, int(0.85 * working),
                                                               3 * 2**30)
        assert applied.info()["wired_limit_mb"] == working / MB
        assert any("wired limit 51.5 GB" in n for n in applied.notes)
    assert mx.values == {"wired": 0, "memory": 111, "cache": 222}  # put back, in reverse
    assert [name for name, _ in mx.calls] == ["wired", "memory", "cache", "cache", "memory",
                                               "wired"]


def test_a_wired_limit_over_the_systems_is_reported_not_fatal():
    mx = RecordingMx(wired_max=2**30)
    with memory_limits(mx, MemoryLimits(0, 0.85), {WORKING_SET: 48 * 2**30}) as applied:
        assert applied.wired is None and applied.cap == int(0.85 * 48 * 2**30)
        assert any("iogpu.wired_limit_mb" in n for n in applied.notes)
        assert mx.values["cache"] == 0
    assert mx.values == {"wired": 0, "memory": 111, "cache": 222}


def test_without_a_metal_working_set_only_the_cache_is_bounded():
    # Linux (CPU or CUDA): the device info has no working set, so the wired limit and
    # the cap are never called: a no-op, as on Linux set_wired_limit is anyway.
    mx = RecordingMx()
    with memory_limits(mx, MemoryLimits(2**30, 0.85),
                       {"architecture": "x86_64", "device_name": "cpu"}) as applied:
        assert mx.calls == [("cache", 2**30)]
        assert applied.wired is None and applied.cap is None
        assert any("not applicable" in n for n in applied.notes)
    assert mx.values == {"wired": 0, "memory": 111, "cache": 222}


def test_real_mlx_cache_limit_is_set_and_restored():
    mx = pytest.importorskip("mlx.core")
    from mlx_tune.backends.mlx.memory import device_info
    before = mx.set_cache_limit(12345)
    mx.set_cache_limit(before)
    info = device_info(mx)
    with memory_limits(mx, MemoryLimits(4 * MB, 0.85), info):
        a = mx.random.normal((1000, 1000))
        mx.eval(a @ a)
        del a
        assert mx.get_cache_memory() <= 4 * MB
        if WORKING_SET not in info:  # this machine: no Metal, wired limit untouched
            assert mx.set_wired_limit(0) == 0
    assert mx.set_cache_limit(before) == before


# ------------------------------------------------------------------ the OS figures
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_set_follows_memory_written_and_the_peak_resets():
    before = resident_bytes()
    block = np.ones(64 * MB, np.uint8)  # written: every page resident
    grown = resident_bytes()
    assert grown - before >= 60 * MB
    status = open("/proc/self/status").read()  # the kernel's own count, independently
    vmrss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    assert abs(vmrss * 1024 - grown) < 8 * MB
    del block
    # The kernel updates its high-water mark lazily (a few pages behind statm).
    assert peak_resident_bytes() >= grown - MB
    if reset_peak_resident():  # the 64 MB went back to the OS: the new peak is below
        assert peak_resident_bytes() < grown - 32 * MB


# ------------------------------------------------------------------ macOS
def test_watchdog_line_says_whether_the_variable_is_set_and_what_it_does():
    on, line = watchdog_status({WATCHDOG_ENV: "1"})
    assert on and "relaxed" in line and "#3267" in line
    off, line = watchdog_status({})
    assert not off and f"export {WATCHDOG_ENV}=1" in line and "reboot" in line


class FakePopen:
    calls: list = []

    def __init__(self, args, **kw):
        FakePopen.calls.append(args)


def test_keep_awake_never_holds_the_display_awake(monkeypatch):
    # caffeinate -i: idle sleep only. -d (display) and -u (user active, which wakes the
    # display) would keep the display awake, which trips the GPU watchdog.
    FakePopen.calls = []
    monkeypatch.setattr(keepawake.sys, "platform", "darwin")
    monkeypatch.setattr(keepawake.shutil, "which", lambda name: "/usr/bin/caffeinate")
    monkeypatch.setattr(keepawake.subprocess, "Popen", FakePopen)
    keepawake.keep_awake(os.getpid(), allow_sleep=False)
    (args,) = FakePopen.calls
    assert args == ["/usr/bin/caffeinate", "-i", "-w", str(os.getpid())]
    assert not {"-d", "-u", "-s", "-di", "-id"} & set(args)


# ------------------------------------------------------------------ doctor
def test_doctor_prints_the_limits_a_run_sets_on_macos_and_the_watchdog():
    from mlx_tune.commands.doctor import check_memory_limits
    working = 48 * 2**30
    checks = {c.name: c for c in check_memory_limits(
        {WORKING_SET: working}, platform="darwin", env={})}
    limits = checks["memory limits"].value
    assert "wires 48.0 GiB" in limits and "caps MLX at 40.8 GiB" in limits  # 0.85 x 48
    assert "restored" in limits
    assert checks["gpu watchdog"].status == "WARN" and WATCHDOG_ENV in checks["gpu watchdog"].hint
    ok = {c.name: c for c in check_memory_limits({WORKING_SET: working}, platform="darwin",
                                                 env={WATCHDOG_ENV: "1"})}
    assert ok["gpu watchdog"].status == "OK"


def test_doctor_on_linux_says_the_wired_limit_does_not_apply_and_shows_resident_memory():
    from mlx_tune.commands.doctor import check_memory_limits
    checks = {c.name: c for c in check_memory_limits({"architecture": "x86_64"},
                                                     platform="linux", env={})}
    assert "not applicable" in checks["memory limits"].value
    assert "gpu watchdog" not in checks
    if sys.platform.startswith("linux"):
        assert "resident" in checks["memory now"].value
