"""What every `provision` command shares: the app, its options, the error boundary, printing.

Only typer is imported at module level, so ``provision --help`` starts fast; each
command imports the library (``provisioning.commands``) when it runs.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

if TYPE_CHECKING:
    from ..project import Project
    from ..servers import Servers

app = typer.Typer(
    help="botfleet: many small bots on one shared PostgreSQL, each with its own isolated database and role.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # tracebacks with locals could show secrets
    context_settings={"help_option_names": ["-h", "--help"]},
)
server_app = typer.Typer(help="The embedded default PostgreSQL server (used when no admin URL is given).", no_args_is_help=True)
app.add_typer(server_app, name="server")

ProjectOpt = Annotated[
    Path,
    typer.Option("--project-dir", envvar="BOTFLEET_HOME", help="The fleet's folder (fleet.toml, secrets/, bots/).",
                 file_okay=False, show_default="current folder"),
]
AdminUrlOpt = Annotated[
    Optional[str],
    typer.Option("--admin-url", help="Admin connection URL without a password (put passwords in ADMIN_DATABASE_URL, "
                 "PGPASSWORD or ~/.pgpass). Default: ADMIN_DATABASE_URL, else the embedded server.",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
BotsArg = Annotated[Optional[list[str]], typer.Argument(help="Bots (names in fleet.toml).", show_default=False)]
AllOpt = Annotated[bool, typer.Option("--all", help="Every bot in the registry.")]
IgnoreOpt = Annotated[
    Optional[list[str]],
    typer.Option("--ignore-stray", metavar="GLOB", help="Bot names (glob, repeatable) that belong to another fleet on "
                 "the same server: never listed, never pruned, not reported as strays.", show_default=False),
]


def say(msg: str) -> None:
    """Progress and banners: on stderr, dimmed, never on stdout (which may be JSON)."""
    typer.secho(msg, err=True, fg=typer.colors.BRIGHT_BLACK)


def fail(msg: str, code: int, *, as_json: bool = False) -> typer.Exit:
    """The error's one red line on stderr (and, for a --json run, ``{"error", "exit_code"}``
    on stdout, so a script reading stdout sees the failure too); the Exit to raise."""
    if as_json:
        import json

        try:
            typer.echo(json.dumps({"error": msg, "exit_code": code}))
        except BrokenPipeError:
            pass
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def project_of(path: Path | None) -> Project:
    from ..project import Project

    return Project(path or Path.cwd())


def servers_of(project: Project, admin_url: str | None, *, read_only: bool = False) -> Servers:
    """How the command reaches its servers; ``read_only`` declares a command that only reads
    (list, plan, doctor, current, ...): in a folder without fleet.toml it is refused
    (``no fleet here``) rather than creating the folder's embedded server."""
    from ..servers import Servers

    return Servers(project, admin_url, say=say, read_only=read_only)


def confirm_or_refuse(question: str, refusal: str) -> None:
    """Ask on a terminal; without one, refuse with ``refusal`` (InvalidInput, nothing changed)."""
    from ..errors import InvalidInput

    if not sys.stdin.isatty():
        raise InvalidInput(refusal)
    if not typer.confirm(question, default=False, err=True):  # stdout may be --json
        raise fail("aborted; nothing was changed", 1)


def confirm_by_typing(expected: str, warning: str, refusal: str) -> None:
    """Ask the operator to type ``expected`` (a bot's name, as dokku does before it destroys
    something): a reflexive "y" cannot confirm it. Without a terminal, refuse with ``refusal``
    (InvalidInput, nothing changed); anything else typed aborts (exit 1, nothing changed)."""
    from ..errors import InvalidInput

    if not sys.stdin.isatty():
        raise InvalidInput(refusal)
    typer.secho(warning, err=True, fg=typer.colors.YELLOW)
    typed = typer.prompt(f"Type {expected} to confirm", default="", show_default=False, err=True)
    if typed.strip() != expected:
        raise fail(f"what was typed is not {expected}; aborted, nothing was changed", 1)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one error boundary: our errors become a red line and their exit code;
    anything unexpected is logged in .botfleet/provision.log and called a bug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import ProvisionError

        as_json = bool(kwargs.get("as_json"))  # under --json an error is also a JSON object on stdout
        failed = functools.partial(fail, as_json=as_json)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ProvisionError as err:
            raise failed(str(err), err.exit_code) from None
        except BrokenPipeError:
            # stdout closed early (`provision list | head`): not an error worth a word.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except OSError as err:
            raise failed(f"{err.strerror or err}: {err.filename}" if err.filename else str(err), 1) from None
        except KeyboardInterrupt:
            raise failed("interrupted; run the command again to finish (it converges)", 130) from None
        except Exception as err:  # noqa: BLE001 - the boundary
            diag = getattr(err, "diag", None)
            if type(err).__module__.startswith("psycopg") and diag is not None and diag.message_primary:
                # A server-side refusal (permissions, a concurrent DROP, ...): its primary
                # message is one line and never carries a password.
                raise failed(f"PostgreSQL refused: {diag.message_primary}", 1) from None
            project = kwargs.get("project") or Path.cwd()
            log = Path(project) / ".botfleet" / "provision.log"
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as fh:
                    fh.write("".join(traceback.format_exception(type(err), err, err.__traceback__, chain=False)))
                where = f"details in {log}"
            except OSError:
                where = "details could not be logged"
            raise failed(f"unexpected {type(err).__name__} (this is a bug in botfleet); {where}", 1) from None

    return wrapper


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns on stdout, two spaces apart."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def rev(revision: str | None) -> str:
    """A revision for a table: "base" for None."""
    return revision[:12] if revision else "base"


class MigrationBar:
    """A progress bar on stderr for migrations, shown from the first bot done (none when
    ``quiet``); ``with MigrationBar() as on_done`` gives the callback the library calls
    with each outcome and the number of bots."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.bar: Any = None

    def __enter__(self) -> Callable[[Any, int], None] | None:
        return None if self.quiet else self.done

    def done(self, outcome: Any, total: int) -> None:
        if self.bar is None:
            self.bar = typer.progressbar(length=total, label="migrating", file=sys.stderr,
                                         item_show_func=lambda o: o.bot if o else None)
            self.bar.__enter__()
        self.bar.current_item = outcome
        self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
