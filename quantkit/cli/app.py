"""The `quantkit` command line. Commands live in sibling modules; this file wires them up.

Only typer and rich load at import time so `quantkit --help` is instant; each
command imports torch and friends when it runs.
"""

from __future__ import annotations

import os
import sys

import typer

from quantkit import __version__

app = typer.Typer(
    name="quantkit",
    help="Post-training quantization for LLMs: quantize, scan, export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        from quantkit.cli.ui import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"


# Command modules, each with a `register(app)`; a new command is a new module plus its name here.
_COMMAND_MODULES = ("methods", "quantize", "smoothquant", "spinquant", "evaluate", "inspect", "plan", "scan", "generate",
                    "bench")


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"quantkit.cli.{name}").register(app)


_register()


def main() -> None:
    # --debug is accepted anywhere on the line, not only before the command.
    if "--debug" in sys.argv[1:]:
        from quantkit.cli.ui import DEBUG_ENV

        sys.argv = [a for a in sys.argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    app(prog_name="quantkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
