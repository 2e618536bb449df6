"""`provision` commands for fleet operations: backup, restore, rotate-password, doctor."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import (
    AdminUrlOpt, JsonOpt, ProjectOpt, _connect, _each_server, _fail, _project, _say, _servers_to_visit, _size, app, command,
    print_table,
)

BotsArg = Annotated[Optional[list[str]], typer.Argument(help="Bots (names in fleet.toml).", show_default=False)]
AllOpt = Annotated[bool, typer.Option("--all", help="Every bot in the registry.")]


def _chosen(root: Path, names: list[str], *, all_bots: bool) -> list[str]:
    """The named bots (each valid and in the registry) or, with ``all_bots``, every
    registry bot. Bad input raises InvalidInput (exit 2) before any server is touched."""
    from .errors import InvalidInput
    from .fleet import Project
    from .names import validate

    if bool(names) == all_bots:
        raise InvalidInput("name the bots, or pass --all (not both)")
    for name in names:
        validate(name)
    fleet = Project(root).registry.load()
    unknown = [n for n in names if n not in fleet.bots]
    if unknown:
        raise InvalidInput(f"not in the fleet registry: {', '.join(unknown)} (see provision list)")
    return sorted(fleet.bots) if all_bots else list(dict.fromkeys(names))


@app.command("backup")
@command
def backup_cmd(
    bots: BotsArg = None,
    all_bots: AllOpt = False,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Then keep only each bot's N newest backups written by "
                                                "botfleet (older ones and their checksums are deleted).",
                                                show_default="keep all")] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Back up bots' databases: pg_dump -Fc into backups/NAME/NAME-<UTC time>.dump (mode 0600, a .sha256 beside it).

    Names sort by time. One bot's failure never stops the others (exit code 1 if
    any failed); --keep prunes only after that bot's new backup was written, and
    never touches files botfleet did not write.

    Example: provision backup --all --keep 7
    """
    from .backup import backup_bot
    from .errors import InvalidInput
    from .fleet import Project

    root = _project(project)
    chosen = _chosen(root, bots or [], all_bots=all_bots)
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    if not chosen:
        typer.echo("no bots in the registry: provision add-bot NAME")
        return
    fleet = Project(root).registry.load()
    servers: dict[str, tuple[str, int]] = {}  # server -> (admin URL, major), opened on first use
    results = []
    for i, bot in enumerate(chosen, 1):
        entry = fleet.bots[bot]
        where = fleet.server_of(entry)
        if where not in servers:
            choice, conn, info = _connect(root, admin_url, server=where, fleet=fleet)
            conn.close()  # pg_dump opens its own connections
            servers[where] = (choice.url, info.major)
        url, major = servers[where]
        _say(f"[{i}/{len(chosen)}] {bot}: pg_dump of {entry.database}")
        result = backup_bot(url, entry.database, Project(root).backups(bot), bot, server_major=major, keep=keep)
        results.append(result)
        if result.ok:
            _say(f"[{i}/{len(chosen)}] {bot}: {_size(result.size_bytes)} in {result.seconds:.1f}s"
                 + (f", pruned {len(result.pruned)} older" if result.pruned else ""))
        else:
            _say(f"[{i}/{len(chosen)}] {bot}: failed")
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print_table(("BOT", "RESULT", "FILE", "SIZE", "PRUNED"), [
            (r.bot, r.status, r.path or "-", _size(r.size_bytes), str(len(r.pruned))) for r in results
        ])
        for r in results:
            for path in r.pruned:
                typer.echo(f"  pruned {path}")
    for r in results:
        if not r.ok:
            typer.secho(f"error: {r.bot}: {r.error}", err=True, fg=typer.colors.RED)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


@app.command("restore")
@command
def restore_cmd(
    name: Annotated[str, typer.Argument(help="The bot whose database receives the backup.", show_default=False)],
    file: Annotated[Path, typer.Argument(help="A pg_dump -Fc file, e.g. from provision backup.", show_default=False,
                                         dir_okay=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Replace a database that is not empty (after backing it up).")] = False,
    no_checksum: Annotated[bool, typer.Option("--no-checksum", help="Accept a file without a .sha256 beside it "
                                              "(a dump botfleet did not write).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Restore a backup into a bot's database, as the bot's own role: every object belongs to the bot, no foreign grants.

    The file is checked first (its .sha256, and pg_restore --list). The restore
    is one transaction: if anything fails, the database is left as it was. A
    database that is not empty is replaced only after a yes (or --yes), and only
    after a backup of what it held; the bot's open sessions are ended.

    Example: provision restore hello-bot backups/hello-bot/hello-bot-20250101T020000000000Z.dump
    """
    from .errors import InvalidInput
    from .fleet import Project
    from .restore import restore

    root = _project(project)
    _chosen(root, [name], all_bots=False)  # bad input fails before any server is started
    path = file.expanduser().resolve()
    if not path.is_file():
        raise InvalidInput(f"no such backup file: {path}")

    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            return False
        if not typer.confirm(question, default=False):
            raise _fail("aborted; nothing was changed", 1)
        return True

    fleet = Project(root).registry.load()
    choice, conn, info = _connect(root, admin_url, server=fleet.server_of(fleet.bots[name]), fleet=fleet)
    with conn:
        result = restore(conn, info, choice.url, Project(root), name, path, confirm=confirm,
                         require_checksum=not no_checksum, progress=_say)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    typer.secho(f"{name}: restored", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  from       {result.file}" + ("  (checksum verified)" if result.checksum_verified else ""))
    typer.echo(f"  into       {result.database} as {result.role}: {result.objects} objects, {result.tables} tables")
    if result.safety_backup:
        typer.echo(f"  replaced   {len(result.replaced)} objects; they are in {result.safety_backup}")


@app.command("rotate-password")
@command
def rotate_cmd(
    bots: BotsArg = None,
    all_bots: AllOpt = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Give bots new generated passwords: env file rewritten atomically (0600), then only a SCRAM verifier sent.

    Open sessions keep working (a password is checked only when a session
    starts), but the bot's new connections need the new password: recreate its
    container right away with the command printed at the end. One bot's
    failure never stops the others (exit code 1 if any failed).

    Example: provision rotate-password hello-bot && docker compose up -d --force-recreate hello-bot
    """
    from .errors import ProvisionError
    from .fleet import Project
    from .rotation import recreate_command, rotate

    root = _project(project)
    chosen = _chosen(root, bots or [], all_bots=all_bots)
    if not chosen:
        typer.echo("no bots in the registry: provision add-bot NAME")
        return
    fleet = Project(root).registry.load()
    done, failed = [], []
    order = {bot: i for i, bot in enumerate(chosen, 1)}
    where = {bot: fleet.server_of(fleet.bots[bot]) for bot in chosen}
    with _each_server(root, fleet, admin_url, list(dict.fromkeys(where[b] for b in chosen))) as servers:
        for name, choice, conn, info in servers:
            for bot in (b for b in chosen if where[b] == name):
                _say(f"[{order[bot]}/{len(chosen)}] {bot}")
                try:
                    done.append(rotate(conn, info, choice.url, Project(root), bot, progress=_say))
                except ProvisionError as err:
                    failed.append((bot, str(err)))
    recreate = recreate_command([r.bot for r in done]) if done else None
    if as_json:
        typer.echo(json.dumps({"rotated": [r.as_dict() for r in done], "failed": [{"bot": b, "error": e} for b, e in failed],
                               "recreate": recreate}, indent=2))
    else:
        for r in done:
            typer.secho(f"{r.bot}: password rotated", fg=typer.colors.GREEN, bold=True)
            typer.echo(f"  env file  {r.env_file}  (0600, new password)")
            for change in r.changes:
                if change != "password rotated":
                    typer.echo(f"  repaired: {change}")
        if recreate:
            typer.echo("next: recreate the container(s) now; until then they can open no new connection:")
            typer.echo(f"  {recreate}")
    for bot, error in failed:
        typer.secho(f"error: {bot}: {error}", err=True, fg=typer.colors.RED)
    if failed:
        raise typer.Exit(1)


def _who(finding) -> str:
    who = finding.bot or "fleet"
    return who if finding.server == "default" else f"{who} (server {finding.server})"


@app.command("doctor")
@command
def doctor_cmd(
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is safe (REVOKE, ALTER ROLE/DATABASE back to the "
                                      "registry, ALTER ... OWNER TO the bot, chmod). Never drops anything.")] = False,
    ignore_stray: Annotated[Optional[list[str]], typer.Option(
        "--ignore-stray", metavar="GLOB",
        help="Bot names (glob, repeatable) that belong to another fleet on the same server: not reported as strays.",
        show_default=False)] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Audit the fleet's isolation against the registry; exit code 1 on any finding, each printed with its fix.

    Checks who may connect to each bot database (PUBLIC or another bot's role),
    role attributes, memberships between roles, objects not owned by the bot,
    connection limits and timeouts, env files (0600, URL matching the registry),
    bots missing on the server and botfleet databases or roles the registry does
    not know. --fix repairs what is safe, then checks again.

    Example: provision doctor --fix
    """
    from .doctor import Report, run
    from .fleet import Project

    root = _project(project)
    fleet = Project(root).registry.load()
    reports = []
    with _each_server(root, fleet, admin_url, _servers_to_visit(root, fleet, admin_url)) as servers:
        for i, (name, choice, conn, info) in enumerate(servers):
            reports.append(run(conn, info, choice.url, Project(root), repair=fix, ignore=tuple(ignore_stray or ()),
                               progress=_say, server=name, files=i == 0))
    report = Report([f for r in reports for f in r.found], [f for r in reports for f in r.tried],
                    [f for r in reports for f in r.remaining])
    if as_json:
        typer.echo(json.dumps({"ok": report.ok, "found": [f.as_dict() for f in report.found],
                               "fixed": [f.as_dict() for f in report.tried],
                               "remaining": [f.as_dict() for f in report.remaining]}, indent=2))
    else:
        for f in report.tried:
            colour = typer.colors.GREEN if f.status == "fixed" else typer.colors.RED
            typer.secho(f"{f.status}: {_who(f)}: {f.message}", fg=colour)
            typer.echo(f"    {f.fix}" + (f"  -> {f.error}" if f.error else ""))
        for f in report.remaining:
            typer.secho(f"finding: {_who(f)}: {f.message}", fg=typer.colors.YELLOW)
            typer.echo(f"    fix: {f.fix}" + ("  (provision doctor --fix does this)" if f.fixable and not fix else ""))
        fixed = sum(1 for f in report.tried if f.status == "fixed")
        if report.ok:
            typer.secho(f"doctor: no findings{f' ({fixed} fixed)' if fix else ''}", fg=typer.colors.GREEN, bold=True)
        else:
            auto = sum(1 for f in report.remaining if f.fixable)
            summary = f"doctor: {len(report.remaining)} finding(s)"
            summary += f", {fixed} fixed" if fix else (f", {auto} repaired by provision doctor --fix" if auto else "")
            typer.secho(summary, fg=typer.colors.RED, bold=True)
    if not report.ok:
        raise typer.Exit(1)
