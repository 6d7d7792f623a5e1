"""How a supervised training process ended: finished, a decision, or a crash.

A decision is an exit the run chose (an early stop, bad data, bad settings, a directory
in use, an interruption): restarting would make the same choice again. Everything else
non-zero is a crash: a signal (SIGKILL from the OOM killer included), a native abort, an
exit code that says something broke. A crash "looks like memory" when the kernel counted
an OOM kill while the child ran, when the child's own log shows an allocation failure
(Metal, MLX's allocator, CUDA), or when it exited with EXIT_OVER_MEMORY_BUDGET.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlx_tune.exit_codes import (EXIT_BAD_DATA, EXIT_DIR_IN_USE, EXIT_GRAD_SPIKE,
                                 EXIT_INTERRUPTED, EXIT_MEMORY_GROWTH, EXIT_NONFINITE,
                                 EXIT_NOT_TRAINING, EXIT_OK, EXIT_OVER_MEMORY_BUDGET,
                                 EXIT_PLATEAU, EXIT_USAGE, EXIT_VAL_PLATEAU)
from mlx_tune.reporting.text import read_metrics

# Exits the run decided on: the supervisor passes them on and never restarts.
DECISIONS = frozenset({EXIT_USAGE, EXIT_PLATEAU, EXIT_VAL_PLATEAU, EXIT_GRAD_SPIKE,
                       EXIT_NONFINITE, EXIT_DIR_IN_USE, EXIT_BAD_DATA, EXIT_MEMORY_GROWTH,
                       EXIT_NOT_TRAINING, EXIT_INTERRUPTED})

# What an allocation failure prints: Metal's command-buffer and resource-limit errors,
# MLX's allocators, the C++ runtime, CUDA and torch.
MEMORY_SIGNS = re.compile(
    r"Insufficient Memory|kIOGPUCommandBufferCallbackErrorOutOfMemory|Resource limit"
    r"|\[(?:metal::)?malloc\] Unable to allocate|std::bad_alloc|CUDA out of memory"
    r"|OutOfMemoryError|Cannot allocate memory|out of memory", re.IGNORECASE)


@dataclass(frozen=True)
class Ending:
    """How one child process ended, as the supervisor judges it."""

    kind: Literal["finished", "decision", "crash"]
    code: int  # as a shell reports it: the exit code, or 128 + N for signal N
    cause: str  # "killed by SIGKILL", "aborted (SIGABRT)", "exit 1"
    memory: bool  # the crash looks like memory
    evidence: str = ""  # the log line behind ``memory``, or the child's last error line


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def judge(returncode: int, log_tail: str, oom_killed: bool = False) -> Ending:
    """``returncode`` as subprocess reports it (negative: killed by that signal)."""
    if returncode == EXIT_OK:
        return Ending("finished", EXIT_OK, "finished", False)
    sign = memory_evidence(log_tail)
    if returncode < 0:
        number = -returncode
        name = signal_name(number)
        cause = ("aborted (SIGABRT)" if number == signal.SIGABRT
                 else f"killed by {name}")
        if oom_killed and number == signal.SIGKILL:
            return Ending("crash", 128 + number, cause + " (the kernel's OOM killer)", True,
                          "the kernel counted an out-of-memory kill while the run was running")
        return Ending("crash", 128 + number, cause, bool(sign), sign or last_error(log_tail))
    if returncode == EXIT_OVER_MEMORY_BUDGET:
        return Ending("crash", returncode, f"exit {returncode} (the first step is over the "
                      "memory budget)", True, sign or last_error(log_tail))
    if returncode in DECISIONS:
        return Ending("decision", returncode, f"exit {returncode}", False, last_error(log_tail))
    return Ending("crash", returncode, f"exit {returncode}", bool(sign),
                  sign or last_error(log_tail))


def memory_evidence(log_tail: str) -> str:
    """The last log line that shows an allocation failure, or ''."""
    for line in reversed(log_tail.splitlines()):
        if MEMORY_SIGNS.search(line):
            return line.strip()[:300]
    return ""


def last_error(log_tail: str) -> str:
    """The child's own one-line error if it printed one, else its last line of output."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("mlx-tune: error:"):
            return line[:300]
    return lines[-1][:300] if lines else ""


def oom_kill_count() -> int | None:
    """The kernel's count of out-of-memory kills: this cgroup's (cgroup v2), else the
    machine's (/proc/vmstat); None where neither exists (macOS). Compared before and
    after a child runs: a SIGKILL with the count risen is taken for the OOM killer."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                events = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events"
                for row in events.read_text().splitlines():
                    key, _, value = row.partition(" ")
                    if key == "oom_kill":
                        return int(value)
    except (OSError, ValueError):
        pass
    try:
        for row in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = row.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Progress:
    """What metrics.jsonl says about the run so far."""

    starts: int  # start records: one per process that got as far as training
    step: int | None  # the furthest step reported or checkpointed (None: none yet)
    accumulation: int | None  # micro-batches per step of the newest start


def read_progress(output_dir: Path) -> Progress:
    path = Path(output_dir) / "metrics.jsonl"
    try:
        records, _ = read_metrics(path)
    except OSError:
        return Progress(0, None, None)
    starts = [r for r in records if r.get("type") == "start"]
    steps = [r["step"] for r in records if r.get("type") in ("train", "eval", "checkpoint")
             and isinstance(r.get("step"), int)]
    info = starts[-1].get("info") if starts else None
    accumulation = info.get("accumulation") if isinstance(info, dict) else None
    return Progress(len(starts), max(steps) if steps else None,
                    accumulation if isinstance(accumulation, int) else None)
