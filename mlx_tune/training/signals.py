"""How a run reacts to being asked to stop: one policy for the whole run."""

from __future__ import annotations

import signal
from typing import Any

from mlx_tune.exit_codes import EXIT_INTERRUPTED


class SignalGuard:
    """One policy for SIGINT, SIGTERM and SIGHUP (a dropped ssh session): the first asks
    the run to finish its step, save and exit; a second exits at once (the last complete
    checkpoint stays valid: saves and adapter writes are atomic). The caller keeps it
    installed until the last byte is written: the final checkpoint and the adapter."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, n))

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise SystemExit(EXIT_INTERRUPTED)
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
