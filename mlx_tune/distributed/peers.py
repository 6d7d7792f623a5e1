"""Dead and hung peers: one line on stderr and ``EXIT_PEER_LOST`` on every survivor.

MLX's ring backend and gloo raise when a socket closes (``peer_guard`` turns that into
the exit code); a peer that hangs without closing its sockets is caught by ``Watchdog``
after ``MLX_TUNE_DIST_TIMEOUT`` seconds without a finished step (default 300, 0 = off).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from mlx_tune.backends.base import TIMEOUT_ENV, Collectives, timeout_from_env
from mlx_tune.exit_codes import EXIT_PEER_LOST

RESUME_HINT = "resume every rank with the same command and --auto-resume"

# What the engines say when the other end of a collective is gone.
PEER_FAILURE_MARKERS = (
    "[ring]",  # MLX ring: "connection to a peer was lost"
    "connection closed by peer", "connection reset by peer", "broken pipe",  # gloo
    "socket closed", "nccl communicator was aborted", "ncclremoteerror",  # nccl
)


def is_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in PEER_FAILURE_MARKERS)


def _die(message: str) -> None:
    sys.stdout.flush()
    print(f"mlx-tune: error: {message}", file=sys.stderr, flush=True)


@contextmanager
def peer_guard(comm: Collectives) -> Iterator[None]:
    """Turn "the other end of a collective is gone" into one line and EXIT_PEER_LOST."""
    try:
        yield
    except Exception as e:
        if comm.world_size <= 1 or not is_peer_failure(e):
            raise
        _die(f"rank {comm.rank}/{comm.world_size}: lost contact with another rank "
             f"({str(e).strip()}); stopping without a final save (the last checkpoint is "
             f"intact): {RESUME_HINT}")
        raise SystemExit(EXIT_PEER_LOST) from None


class Watchdog:
    """Ends the process when no step finishes for ``timeout`` seconds.

    A collective waits forever for a peer that hangs without closing its sockets (a
    frozen machine, a stopped process, a network partition), and it cannot be
    interrupted from Python. This thread can: it needs no GIL while MLX or torch wait.
    Armed by the first ``beat`` (model loading and the first compile do not count), so
    the timeout must exceed the longest pause between steps: an evaluation, a checkpoint
    save on rank 0, sample generation."""

    def __init__(self, rank: int, world: int, timeout: float | None = None,
                 exit: Callable[[int], Any] = os._exit):
        self.rank, self.world, self._exit = rank, world, exit
        self.timeout = timeout_from_env() if timeout is None else timeout
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.world > 1 and self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="mlx-tune-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(max(self.timeout / 10, 0.05), 5.0)):
            last = self._last
            if last is not None and time.monotonic() - last > self.timeout:
                _die(f"rank {self.rank}/{self.world}: no training step finished in "
                     f"{self.timeout:g} s: another rank is hung or unreachable ({TIMEOUT_ENV}"
                     f"={self.timeout:g}; 0 disables); {RESUME_HINT}")
                self._exit(EXIT_PEER_LOST)
                return


@contextmanager
def guard_run(comm: Collectives) -> Iterator[Watchdog]:
    """The training run of one rank: peer failures exit cleanly, hangs are timed out.
    With one process the watchdog never starts and ``beat`` costs an attribute write."""
    with peer_guard(comm), Watchdog(comm.rank, comm.world_size) as watchdog:
        yield watchdog
