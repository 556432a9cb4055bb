"""User-facing errors: each carries a one-line message that names the culprit and the fix."""


class MoecError(Exception):
    """An error caused by the user's input (file, option, model); printed without a traceback."""


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (its type's name when the message is empty), for
    quoting another tool's error inside a one-line moec message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
