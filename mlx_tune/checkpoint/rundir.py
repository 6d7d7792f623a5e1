"""One run per output directory, and what may be moved aside as "the old run".

``RunLock`` holds an exclusive ``flock`` on ``<output_dir>/.mlx-tune.lock`` for the life of
a run. The kernel drops the lock when the process dies in any way (kill -9 included), so a
stale lock file never blocks anyone: only a live holder does. The file records who holds
it (pid, host, start time) so the refusal can say so.

``move_contents_aside`` empties a run directory into ``<output_dir>.old-<UTC time>/`` while
the lock file (and with it the lock) stays where it is, so no second run can slip into the
directory between "moved aside" and "started". ``check_is_run_dir`` refuses to move
anything that does not look like an mlx-tune run (a dataset folder, a project checkout).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

from mlx_tune.errors import UserError
from mlx_tune.exit_codes import EXIT_DIR_IN_USE, EXIT_USAGE

LOCK_NAME = ".mlx-tune.lock"
# What a run writes into output_dir (see training/recipe.py and reporting/factory.py).
RUN_MARKERS = ("spec.yaml", "checkpoints", "adapters", "metrics.jsonl", LOCK_NAME)
RUN_FILES = RUN_MARKERS + ("adapters_ema", "tensorboard", "lr_find.png", "lr_find.csv",
                           "mlx-tune-crash.log", "reference_logps.safetensors")
# Signs that a directory is something else that must never be moved aside.
FOREIGN_MARKERS = (".git", "pyproject.toml", "setup.py", "train.jsonl", "valid.jsonl",
                   "val.jsonl", "config.json", "model.safetensors")


class RunDirError(UserError):
    """output_dir cannot be used as asked; one line saying why and what to do."""

    exit_code = EXIT_USAGE


class RunDirInUse(RunDirError):
    exit_code = EXIT_DIR_IN_USE


class RunLock:
    """Exclusive advisory lock on a run directory; ``release()`` or process death frees it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted at the lock's name is refused, never written through.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunDirError(f"{self.path}: is a symbolic link; mlx-tune writes its run "
                                  "lock only into a file it created (remove the link)") from None
            raise RunDirError(f"output_dir {self.dir}: cannot create the run directory or its "
                              f"lock file ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted at the name
            os.close(fd)
            raise RunDirError(f"{self.path}: is not a regular file; remove it (mlx-tune "
                              "creates its run lock itself)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(f"output_dir {self.dir} is in use by another mlx-tune run "
                              f"({holder}); wait for it, stop it, or pick another "
                              "--output-dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def check_is_run_dir(output_dir: str | os.PathLike) -> None:
    """Raise RunDirError unless ``output_dir`` is empty or looks like an mlx-tune run."""
    d = Path(output_dir)
    if not d.is_dir():
        return
    names = {p.name for p in d.iterdir()}
    if not names - {LOCK_NAME}:
        return
    resolved = d.resolve()
    cwd = Path.cwd().resolve()
    protected = {Path.home().resolve(), Path(resolved.anchor)}
    if resolved in protected or resolved == cwd or resolved in cwd.parents:
        raise RunDirError(f"output_dir {d} is the current directory, one of its parents, the "
                          "home directory or the filesystem root; refusing to move it aside")
    foreign = sorted(names & set(FOREIGN_MARKERS))
    if foreign:
        raise RunDirError(f"output_dir {d} holds {', '.join(foreign)}: it looks like a dataset, "
                          "model or project folder, not an mlx-tune run; refusing to move it "
                          "aside (pick another --output-dir)")
    if not names & set(RUN_MARKERS):
        raise RunDirError(f"output_dir {d} is not empty and holds none of an mlx-tune run's "
                          f"files ({', '.join(RUN_MARKERS[:4])}); refusing to move it aside "
                          "(pick another --output-dir)")


def move_contents_aside(output_dir: str | os.PathLike) -> Path | None:
    """Move everything but the lock file into ``<output_dir>.old-<UTC time>``; delete
    nothing. Returns that directory, or None when there was nothing to move."""
    src = Path(output_dir)
    entries = [p for p in src.iterdir() if p.name != LOCK_NAME] if src.is_dir() else []
    if not entries:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = src.with_name(f"{src.name}.old-{stamp}"), 1
    while dest.exists():  # two fresh starts within one second
        dest, n = src.with_name(f"{src.name}.old-{stamp}-{n}"), n + 1
    dest.mkdir()
    # checkpoints/ first: once it is gone nothing can resume from a half-moved run.
    for p in sorted(entries, key=lambda p: p.name != "checkpoints"):
        os.rename(p, dest / p.name)
    return dest

