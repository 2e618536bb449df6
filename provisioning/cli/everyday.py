"""`provision` commands an operator uses every day on one bot: info, env, run, psql; and --version.

As dokku-postgres and heroku pg have them: a bot's facts, its DATABASE_URL when asked,
its environment for a shell or a command on the host, a psql session as the bot.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import AdminUrlOpt, JsonOpt, ProjectOpt, app, command, print_json, project_of, rev, say, servers_of, size

NameArg = Annotated[str, typer.Argument(help="The bot (a name in fleet.toml).", show_default=False)]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"botfleet {version('botfleet')}")
        except PackageNotFoundError:
            typer.echo("botfleet (version unknown: not installed as a package)")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print botfleet's version and exit.", is_eager=True,
                                          callback=_version)] = False,
) -> None:
    """botfleet: many small bots on one shared PostgreSQL, each with its own isolated database and role."""


@app.command("info")
@command
def info_cmd(
    name: NameArg,
    url: Annotated[bool, typer.Option("--url", help="Print only the bot's DATABASE_URL from its env file, "
                                      "password included (this command's only secret; on stdout only).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """One bot in full: server, database, role, limits, pools, code, schema revision, size, sessions, env file, last backup.

    No password is shown, unless --url asks for the bot's DATABASE_URL.

    Example: provision info hello-bot --json
    """
    from .. import commands

    proj = project_of(project)
    if url:
        value = commands.bot_url(proj, name)
        if as_json:
            print_json({"bot": name, "database_url": value})
        else:
            typer.echo(value)
        return
    found = commands.bot_info(proj, servers_of(proj, admin_url), name)
    if as_json:
        print_json(found.as_dict())
        return
    _print_info(found)


def _print_info(found) -> None:
    typer.secho(f"{found.bot}: {found.status}", fg=typer.colors.GREEN if found.status == "ok" else typer.colors.YELLOW,
                bold=True)
    limits = f"{found.connection_limit} (registry)"
    if found.role_connection_limit is not None:
        limits += f", role {found.role_connection_limit}"
    if found.database_connection_limit is not None:
        limits += f", database {found.database_connection_limit}"
    backup = "none yet (provision backup " + found.bot + ")"
    if found.last_backup is not None:
        b = found.last_backup
        backup = f"{b.path}  ({_age(b.age_seconds)} ago, {size(b.size_bytes)})"
    revision = f"{rev(found.revision)} (head {rev(found.head)}): {found.revision_state}" if found.head \
        else f"{rev(found.revision)}: {found.revision_state}"
    for label, value in (
        ("server", f"{found.server}: {found.server_url}"),
        ("database", found.database),
        ("role", found.role),
        ("connection limit", limits),
        ("pool", f"{found.pool_size}+{found.max_overflow}"),
        ("replicas", str(found.replicas)),
        ("code", f"bots/{found.code_package}" if found.code_package else f"{found.code} (none under bots/ yet)"),
        ("revision", revision),
        ("size", size(found.size_bytes)),
        *((("quota", _quota(found)),) if found.max_size_bytes or found.quota_state.startswith("suspended") else ()),
        ("connections", "-" if found.connections is None else str(found.connections)),
        ("env file", found.env_file),
        ("DATABASE_URL", found.database_url or "none (provision add-bot " + found.bot + ")"),
        ("last backup", backup),
    ):
        typer.echo(f"  {label:<17} {value}")


def _quota(found) -> str:
    """The info line of a bot's storage quota: 2.0 GB, 45% used: ok."""
    if not found.max_size_bytes:
        return found.quota_state
    used = f", {found.quota_percent:.0f}% used" if found.quota_percent is not None else ""
    grown = ""
    if found.growth_bytes is not None and found.growth_since:
        sign = "-" if found.growth_bytes < 0 else "+"
        grown = f"; {sign}{size(abs(found.growth_bytes))} since {found.growth_since[:16].replace('T', ' ')} UTC"
    return f"{size(found.max_size_bytes)}{used}: {found.quota_state}{grown}"


def _age(seconds: int) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds // span} {unit}"
    return f"{seconds} s"


@app.command("env")
@command
def env_cmd(
    name: NameArg,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Print `export KEY=VALUE` lines of a bot's environment for a shell: DATABASE_URL and its settings.

    DATABASE_URL points where this host reaches the bot's server (its admin URL's
    host and port; the embedded server on 127.0.0.1), as the bot's role with its
    password; then the pool settings and the bot's own settings (config set),
    each value quoted for a POSIX shell. Nothing else goes to stdout.

    Example: eval "$(provision env hello-bot)" && python -m bots.hello_bot
    """
    from .. import commands

    proj = project_of(project)
    for line in commands.bot_env(proj, servers_of(proj, admin_url), name).export_lines():
        typer.echo(line)


@app.command("run")
@command
def run_cmd(
    name: NameArg,
    cmd: Annotated[Optional[list[str]], typer.Argument(help="The command and its arguments (after --).",
                                                       show_default=False, metavar="CMD")] = None,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Run a command on this host with a bot's DATABASE_URL and settings in its environment (heroku local, dokku run).

    The variables are the ones `provision env` prints (what the bot's container
    gets, with DATABASE_URL pointing where this host reaches its server); they go
    through the environment, never the command line. Exits with the command's
    status.

    Example: provision run hello-bot -- python -m bots.hello_bot
    """
    from .. import commands

    args = list(cmd or [])
    proj = project_of(project)
    raise typer.Exit(commands.bot_run(proj, servers_of(proj, admin_url), name, args, progress=say))


@app.command("psql")
@command
def psql_cmd(
    name: NameArg,
    psql_args: Annotated[Optional[list[str]], typer.Argument(help="Arguments for psql (after --).",
                                                             show_default=False, metavar="PSQL_ARGS")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Connect as the server's admin (its admin URL) into the "
                                        "bot's database, not as the bot's role; its search_path is "
                                        "pg_catalog,pg_temp (the bot's database defaults are not "
                                        "applied): name tables with their schema.")] = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Open psql in a bot's database as the bot's own role (dokku postgres:connect); --admin as the admin.

    The bot's password reaches psql through a temporary 0600 passfile (deleted
    afterwards), the admin's through the environment: never the command line.
    Without a terminal psql reads SQL from stdin. Exits with psql's status.

    Example: provision psql hello-bot -- -c 'select current_user'
    """
    from .. import commands

    args = list(psql_args or [])
    proj = project_of(project)
    raise typer.Exit(commands.bot_psql(proj, servers_of(proj, admin_url), name, args, admin=admin, progress=say))
