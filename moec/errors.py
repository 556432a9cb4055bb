"""User-facing errors and warnings: each a one-line message that names the culprit (and, for an
error, the fix)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


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


_said: set[str] | None = None
"""The warnings printed so far by the current command (None outside :func:`each_warning_once`)."""


def warn(message: str) -> None:
    """Print ``moec: warning: MESSAGE`` on stderr: something about the user's input that does not
    stop moec but that they should know (the stream is looked up at each call, so the command
    line's test runner and the fuzzer's worker capture it like the error lines). Within
    :func:`each_warning_once`, a message already printed is not printed again."""
    if _said is not None:
        if message in _said:
            return
        _said.add(message)
    print(f"moec: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """One command's scope, in which :func:`warn` prints each distinct message once: a command
    that reads a model twice (``compile --accuracy-budget``) warns about it once."""
    global _said
    outer, _said = _said, set()
    try:
        yield
    finally:
        _said = outer
