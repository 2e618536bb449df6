"""`provision` commands for single bots and the embedded server: add-bot, remove-bot, list,
rotate-password, server status/start/stop."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, AllOpt, BotsArg, JsonOpt, ProjectOpt, app, command, confirm_by_typing, confirm_or_refuse, print_json,
    print_table, project_of, say, server_app, servers_of, size,
)


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
    db_host: Annotated[Optional[str], typer.Option(help="Host in the DATABASE_URL of the bot's env file, for running "
                                                   "it on the host (the compose stack always uses its server's "
                                                   "own address); 'default' goes back to its server's.",
                                                   show_default="its server's bot_host, 'postgres'")] = None,
    db_port: Annotated[Optional[str], typer.Option(help="Port in the DATABASE_URL of the bot's env file (1-65535); "
                                                   "'default' goes back to its server's.",
                                                   show_default="its server's bot_port, 5432")] = None,
    rotate_password: Annotated[bool, typer.Option("--rotate-password", help="Give an existing bot a new password.")] = False,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not run the bot's migrations to head.")] = False,
    server: Annotated[Optional[str], typer.Option("--server", help="Place a new bot on this server: 'default' or a "
                                                  "[servers.NAME] of fleet.toml.",
                                                  show_default="the one with the most headroom")] = None,
    publish: Annotated[Optional[str], typer.Option("--publish", help="Publish the bot's HTTP port 8000 in the compose "
                                                   "stack on PORT or ADDRESS:PORT of the host, for a reverse proxy "
                                                   "('' = not published).", show_default="not published")] = None,
    memory: Annotated[Optional[str], typer.Option("--memory", help="Memory limit of the bot's container (256M, 1G).",
                                                  show_default="its code's measured default")] = None,
    cpus: Annotated[Optional[str], typer.Option("--cpus", help="CPU limit of the bot's container (cores).",
                                                show_default="[server] bot_cpus, 0.5")] = None,
    temp_file_limit: Annotated[Optional[str], typer.Option(
        "--temp-file-limit", help="Role guard: temp file space one session may use (1GB; -1 no limit). Only a "
        "superuser admin can set it, and then the bot cannot lift it; 'default' = fleet.toml \\[defaults].",
        show_default="[defaults], else the server's")] = None,
    work_mem: Annotated[Optional[str], typer.Option(
        "--work-mem", help="Role guard: memory per sort or hash (4MB); 'default' = \\[defaults].",
        show_default="[defaults], else the server's")] = None,
    lock_timeout: Annotated[Optional[str], typer.Option(
        "--lock-timeout", help="Role guard: the longest wait for a lock (5s; 0 off); 'default' = \\[defaults].",
        show_default="[defaults], else the server's")] = None,
    idle_session_timeout: Annotated[Optional[str], typer.Option(
        "--idle-session-timeout", help="Role guard: end a session idle this long (1h; 0 off; PostgreSQL 14+); "
        "'default' = \\[defaults].", show_default="[defaults], else the server's")] = None,
    max_size: Annotated[Optional[str], typer.Option(
        "--max-size", help="Storage quota of the bot's database (2GB; 'none'); shown by list, info and doctor, "
        "enforced by provision quota enforce; 'default' = \\[defaults].",
        show_default="[defaults], else none")] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Create (or converge) one bot: an isolated database and login role, its 0600 env file, its registry entry.

    Running it again repairs drift and keeps the password unless --rotate-password.
    In a fleet with several servers a new bot goes to --server, or to the one with
    the most connection headroom; an existing bot stays where it is.

    Example: provision add-bot chat-bot --pool-size 2 --max-overflow 3 --publish 127.0.0.1:8081
    """
    from .. import commands

    opts = commands.BotOptions(
        pool_size=pool_size, max_overflow=max_overflow, replicas=replicas, statement_timeout=statement_timeout,
        idle_timeout=idle_timeout, code=code, db_host=db_host, db_port=db_port, rotate_password=rotate_password,
        server=server, publish=publish, memory=memory, cpus=cpus, temp_file_limit=temp_file_limit,
        work_mem=work_mem, lock_timeout=lock_timeout, idle_session_timeout=idle_session_timeout, max_size=max_size,
    )
    proj = project_of(project)
    result = commands.add_bot(proj, servers_of(proj, admin_url), name, opts, migrate=not no_migrate, progress=say)
    migration = result.migration
    if as_json:
        print_json(result.as_dict())
    else:
        _print_added(result)
    if migration is not None and not migration.ok:
        from .common import fail

        raise fail(f"{name} is provisioned but its migrations failed: {migration.error}; "
                   f"fix them and run: provision migrate {name}", 1)


def _print_added(result) -> None:
    typer.secho(f"{result.bot}: {result.status}", fg=typer.colors.GREEN, bold=True)
    for change in result.changes:
        typer.echo(f"  repaired: {change}")
    typer.echo(f"  database          {result.database}")
    typer.echo(f"  role              {result.role}")
    typer.echo(f"  connection limit  {result.connection_limit}")
    typer.echo(f"  env file          {result.env_file}" + ("  (new password)" if result.password_changed else ""))
    if not result.has_code:
        typer.echo(f"  code              none yet: database and role only (add bots/{result.code.replace('-', '_')}/)")
    else:
        typer.echo(f"  code              {result.code} (bots/{result.code.replace('-', '_')})")
    migration = result.migration
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
    forget: Annotated[bool, typer.Option("--forget", help="Drop its env file and fleet.toml entry even though the "
                                         "server reached has neither its database nor its role.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Back up (pg_dump -Fc into backups/NAME/), then drop a bot's database, role, env file and registry entry.

    Asks first (or needs --yes). Removing a bot that is already gone is harmless. A bot fleet.toml no longer names is removed from --server (default: the default server) only if that server holds its database or role; else nothing is removed, its env file is kept, and the error names the server that holds it. A bot fleet.toml names is refused the same way when its server has neither (the wrong server reached, e.g. ADMIN_DATABASE_URL unset): --forget drops its env file and entry anyway.

    Example: provision remove-bot hello-bot --yes
    """
    from .. import commands
    from ..names import validate

    validate(name)
    if not yes:
        what = "WITHOUT a backup" if no_backup else "after a pg_dump backup"
        confirm_by_typing(name, f"remove-bot drops {name}'s database, role and credentials {what}.",
                          f"remove-bot {name} drops its database: pass --yes to confirm")
    proj = project_of(project)
    result = commands.remove_bot(proj, servers_of(proj, admin_url), name, backup=not no_backup, server=server,
                                 forget=forget, progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    if result.status == "not provisioned":
        typer.echo(f"{name}: not provisioned; nothing to do")
        return
    typer.secho(f"{name}: removed", fg=typer.colors.GREEN, bold=True)
    if result.backup:
        typer.echo(f"  backup   {result.backup}")
    for item in result.dropped:
        typer.echo(f"  dropped  {item}")


@app.command("list")
@command
def list_cmd(
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Every bot in the registry with live facts: exists, size, connections in use / limit.

    Bot databases on the server that the registry does not know are flagged. When the
    server has a continuous archive, a last line gives its health (WAL receiver, newest
    WAL's age, last base backup).
    A fleet with several servers is listed across all of them (a SERVER column).

    Example: provision list --json
    """
    from .. import commands

    proj = project_of(project)
    streams: dict = {}
    rows = commands.list_bots(proj, servers_of(proj, admin_url, read_only=True), streams)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no bots yet: provision add-bot NAME")
        return
    many = bool(proj.fleet.servers)
    quotas = any(r["max_size_bytes"] or (r["quota_state"] or "").startswith("suspended") for r in rows)
    print_table(("BOT", *(("SERVER",) if many else ()), "STATUS", "DATABASE", "SIZE", *(("QUOTA",) if quotas else ()),
                 "CONN", "LIMIT", "POOL"), [
        (r["bot"], *((r["server"],) if many else ()), r["status"], r["database"], size(r["size_bytes"]),
         *((_quota_cell(r),) if quotas else ()),
         str(r["connections"]), "-" if r["connection_limit"] is None else str(r["connection_limit"]), r["pool"] or "-")
        for r in rows
    ])
    _archive_footer(proj, streams.get("default"))


def _archive_footer(proj, seen=None) -> None:
    """One line on the server's archive, when it has one (provision backups --server says more);
    ``seen``: the default server's view of an archive (archive.stream), e.g. the stack's service."""
    from ..archive import Archive
    from .everyday import _age

    archive = Archive(proj)
    if not archive.configured:
        if seen is not None:
            problem = seen.problem()
            lag = f", {_age(int(seen.lag_seconds))} behind" if seen.lag_seconds else ""
            typer.echo(f"archive: {'streaming' + lag if problem is None else 'not streaming: ' + problem}")
        return
    h = archive.health(synchronous=proj.fleet.backup.synchronous)
    wal = f"newest WAL {_age(h.last_wal_age_seconds)} old" if h.last_wal_age_seconds is not None else "no WAL yet"
    last = f"last base backup {_age(h.last_backup_age_seconds)} ago" if h.last_backup_age_seconds is not None else "no base backup"
    receiver = "receiver running" if h.receiver_running else "receiver NOT running (provision server start / backup --server)"
    typer.echo(f"archive: {receiver}, {wal}, {last}")


def _quota_cell(row) -> str:
    """A list row's QUOTA column: 2.0 GB (45%), with its state when it is not ok."""
    if not row["max_size_bytes"]:
        return row["quota_state"] if (row["quota_state"] or "").startswith("suspended") else "-"
    cell = f"{size(row['max_size_bytes'])} ({row['quota_percent']:.0f}%)" if row["quota_percent"] is not None \
        else size(row["max_size_bytes"])
    if row["growth_bytes"] is not None:
        cell += f" {'-' if row['growth_bytes'] < 0 else '+'}{size(abs(row['growth_bytes']))}"
    return cell if row["quota_state"] == "ok" else f"{cell} {row['quota_state']}"


@app.command("rotate-password")
@command
def rotate_cmd(
    bots: BotsArg = None,
    all_bots: AllOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --all: do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Give bots new generated passwords: env file rewritten atomically (0600), then only a SCRAM verifier sent.

    Open sessions keep working (a password is checked only when a session
    starts), but the bot's new connections need the new password: recreate its
    container right away with the command printed at the end. One bot's
    failure never stops the others (exit code 1 if any failed).

    --all asks first (or needs --yes).

    Example: provision rotate-password hello-bot && docker compose up -d --force-recreate hello-bot
    """
    from .. import commands

    proj = project_of(project)
    chosen = commands.chosen_bots(proj, bots or [], all_bots=all_bots)
    if not chosen:
        typer.echo("no bots in the registry: provision add-bot NAME")
        return
    if all_bots and not yes:
        confirm_or_refuse(f"Give all {len(chosen)} bots new passwords (each container then needs recreating)?",
                          "rotate-password --all changes every bot's password: pass --yes to confirm")
    result = commands.rotate_password(proj, servers_of(proj, admin_url), chosen, progress=say)
    if as_json:
        print_json(result.as_dict())
    else:
        for r in result.rotated:
            typer.secho(f"{r.bot}: password rotated", fg=typer.colors.GREEN, bold=True)
            typer.echo(f"  env file  {r.env_file}  (0600, new password)")
            for change in r.changes:
                if change != "password rotated":
                    typer.echo(f"  repaired: {change}")
        if result.recreate:
            typer.echo("next: recreate the container(s) now; until then they can open no new connection:")
            typer.echo(f"  {result.recreate}")
    for bot, error in result.failed:
        typer.secho(f"error: {bot}: {error}", err=True, fg=typer.colors.RED)
    if result.failed:
        raise typer.Exit(1)


@server_app.command("status")
@command
def server_status(as_json: JsonOpt = False, project: ProjectOpt = None) -> None:  # type: ignore[assignment]
    """Show whether the embedded server is initialised and running, and where.

    Example: provision server status
    """
    from .. import commands

    st = commands.embedded_server(project_of(project)).status()
    if as_json:
        print_json(st.as_dict())
        return
    state = "running" if st.running else ("stopped" if st.initialized else "not created yet")
    typer.echo(f"embedded PostgreSQL {st.version or ''}: {state}".replace("  ", " "))
    typer.echo(f"  data   {st.pgdata}")
    if st.running:
        typer.echo(f"  pid    {st.pid}")
        typer.echo(f"  port   127.0.0.1:{st.port} (bots, scram-sha-256)")
    elif st.port:
        typer.echo(f"  port   127.0.0.1:{st.port} (the fleet's; used again at the next start)")


@server_app.command("start")
@command
def server_start(
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    port: Annotated[Optional[int], typer.Option("--port", help="Move the fleet's server to this TCP port on 127.0.0.1 "
                                                "(it must be stopped; the new port is kept from then on).",
                                                show_default="the fleet's recorded port")] = None,
) -> None:
    """Create (first time) and start the embedded server. Other commands do this on demand.

    The fleet keeps the port of its first start (.botfleet/server.json). When something
    else holds it, the start is refused with who holds it: free the port, or move the
    server with --port (bots whose DATABASE_URL names the old port are listed).

    Example: provision server start
    """
    from .. import commands

    say("starting embedded PostgreSQL (first start initialises it)...")
    started = commands.server_start(project_of(project), port)
    if as_json:
        print_json(started.as_dict())
        return
    st = started.status
    typer.echo(f"embedded PostgreSQL {st.version}: running on 127.0.0.1:{st.port}, data in {st.pgdata}")
    if started.moved_from is not None:
        typer.secho(f"moved from port {started.moved_from} to {st.port}", fg=typer.colors.YELLOW, err=True)
        for bot in started.repoint:
            typer.secho(f"note: {bot}'s DATABASE_URL names port {started.moved_from}: "
                        f"provision add-bot {bot} --db-port {st.port}", fg=typer.colors.YELLOW, err=True)


@server_app.command("stop")
@command
def server_stop(as_json: JsonOpt = False, project: ProjectOpt = None) -> None:  # type: ignore[assignment]
    """Stop the embedded server (its data is kept; the next command starts it again) and its archive's WAL receiver.

    Example: provision server stop
    """
    from .. import commands

    from ..archive import Archive

    proj = project_of(project)
    stopped = commands.embedded_server(proj).stop()
    if Archive(proj).stop_receiver():
        say("the archive's WAL receiver stopped (the next start restarts it)")
    if as_json:
        print_json({"running": False, "was_running": stopped})
        return
    typer.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
