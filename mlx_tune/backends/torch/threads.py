"""How many CPU threads a torch run uses by default (``torch_threads: 0``)."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        allowed = os.cpu_count() or 1
    try:
        cores, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                cores.add((phys, value.strip()))
        return max(1, min(len(cores) or allowed, allowed))
    except OSError:
        return max(1, allowed)


def default_threads() -> int:
    """Half the physical cores, at least 1: a deliberate trade.

    Oversubscribed CPUs collapse: every op of a step is an OpenMP region that waits for
    its slowest thread, and a thread that loses its core to another process stalls them
    all. On a loaded 2-core machine our step ran 6.9x *slower* with 2 threads than with
    1 (157 ms vs 1083 ms; elsewhere 2 threads measured 0.36x of idle speed while 1
    thread held). Leaving half the cores idle costs at most ~2x on an idle machine, and
    leaves room for the data thread and the tokenizer. CPU runs are for development,
    tests and parity (GPU runs barely use CPU threads); ``torch_threads`` overrides."""
    return max(1, physical_cores() // 2)
