"""Console, progress bars and error reporting shared by the commands."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)

DEBUG_ENV = "QUANTKIT_DEBUG"


MAX_MESSAGE = 600  # characters: no error line echoes an unbounded value, whatever raised it


def _bounded(message: str) -> str:
    line = message.splitlines()[0] if message else ""
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE // 2] + " … " + line[-(MAX_MESSAGE // 2) :]
    return line


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # The message is plain text: brackets in it (e.g. `pip install 'quantkit[report]'`) are not markup.
    err_console.print(f"[bold red]error:[/] {escape(_bounded(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Usage errors become one line and exit 2; other failures exit 1; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from quantkit.errors import OperationError, UsageError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (UsageError, FileNotFoundError, PermissionError) as e:
            if os.environ.get(DEBUG_ENV):
                raise
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code=2)
        except OperationError as e:
            if os.environ.get(DEBUG_ENV):
                raise
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code=1)
        except OSError as e:
            import errno

            if os.environ.get(DEBUG_ENV):
                raise
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):  # a path given wrong
                from quantkit.errors import short

                fail(f"{short(str(e.filename or ''), 160)}: {(e.strerror or str(e)).lower()}; pass a usable path", code=2)
            fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for the traceback)",
                 code=1)
        except KeyboardInterrupt as e:
            from rich.markup import escape

            # A command that writes files raises quantkit.interrupts.Interrupted saying what is on disk.
            what = getattr(e, "message", None) or "nothing was written"
            err_console.print(f"[yellow]interrupted[/]; {escape(_bounded(what))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            fail(f"{type(e).__name__}: {first} (run with --debug for the traceback)", code=1)

    return wrapper


@contextmanager
def progress_bar(total_label: str = "calibrating"):
    """A rich progress bar on stderr; yields an on_block(i, n, name, phase) callback."""
    interactive = sys.stderr.isatty() or bool(os.environ.get("QUANTKIT_PROGRESS"))
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not interactive,
    )
    state: dict[str, Any] = {}

    def on_block(i: int, n: int, name: str, phase: str) -> None:
        if not interactive:  # logs get one plain line per block
            err_console.print(f"({i + 1}/{n}) {name} · {phase}", highlight=False)
            return
        if "task" in state and state["n"] != n:  # a new run of steps (rotation training, then blocks)
            progress.update(state["task"], completed=state["n"])
            del state["task"]
        if "task" not in state:
            state["task"], state["n"] = progress.add_task(total_label, total=n), n
        progress.update(state["task"], completed=i, description=f"({i + 1}/{n}) {name} · {phase}")

    with progress:
        yield on_block
        if "task" in state:
            progress.update(state["task"], completed=state["n"], description=f"{total_label} done")


def status(message: str) -> None:
    from rich.markup import escape

    err_console.print(escape(message), highlight=False, soft_wrap=True)
