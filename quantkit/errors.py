"""Error classes shared across quantkit.

`UsageError` marks a problem with what the user asked for (a bad flag, a missing
file, a recipe that can't apply): the CLI prints its message as one line and
exits with code 2. Anything else is a bug or an environment failure.
"""


class UsageError(ValueError):
    """The input is wrong; the message names the fix."""


class RecipeError(UsageError):
    """A recipe or a set of quantization options is invalid (a usage error)."""


class OperationError(RuntimeError):
    """The environment failed us (disk full, permission denied): one clear line, exit 1."""


def short(value: object, limit: int = 80) -> str:
    """`value` as text for an error message, never longer than about `limit` characters.

    Strings are shown as they are; anything else as its repr. Built with a bounded
    repr (reprlib), so even a huge or self-referencing structure costs little to show.
    """
    import reprlib

    if isinstance(value, str):
        text = value
    else:
        r = reprlib.Repr()
        r.maxstring = r.maxother = limit
        r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
        text = r.repr(value)
    if len(text) > limit:
        keep = max(limit - 1, 8)
        text = text[: keep // 2] + "…" + text[-(keep - keep // 2) :]
    return text


def short_repr(value: object, limit: int = 80) -> str:
    """Like `short`, but strings keep their quotes (as `{value!r}` would show them)."""
    return repr(short(value, limit)) if isinstance(value, str) else short(value, limit)
