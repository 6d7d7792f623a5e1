"""Durable file writes that replace nothing of the user's.

``atomic_write`` writes a temporary file in the same directory (a rename is only atomic
within one filesystem), fsyncs it, renames it over the target and fsyncs the directory
so the rename itself survives a power cut. The temporary file is created exclusively and
never through a link, and the rename replaces a link itself, never what it points to.

``check_replaceable`` and ``check_new_dir`` are asked first by every command that writes
to a path the user named (report --html, lr-find --plot, convert-adapter, fuse): a file
is replaced only when it is absent or one we wrote (``is_ours``), a directory is filled
only when it is absent or empty, and a link is never written through.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TextIO

from mlx_tune.errors import UserError
from mlx_tune.exit_codes import EXIT_USAGE


class WriteRefused(UserError, ValueError):
    """A path we were asked to write holds something that is not ours to replace."""

    exit_code = EXIT_USAGE


def check_replaceable(path: str | Path, is_ours: Callable[[bytes], bool], *, what: str,
                      force: bool = False) -> Path:
    """``path`` unless writing it would replace something of the user's: it may be absent,
    or a regular file (never a link) whose first 4 KiB ``is_ours`` recognises; ``force``
    replaces any regular file. ``what`` names the writer in the refusal."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise WriteRefused(f"{path}: exists and is {kind}; {what} writes only regular files "
                           "it created: choose another path")
    if force:
        return path
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not is_ours(head):
        raise WriteRefused(f"{path}: exists and was not written by {what}; choose another "
                           "path, or pass --force to replace it")
    return path


def open_append(path: str | Path) -> TextIO:
    """``path`` opened for appending text (created if absent), never through a link and
    only when it is a regular file: a link or FIFO planted at a log's name (metrics.jsonl)
    is refused with WriteRefused instead of being appended to."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO nobody reads
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise WriteRefused(f"{path}: is a symbolic link or not a regular file; mlx-tune "
                           "appends only to files it created (remove it)")
    return open(fd, "a", encoding="utf-8")


def check_new_dir(path: str | Path, what: str) -> Path:
    """``path`` when it is absent or an empty directory (not a link); else WriteRefused,
    so an output directory never mixes our files with someone else's."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise WriteRefused(f"{path}: exists and is {kind}; {what} needs a new directory")
    if any(path.iterdir()):
        raise WriteRefused(f"{path}: exists and is not empty; {what} writes only into a new "
                           "or empty directory (choose another, or empty it yourself)")
    return path


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
    # pid and thread in the name: two writers of the same file never share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    # A leftover temp file of a dead process with our pid is ours to remove (unlink removes
    # a planted link, not its target); O_EXCL then creates a fresh file, never via a link.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with open(fd, "wb") as fh:
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
