"""The one exception type for mistakes a user can fix, and how the command line reports it.

Code that finds a bad input (a missing file, a checkpoint of another model, a config key that does
not exist) raises :class:`UserError` with a one-line message that names the file or key, what is
wrong with it and what to do. ``bindweave``'s entry point prints that line and exits with
:data:`EXIT_USER_ERROR`; every other exception is a bug or an environment failure and keeps its
traceback. Library callers (the pipeline, tests) catch it like any ``ValueError``.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 1
"""Exit status of a command stopped by a :class:`UserError` (bad files, checkpoints, requests)."""
EXIT_USAGE = 2
"""Exit status of a command line or config that does not parse (argparse's convention)."""


class UserError(ValueError):
    """A mistake the user can fix; the message is one line: what, where, and the fix."""


def one_line(message: object) -> str:
    """``message`` on one line: inner line breaks folded into ``"; "``, surrounding space stripped."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return "; ".join(lines)


def report(command: str, error: BaseException | str, status: int = EXIT_USER_ERROR) -> SystemExit:
    """Print ``bindweave <command>: error: <one line>`` to stderr and return the ``SystemExit`` to raise
    (``raise report(...) from None``: no traceback)."""
    prefix = f"bindweave {command}" if command else "bindweave"
    print(f"{prefix}: error: {one_line(error)}", file=sys.stderr)
    return SystemExit(status)
