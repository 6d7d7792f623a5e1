"""backends/mlx/memory.py and the doctor's memory lines: MLX's setters through a recording
stand-in (the macOS path with a Metal-like device info, the Linux no-op without one), the
real cache bound on this machine, and what `doctor` prints on macOS and on Linux."""

from __future__ import annotations

import sys

import pytest

from mlx_tune.backends.base import MemoryLimits
from mlx_tune.backends.mlx.memory import WORKING_SET, memory_limits
from mlx_tune.system.gpu_watchdog import WATCHDOG_ENV

MB = 2**20


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
