"""User-facing errors and warnings: each a one-line message that names the culprit (and, for an
error, the fix)."""

from __future__ import annotations

import sys


class MoecError(Exception):
    """An error caused by the user's input (file, option, model); printed without a traceback."""


def first_line(error: BaseException | str, default: str = "no output") -> str:
    """The first line of an error's message or of another tool's output, for quoting it inside a
    one-line moec message; when there is none, an exception's type name, or ``default`` for output.

    The first line, because that is where the message is: Python's exceptions and TVM 0.27's alike
    (a TVMScript diagnostic follows it with the source line and a caret underline).
    """
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else default


def warn(message: str) -> None:
    """Print ``moec: warning: MESSAGE`` on stderr: something about the user's input that does not
    stop moec but that they should know (the stream is looked up at each call, so the command
    line's test runner and the fuzzer's worker capture it like the error lines)."""
    print(f"moec: warning: {message}", file=sys.stderr, flush=True)
