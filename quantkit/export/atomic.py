"""Write a checkpoint directory all-or-nothing.

Everything is written into a temp dir beside the target (same filesystem, so the
final step is a rename), and only a complete write becomes `out`. A failure or
Ctrl-C removes the temp dir and leaves whatever was at `out` before untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import OperationError, UsageError


class OutputExistsError(UsageError):
    """The output dir already holds files and --overwrite was not given (a usage error)."""


class ExportError(OperationError):
    """Writing the checkpoint failed (disk full, permissions, ...); nothing was left behind."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work starts, an output that a later export could not write.

    Raises OutputExistsError if `out` is a file, or a non-empty dir while
    overwrite is False; ExportError if the nearest existing parent is not writable.
    The CLI calls this before loading the model so the refusal costs nothing.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a directory; choose another output path")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"output dir {out} is not empty; pass --overwrite to replace it or choose another output path"
            )
    # The temp dir is created in out's parent: that parent (or the first ancestor
    # that exists, since missing parents are created) must be writable.
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (permission denied); choose another output path")


def _describe_os_error(e: BaseException, out: Path) -> str:
    path = getattr(e, "filename", None) or out
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        why = "no space left on device"
    elif isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied" if e.errno != errno.EROFS else "read-only file system"
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror.lower()
    elif "os error 28" in str(e) or "No space left" in str(e):  # safetensors' SafetensorError text
        why = "no space left on device"
    elif "os error 13" in str(e) or "Permission denied" in str(e):
        why = "permission denied"
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"writing checkpoint {out} failed at {path}: {why}; nothing was written"


def _is_io_error(e: BaseException) -> bool:
    # safetensors raises its own SafetensorError (not an OSError) for I/O failures.
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def _fresh_sibling(out: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out`.

    - A non-empty `out` is refused up front (OutputExistsError naming --overwrite)
      unless overwrite=True; then the old dir is replaced only after the body
      succeeded (old moved aside, new renamed in, old deleted).
    - On any exception, KeyboardInterrupt included, the temp dir is removed and
      `out` is untouched. OSErrors (disk full, permissions) are re-raised as a
      one-line ExportError naming the path.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_sibling(out, "tmp")
        # mkdtemp makes the dir 0700; a checkpoint should get the usual
        # permissions so another user or container (e.g. a server) can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise ExportError(_describe_os_error(e, out)) from e

    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_error(e):
            raise ExportError(_describe_os_error(e, out)) from e
        raise


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp to out, replacing an existing out only now."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    if not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"output dir {out} appeared during export; pass --overwrite to replace it")
    old = _fresh_sibling(out, "old")
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    # The new checkpoint is in place; failing to delete the old copy is not an export failure.
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            old.unlink()
