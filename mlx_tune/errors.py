"""The one base of every error a user can fix, and the exit code it ends the process with.

The CLI catches ``UserError`` alone: its message is printed as one line (naming the file,
line or key, and what was expected) and the process exits with ``exit_code``. Anything
else is a bug: a crash log with the traceback, exit 1.
"""

from __future__ import annotations

from mlx_tune.exit_codes import EXIT_ERROR, EXIT_USAGE


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: a
    library's multi-line error cut to what a one-line report can carry."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class UserError(Exception):
    """Bad input or a refused request; the message is one line meant for the user."""

    exit_code: int = EXIT_ERROR


class SpecError(UserError, ValueError):
    """A spec or command line that cannot run (config/schema.py, config/spec.py)."""

    exit_code = EXIT_USAGE
