"""system/memory.py (the resident set against the kernel's own count), the GPU-watchdog
line, and the keep-awake's exact arguments."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mlx_tune.system import keepawake
from mlx_tune.system.gpu_watchdog import WATCHDOG_ENV, watchdog_status
from mlx_tune.system.memory import peak_resident_bytes, reset_peak_resident, resident_bytes

MB = 2**20


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
