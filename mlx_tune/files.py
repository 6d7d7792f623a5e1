"""Durable file writes: a reader sees the old file or the new one, never half of either.

``atomic_write`` writes a temporary file in the same directory (a rename is only atomic
within one filesystem), fsyncs it, renames it over the target and fsyncs the directory
so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def full_fsync(fd: int) -> None:
    """fsync, and on macOS F_FULLFSYNC: plain fsync there does not flush the drive cache."""
    try:
        import fcntl

        if hasattr(fcntl, "F_FULLFSYNC"):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    except OSError:
        pass  # not supported by this filesystem: fall back to fsync
    os.fsync(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename/creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` in one atomic step when the
    block ends without an error (nothing changes when it raises): for writers that take
    a file object, so a large file is never held in memory as a whole."""
    path = Path(path)
    # pid in the name: two processes writing the same file never share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            full_fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)
    except OSError:
        pass  # some platforms cannot open a directory; the rename is still atomic


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one atomic step."""
    with atomic_file(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
