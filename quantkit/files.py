"""Reading the small text files of a directory quantkit is handed (config.json, quantkit.json, a
sensitive_layers.json) without trusting them: a pipe would block a plain read forever and a device such as
/dev/zero (behind a symlink) would fill memory.  Both, and a file over the limit, raise OSError first.

Bottom floor: the standard library only, so every package may use it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

MAX_SMALL_FILE = 256 << 20  # above any config or manifest quantkit reads (a manifest lists every module)


def read_small_bytes(path: str | os.PathLike, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; OSError (with the reason) otherwise."""
    st = os.stat(path)  # follows symlinks: a link to /dev/zero is a device here
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket)", os.fspath(path))
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data


def read_small_text(path: str | os.PathLike, limit: int | None = None, encoding: str = "utf-8") -> str:
    """The text of `path`, a regular file of at most `limit` bytes (default MAX_SMALL_FILE); OSError otherwise."""
    return read_small_bytes(path, MAX_SMALL_FILE if limit is None else limit).decode(encoding)


def load_small_json(path: str | os.PathLike, error: type[Exception], fix: str, limit: int | None = None) -> Any:
    """json.loads of a small file (read_small_text); `error` with one line (the file, why, then `fix`) when it
    cannot be read or is not JSON."""
    try:
        return json.loads(read_small_text(path, limit))
    except OSError as e:
        raise error(f"{os.fspath(path)} cannot be read ({(e.strerror or str(e)).lower()}); {fix}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = str(e) if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise error(f"{os.fspath(path)} is not valid JSON ({why[:120]}); {fix}") from e
