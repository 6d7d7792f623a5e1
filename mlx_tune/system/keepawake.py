"""Keep a Mac from idle-sleeping for the length of a run (``caffeinate -i -w PID``).

An overnight fine-tune on a laptop otherwise stops when macOS idle-sleeps. ``-i``
prevents idle sleep only (the display may still sleep; closing the lid still sleeps),
``-w PID`` makes caffeinate exit by itself when the training process exits, so even a
``kill -9`` of the run leaves nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Callable


def keep_awake(pid: int, allow_sleep: bool, *,
               log: Callable[[str], None] | None = None) -> subprocess.Popen | None:
    """Start ``caffeinate -i -w pid`` on macOS unless ``allow_sleep``; never raises.

    Returns the process, or None when nothing was started; the reason then goes to
    ``log`` (if given) so the caller can report it, e.g. ``log=reporters.on_message``.
    """

    def skip(reason: str) -> None:
        if log is not None:
            log(reason)

    if allow_sleep:
        skip("keep-awake disabled (allow_sleep): the machine may sleep during the run")
        return None
    if sys.platform != "darwin":
        skip(f"keep-awake not needed on {sys.platform}")
        return None
    exe = shutil.which("caffeinate")
    if exe is None:
        skip("caffeinate not found on PATH: the Mac may idle-sleep during the run")
        return None
    try:
        return subprocess.Popen(
            [exe, "-i", "-w", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Own session: a Ctrl-C meant for the run must not kill caffeinate while the
            # run is still writing its final checkpoint; -w ends it when the run ends.
            start_new_session=True,
        )
    except OSError as exc:
        skip(f"could not start caffeinate ({exc}): the Mac may idle-sleep during the run")
        return None


def release(proc: subprocess.Popen | None, timeout: float = 2.0) -> None:
    """Stop caffeinate early (it also exits by itself when the watched process exits)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        try:
            proc.kill()
        except OSError:
            pass
