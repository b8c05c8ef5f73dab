"""`quantkit inspect DIR [--verify]`: what a checkpoint holds, and whether its files are intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantkit.cli.ui import console, fail, handle_errors


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 10_000:
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if len(v) < 8 else f"{len(v)} items"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


@handle_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory written by quantkit.")],
    verify: Annotated[bool, typer.Option("--verify", help="Check every file's sha256 against the manifest.")] = False,
) -> None:
    """Summarize a checkpoint (format, scheme, sizes, source) and optionally verify its hashes."""
    from rich.table import Table

    from quantkit.export.compressed_tensors import read_checkpoint_summary
    from quantkit.export.manifest import verify_checkpoint

    if not path.is_dir():
        fail(f"{path} is not a directory; pass a checkpoint directory written by quantkit")
    summary = read_checkpoint_summary(path)
    t = Table(title=str(path), show_header=False)
    for k, v in summary.items():
        t.add_row(k, _fmt(v))
    console.print(t)
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            for p in problems:
                console.print(f"[red]✗[/] {p}", highlight=False)
            fail(f"{len(problems)} integrity problem(s) in {path}; do not serve this checkpoint", code=1)
        console.print("[green]✓[/] every file matches the manifest's sha256")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
