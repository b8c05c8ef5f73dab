"""Error classes shared across quantkit.

`UsageError` marks a problem with what the user asked for (a bad flag, a missing
file, a recipe that can't apply): the CLI prints its message as one line and
exits with code 2. Anything else is a bug or an environment failure.
"""


class UsageError(ValueError):
    """The input is wrong; the message names the fix."""


class OperationError(RuntimeError):
    """The environment failed us (disk full, permission denied): one clear line, exit 1."""
