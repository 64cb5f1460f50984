"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad flag, missing file, unsupported model). The CLI
prints its message on one line and exits with code 2; it is never shown as a traceback. Messages say what
is wrong *and* how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is a one-line message that carries the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
