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

from quantkit.errors import OperationError, UsageError, short
from quantkit.files import read_small_text


class OutputExistsError(UsageError):
    """The output path cannot be written as asked (exists, is the source, ...): a usage error."""


class ExportError(OperationError):
    """Writing the checkpoint failed (disk full, permissions, ...); nothing was left behind."""


_TAGS = ("tmp", "old")  # .OUT.tmp-PID-xxxx: the checkpoint being written; .OUT.old-PID-xxxx: the one it replaces


def _short(path: Path | str, limit: int = 160) -> str:
    return short(str(path), limit)


def source_paths(source: dict | None) -> tuple[Path, ...]:
    """Local paths a model was read from (a loaded model's `source` dict): never to be written over."""
    p = (source or {}).get("path")
    return (Path(p),) if isinstance(p, str) and p else ()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _not_ours(out: Path) -> str | None:
    """Why the existing, non-empty dir `out` is not a checkpoint quantkit wrote (None when it is).

    Ours: its quantkit.json (readable JSON with a files table) lists every file in it.
    """
    import json

    from quantkit.export.manifest import MANIFEST_HASH_NAME, MANIFEST_NAME

    if not (out / MANIFEST_NAME).is_file():  # absent, or a pipe/device that must not be read
        return f"it has no {MANIFEST_NAME}"
    try:
        m = json.loads(read_small_text(out / MANIFEST_NAME))
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME}"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"its {MANIFEST_NAME} is unreadable"
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict):
        return f"its {MANIFEST_NAME} lists no files"
    for root, dirs, names in os.walk(out):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, n).relative_to(out).as_posix()
            if rel not in files and rel not in (MANIFEST_NAME, MANIFEST_HASH_NAME):
                return f"it holds {_short(rel, 80)}, which quantkit did not write"
    return None


def check_output_dir(out: Path, overwrite: bool, *, protect: tuple[Path, ...] | list[Path] = ()) -> None:
    """Refuse, before any work starts, an output that a later export could not or must not write.

    OutputExistsError (a usage error, one line naming the fix) when `out`:
    - is the current directory or one of its parents (`--out .`, `--out ""`);
    - is a path in `protect` (the model source) or a parent of one;
    - is a symbolic link, or exists and is not a directory;
    - is a non-empty directory and overwrite is False;
    - with overwrite, is a non-empty directory that is not a checkpoint quantkit wrote
      (no quantkit.json, or files the manifest does not list).
    ExportError if the nearest existing parent is not writable.
    The CLI calls this before loading the model so the refusal costs nothing.
    """
    try:
        _check_output_dir(out, overwrite, protect)
    except OSError as e:  # a name too long, a loop of links...: not a path we can write
        raise OutputExistsError(
            f"--out {_short(out)} is not a usable path ({(e.strerror or str(e)).lower()}); choose another output path"
        ) from None


def _check_output_dir(out: Path, overwrite: bool, protect) -> None:
    given = str(out)
    out = Path(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, target):
        what = "the current directory" if target == cwd else "a parent of the current directory"
        raise OutputExistsError(
            f"--out {_short(given) or repr(given)} is {what}; a checkpoint is written as a new directory: "
            "pass a new path such as --out ./quantized"
        )
    for p in protect:
        src = Path(p).resolve()
        if _is_within(src, target):
            what = "the model source" if src == target else f"a parent of the model source {_short(src)}"
            raise OutputExistsError(
                f"--out {_short(given)} is {what}; writing there would replace the model: choose another output path"
            )
    if out.is_symlink():
        raise OutputExistsError(
            f"output {_short(given)} is a symbolic link; pass the directory it points to, or another output path"
        )
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output {_short(given)} exists and is not a directory; choose another output path")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(
                    f"output dir {_short(given)} is not empty; pass --overwrite to replace it or choose another output path"
                )
            why = _not_ours(out)
            if why is not None:
                raise OutputExistsError(
                    f"--overwrite replaces only a checkpoint quantkit wrote, and {_short(given)} is not one ({why}); "
                    "move its files away or choose another output path"
                )
    # The temp dir is created in out's parent: that parent (or the first ancestor
    # that exists, since missing parents are created) must be writable.
    check_writable_parent(out.absolute())


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor (where a new file or directory would go)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_parent(path: Path) -> None:
    """ExportError unless the nearest existing ancestor of `path` is a writable directory."""
    parent = nearest_existing(Path(path).absolute().parent)
    if not parent.is_dir():
        raise ExportError(f"cannot write under {_short(parent)}: it is not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {_short(parent)} (permission denied); choose another output path")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def stale_siblings(out: Path, tag: str) -> list[Path]:
    """`.OUT.<tag>-PID-*` entries beside `out` whose writing process is gone (killed mid-write)."""
    import re

    out = Path(out).absolute()
    pat = re.compile(re.escape(f".{out.name}.{tag}-") + r"(\d+)-")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            found.append(p)
    return sorted(found)


def recover_stale(out: Path) -> list[str]:
    """Repair what a killed export left beside `out`; returns one line per repair.

    - `.OUT.old-PID-*` with no `out`: the run was killed between moving the previous
      checkpoint aside and renaming the new one in; the previous one goes back to `out`.
      With `out` present the new checkpoint was already in place: the old copy is deleted.
    - `.OUT.tmp-PID-*`: an unfinished (or never renamed) checkpoint: deleted.
    Only names quantkit itself makes are touched, and only when their process is gone.
    """
    out = Path(out).absolute()
    done = []
    for old in stale_siblings(out, "old"):
        if not (out.exists() or out.is_symlink()):
            os.rename(old, out)
            done.append(f"restored the previous checkpoint at {_short(out)} (a killed run had moved it aside)")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in stale_siblings(out, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {_short(tmp.name)}, an unfinished export of a killed run")
    return done


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
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _usual_modes(tmp: Path) -> None:
    """Files 0666 and dirs 0777 less the user's umask (safetensors writes 0600, mkdtemp 0700):
    a server running as another user can read the checkpoint, like any file the user writes."""
    umask = _umask()
    for root, dirs, names in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for n in names:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, *, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out`.

    - `out` is checked first (check_output_dir: never the current directory, the model
      source in `protect`, a non-empty dir without overwrite, or with overwrite a dir that
      is not a checkpoint quantkit wrote).
    - With overwrite the old dir is replaced only after the body succeeded (old moved
      aside, new renamed in, old deleted); Ctrl-C cannot split those steps, and a kill
      between them is repaired by the next run (recover_stale).
    - On any exception, KeyboardInterrupt included, the temp dir is removed and
      `out` is untouched. OSErrors (disk full, permissions) are re-raised as a
      one-line ExportError naming the path.
    """
    from quantkit.interrupts import Interrupted, defer_interrupts, reached

    out = Path(out).absolute()
    check_output_dir(out, overwrite, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_sibling(out, "tmp")
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise ExportError(_describe_os_error(e, out)) from e

    committed, old = False, None
    try:
        yield tmp
        _usual_modes(tmp)
        reached("export.manifest")
        with defer_interrupts():  # Ctrl-C is held until out is the old or the new checkpoint, whole
            old = _commit(tmp, out, overwrite)
            committed = True
    except KeyboardInterrupt:
        if committed:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise Interrupted(f"the checkpoint at {_short(out)} is complete", committed=True) from None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_error(e):
            raise ExportError(_describe_os_error(e, out)) from e
        raise
    if old is not None:  # the new checkpoint is in place; failing to delete the old copy is no failure
        try:
            shutil.rmtree(old, ignore_errors=True)
        except KeyboardInterrupt:
            shutil.rmtree(old, ignore_errors=True)
            raise Interrupted(f"the checkpoint at {_short(out)} is complete", committed=True) from None
    return


def _commit(tmp: Path, out: Path, overwrite: bool) -> Path | None:
    """Rename tmp to out, replacing an existing out only now; returns the old copy to delete (or None).

    The caller holds Ctrl-C meanwhile (defer_interrupts).
    """
    from quantkit.interrupts import reached

    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        reached("commit.renamed")
        return None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        reached("commit.renamed")
        return None
    if not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"output dir {_short(out)} appeared during export; pass --overwrite to replace it")
    why = _not_ours(out)
    if why is not None:  # changed while we were writing: still never replace what is not ours
        raise OutputExistsError(
            f"--overwrite replaces only a checkpoint quantkit wrote, and {_short(out)} is not one ({why}); "
            "move its files away or choose another output path"
        )
    old = _fresh_sibling(out, "old")
    old.rmdir()
    os.rename(out, old)
    reached("commit.aside")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous checkpoint back
        raise
    reached("commit.renamed")
    return old
