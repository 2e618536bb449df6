"""`provision`: the botfleet command line. Thin: parse, call one core function, print.

Heavy modules (psycopg, the core) are imported inside the commands so that
`provision --help` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

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


def _say(msg: str) -> None:
    typer.secho(msg, err=True, fg=typer.colors.BRIGHT_BLACK)


def _fail(msg: str, code: int) -> typer.Exit:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one error boundary: our errors become a red line and their exit code;
    anything unexpected is logged in .botfleet/provision.log and called a bug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import ProvisionError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ProvisionError as err:
            raise _fail(str(err), err.exit_code) from None
        except BrokenPipeError:
            # stdout closed early (`provision list | head`): not an error worth a word.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except OSError as err:
            raise _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err), 1) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; run the command again to finish (it converges)", 130) from None
        except Exception as err:  # noqa: BLE001 - the boundary
            diag = getattr(err, "diag", None)
            if type(err).__module__.startswith("psycopg") and diag is not None and diag.message_primary:
                # A server-side refusal (permissions, a concurrent DROP, ...): its primary
                # message is one line and never carries a password.
                raise _fail(f"PostgreSQL refused: {diag.message_primary}", 1) from None
            project = kwargs.get("project") or Path.cwd()
            log = Path(project) / ".botfleet" / "provision.log"
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as fh:
                    fh.write("".join(traceback.format_exception(type(err), err, err.__traceback__, chain=False)))
                where = f"details in {log}"
            except OSError:
                where = "details could not be logged"
            raise _fail(f"unexpected {type(err).__name__} (this is a bug in botfleet); {where}", 1) from None

    return wrapper


def _project(path: Path | None) -> Path:
    return (path or Path.cwd()).resolve()


def _connect(project: Path, admin_url: str | None, quiet: bool = False, *, server: str = "default", fleet=None):
    """Open an admin connection to one of the fleet's servers (the default one unless named)."""
    from . import db
    from .server import choose_named

    if fleet is None and server != "default":
        from .registry import Registry

        fleet = Registry(project).load()
    choice = choose_named(project, fleet, server, admin_url)
    _say(choice.banner())
    conn = db.connect(choice.url)
    info = db.admin_info(conn)
    return choice, conn, info


def _servers_to_visit(project: Path, fleet, admin_url: str | None) -> list[str]:
    """The servers a fleet-wide command looks at: every [servers.NAME], and the default
    one unless the fleet lives entirely on [servers.NAME] (then it is visited only when
    named by --admin-url / ADMIN_DATABASE_URL, or when the embedded server is already
    running)."""
    from .registry import DEFAULT_SERVER
    from .server import ENV_ADMIN_URL

    names = sorted(fleet.servers)  # even without bots: a bot removed from fleet.toml may be left there
    default_needed = (not fleet.servers or fleet.on(DEFAULT_SERVER) or admin_url or os.environ.get(ENV_ADMIN_URL))
    if not default_needed:
        from .embedded import EmbeddedServer

        default_needed = EmbeddedServer(project / ".botfleet").status().running
    return ([DEFAULT_SERVER] if default_needed else []) + names


@contextlib.contextmanager
def _each_server(project: Path, fleet, admin_url: str | None, names: list[str]):
    """Admin connections to several of the fleet's servers: [(name, choice, conn, info)]."""
    opened = []
    try:
        for name in names:
            choice, conn, info = _connect(project, admin_url, server=name, fleet=fleet)
            opened.append((name, choice, conn, info))
        yield opened
    finally:
        for _name, _choice, conn, _info in opened:
            conn.close()


@app.command("add-bot")
@command
def add_bot(
    name: Annotated[str, typer.Argument(help="Bot name: 1-40 of a-z 0-9 '-', starting with a letter.", show_default=False)],
    pool_size: Annotated[Optional[int], typer.Option(help="Pool size of the bot's engine.", show_default="2")] = None,
    max_overflow: Annotated[Optional[int], typer.Option(help="Extra connections above the pool.", show_default="3")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Containers running this bot.", show_default="1")] = None,
    statement_timeout: Annotated[Optional[str], typer.Option(help="Role default statement_timeout.", show_default="30s")] = None,
    idle_timeout: Annotated[Optional[str], typer.Option(help="Role default idle_in_transaction_session_timeout.", show_default="60s")] = None,
    code: Annotated[Optional[str], typer.Option(help="Deploy this existing bots/<CODE> as a new instance (white-label).", show_default="NAME")] = None,
    db_host: Annotated[Optional[str], typer.Option(help="Host in the bot's DATABASE_URL.", show_default="the fleet's bot_host, 'postgres'")] = None,
    db_port: Annotated[Optional[int], typer.Option(help="Port in the bot's DATABASE_URL.", show_default="5432")] = None,
    rotate_password: Annotated[bool, typer.Option("--rotate-password", help="Give an existing bot a new password.")] = False,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not run the bot's migrations to head.")] = False,
    server: Annotated[Optional[str], typer.Option("--server", help="Place a new bot on this server: 'default' or a "
                                                  "[servers.NAME] of fleet.toml.",
                                                  show_default="the one with the most headroom")] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Create (or converge) one bot: an isolated database and login role, its 0600 env file, its registry entry.

    Running it again repairs drift and keeps the password unless --rotate-password.
    In a fleet with several servers a new bot goes to --server, or to the one with
    the most connection headroom; an existing bot stays where it is.

    Example: provision add-bot hello-bot --pool-size 2 --max-overflow 3
    """
    from .fleet import BotOptions, Project, add_bot as core_add, check_options, plan_entry
    from .names import validate
    from .registry import DEFAULT_SERVER
    from .server import place

    opts = BotOptions(
        pool_size=pool_size, max_overflow=max_overflow, replicas=replicas, statement_timeout=statement_timeout,
        idle_timeout=idle_timeout, code=code, db_host=db_host, db_port=db_port, rotate_password=rotate_password,
        server=server,
    )
    names = validate(name)  # bad input fails before any server is started or touched
    check_options(opts)
    root = _project(project)
    fleet = Project(root).registry.load()
    entry, _has_code = plan_entry(Project(root), names, fleet.bots.get(name), opts)
    if server is None and name not in fleet.bots and fleet.servers:
        opts.server = place(fleet, entry)
        _say(f"placing {name} on server {opts.server} (the most headroom)")
    target = opts.server if opts.server is not None else fleet.server_of(entry)
    choice, conn, info = _connect(root, admin_url, server=target or DEFAULT_SERVER, fleet=fleet)
    with conn:
        result = core_add(conn, info, choice.url, Project(root), name, opts, progress=_say)
    migration = None if no_migrate or not result.has_code else _migrate_new_bot(root, choice.url, name)
    if as_json:
        typer.echo(json.dumps({**result.as_dict(), "migration": migration.as_dict() if migration else None}, indent=2))
    else:
        _print_added(result, migration)
    if migration is not None and not migration.ok:
        raise _fail(f"{name} is provisioned but its migrations failed: {migration.error}; "
                    f"fix them and run: provision migrate {name}", 1)


def _migrate_new_bot(root: Path, url: str, name: str):
    """Bring a just-provisioned bot to head, as its own role (None: its code has no migrations)."""
    from .fleet import Project
    from .migrate import migrate_one, plan_targets

    targets, early = plan_targets(Project(root), [name], all_bots=False, admin_url=url, skip_missing=True)
    if not targets:
        for outcome in early:
            _say(f"migrations skipped: {outcome.error}")
        return None
    _say(f"migrating {name} to head")
    return migrate_one(targets[0])


def _print_added(result, migration) -> None:
    typer.secho(f"{result.bot}: {result.status}", fg=typer.colors.GREEN, bold=True)
    for change in result.changes:
        typer.echo(f"  repaired: {change}")
    typer.echo(f"  database          {result.database}")
    typer.echo(f"  role              {result.role}")
    typer.echo(f"  connection limit  {result.connection_limit}")
    typer.echo(f"  env file          {result.env_file}" + ("  (new password)" if result.password_changed else ""))
    if not result.has_code:
        typer.echo(f"  code              none yet: database and role only (add bots/{result.code}/)")
    else:
        typer.echo(f"  code              bots/{result.code}")
    if migration is not None and migration.ok:
        typer.echo(f"  schema            {migration.status}: {migration.from_rev or 'base'} -> {migration.to_rev or 'base'}")


@app.command("remove-bot")
@command
def remove_bot(
    name: Annotated[str, typer.Argument(help="The bot to remove.", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    no_backup: Annotated[bool, typer.Option("--no-backup", help="Drop without a pg_dump backup first (data is lost).")] = False,
    server: Annotated[Optional[str], typer.Option("--server", help="For a bot not in fleet.toml: the server it is on.",
                                                  show_default="its registry entry's, else 'default'")] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Back up (pg_dump -Fc into backups/NAME/), then drop a bot's database, role, env file and registry entry.

    Asks first (or needs --yes). Removing a bot that is already gone is harmless.

    Example: provision remove-bot hello-bot --yes
    """
    from .errors import InvalidInput
    from .fleet import Project, remove_bot as core_remove
    from .names import validate

    validate(name)
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"remove-bot {name} drops its database: pass --yes to confirm")
        what = "WITHOUT a backup" if no_backup else "after a pg_dump backup"
        if not typer.confirm(f"Drop bot {name!r} (database, role, credentials) {what}?", default=False):
            raise _fail("aborted; nothing was changed", 1)
    root = _project(project)
    fleet = Project(root).registry.load()
    entry = fleet.bots.get(name)
    where = fleet.server_of(entry) if entry is not None else (server or "default")
    if entry is not None and server is not None and server != where:
        raise InvalidInput(f"{name} lives on server {where}, not {server}")
    choice, conn, info = _connect(root, admin_url, server=where, fleet=fleet)
    with conn:
        result = core_remove(conn, info, choice.url, Project(root), name, backup=not no_backup, progress=_say)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.status == "not provisioned":
        typer.echo(f"{name}: not provisioned; nothing to do")
        return
    typer.secho(f"{name}: removed", fg=typer.colors.GREEN, bold=True)
    if result.backup:
        typer.echo(f"  backup   {result.backup}")
    for item in result.dropped:
        typer.echo(f"  dropped  {item}")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@app.command("list")
@command
def list_cmd(
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Every bot in the registry with live facts: exists, size, connections in use / limit.

    Bot databases on the server that the registry does not know are flagged.
    A fleet with several servers is listed across all of them (a SERVER column).

    Example: provision list --json
    """
    from .fleet import Project, list_bots

    root = _project(project)
    fleet = Project(root).registry.load()
    rows = []
    with _each_server(root, fleet, admin_url, _servers_to_visit(root, fleet, admin_url)) as servers:
        for name, _choice, conn, _info in servers:
            rows += list_bots(conn, Project(root), server=name)
    rows.sort(key=lambda r: (r["bot"], r["server"]))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no bots yet: provision add-bot NAME")
        return
    many = bool(fleet.servers)
    print_table(("BOT", *(("SERVER",) if many else ()), "STATUS", "DATABASE", "SIZE", "CONN", "LIMIT", "POOL"), [
        (r["bot"], *((r["server"],) if many else ()), r["status"], r["database"], _size(r["size_bytes"]),
         str(r["connections"]), "-" if r["connection_limit"] is None else str(r["connection_limit"]), r["pool"] or "-")
        for r in rows
    ])


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns on stdout, two spaces apart."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _embedded(project: Path):
    from .embedded import EmbeddedServer

    return EmbeddedServer(_project(project) / ".botfleet")


@server_app.command("status")
@command
def server_status(as_json: JsonOpt = False, project: ProjectOpt = None) -> None:  # type: ignore[assignment]
    """Show whether the embedded server is initialised and running, and where.

    Example: provision server status
    """
    st = _embedded(project).status()
    if as_json:
        typer.echo(json.dumps(st.as_dict(), indent=2))
        return
    state = "running" if st.running else ("stopped" if st.initialized else "not created yet")
    typer.echo(f"embedded PostgreSQL {st.version or ''}: {state}".replace("  ", " "))
    typer.echo(f"  data   {st.pgdata}")
    if st.running:
        typer.echo(f"  pid    {st.pid}")
        typer.echo(f"  port   127.0.0.1:{st.port} (bots, scram-sha-256)")


@server_app.command("start")
@command
def server_start(project: ProjectOpt = None) -> None:  # type: ignore[assignment]
    """Create (first time) and start the embedded server. Other commands do this on demand.

    Example: provision server start
    """
    server = _embedded(project)
    _say("starting embedded PostgreSQL (first start initialises it)...")
    st = server.start()
    typer.echo(f"embedded PostgreSQL {st.version}: running on 127.0.0.1:{st.port}, data in {st.pgdata}")


@server_app.command("stop")
@command
def server_stop(project: ProjectOpt = None) -> None:  # type: ignore[assignment]
    """Stop the embedded server (its data is kept; the next command starts it again).

    Example: provision server stop
    """
    stopped = _embedded(project).stop()
    typer.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")


# Command groups kept in their own modules register themselves on `app` when
# imported (they import only typer at module level, so --help stays fast).
from . import cli_compose, cli_fleet, cli_migrate, cli_ops  # noqa: E402,F401


def main() -> None:
    """Console entry point: usage errors become the same one red line as every other error.

    Typer vendors its click, so its usage errors are recognised by shape
    (``format_message`` and exit code 2) rather than by a private class.
    """
    logging.basicConfig(level=os.environ.get("BOTFLEET_LOG", "WARNING"))
    try:
        code = app(standalone_mode=False)
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
            typer.secho(f"error: {err.format_message()}{hint}", err=True, fg=typer.colors.RED)
            code = 2
        else:
            raise
    sys.exit(code if isinstance(code, int) else 0)
