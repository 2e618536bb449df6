"""`provision`: the botfleet command line. Parse, call one function of ``provisioning.commands``, print.

The commands are grouped in modules of this package that register themselves on
the one ``app`` (``common``); each imports the library only when it runs, so
``provision --help`` starts fast.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import typer

from . import bots, config, everyday, fleet, migrations, ops, quota, stack  # noqa: F401 - each registers its commands on `app`
from . import monitor  # noqa: F401,E402 - registers top and metrics on `app`
from .common import app

__all__ = ["app", "main", "run"]


def run(argv: list[str] | None = None) -> int:
    """Run one command line; returns its exit code. Usage errors become the same one red line
    as every other error (typer vendors its click, so they are recognised by shape:
    ``format_message`` and exit code 2, rather than by a private class)."""
    try:
        code = app(args=argv, prog_name="provision", standalone_mode=False)
    except typer.Exit as err:
        code = err.exit_code
    except typer.Abort:
        typer.secho("error: aborted; nothing was changed", err=True, fg=typer.colors.RED)
        code = 1
    except Exception as err:  # noqa: BLE001
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            code = 2
        elif getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message"):
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _json_error(argv, f"{err.format_message()}{hint}", 2)
            typer.secho(f"error: {err.format_message()}{hint}", err=True, fg=typer.colors.RED)
            code = 2
        else:
            raise
    return code if isinstance(code, int) else 0


def _json_error(argv: list[str] | None, message: str, code: int) -> None:
    """A usage error of a --json run is also a JSON object on stdout (as the commands' errors
    are: common.fail); ``--json`` after ``--`` belongs to the command ``run`` runs."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if "--json" in (args[:args.index("--")] if "--" in args else args):
        typer.echo(json.dumps({"error": message, "exit_code": code}))


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=os.environ.get("BOTFLEET_LOG", "WARNING"))
    try:
        code = run()
    finally:
        # The command is done: its objects only wait for the interpreter's exit, whose last
        # garbage collection walks them all (with SQLAlchemy and Alembic loaded, 0.1 s, a tenth
        # of an add-bot). Frozen, they are not walked; exit still runs atexit, flushes and
        # closes as ever (only objects caught in reference cycles are then left to the OS).
        gc.freeze()
    sys.exit(code)
