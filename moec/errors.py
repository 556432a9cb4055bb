"""User-facing errors: each carries a one-line message that names the culprit and the fix."""


class MoecError(Exception):
    """An error caused by the user's input (file, option, model); printed without a traceback."""
