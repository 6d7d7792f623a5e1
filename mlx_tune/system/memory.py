"""This process's resident set as the operating system counts it, with no dependency.

The frameworks' own figures (MLX's active and cache memory, torch's allocated bytes) count
only what their allocators hold. A leak elsewhere (Python objects, a library's buffers)
and memory the allocator has not given back show only in the resident set: the figure
that ends a night in swap (ml-explore/mlx-lm #986: 51 GiB resident at a reported 7 GiB).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path


def resident_bytes() -> int | None:
    """Bytes of this process now in RAM: /proc/self/statm on Linux, ``ps`` on macOS;
    None where the OS does not say."""
    if sys.platform.startswith("linux"):
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    if sys.platform == "darwin":
        try:  # one short process per report interval: cheap next to a training step
            out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())],
                                 capture_output=True, text=True, timeout=5)
            return int(out.stdout.strip()) * 1024  # ps reports KiB
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return None


def peak_resident_bytes() -> int:
    """The most this process has had in RAM since it started, or since
    ``reset_peak_resident`` (Linux: VmHWM; elsewhere ru_maxrss, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


def reset_peak_resident() -> bool:
    """Start the peak over from the present resident set (Linux: ``5`` to
    /proc/self/clear_refs); False where the OS offers no way (the peak then counts
    from the start of the process, which overstates, never understates)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
