"""`provision` commands for a bot's data: backup, restore."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, AllOpt, BotsArg, JsonOpt, ProjectOpt, app, command, confirm_or_refuse, fail, print_json, print_table,
    project_of, say, servers_of, size,
)


@app.command("backup")
@command
def backup_cmd(
    bots: BotsArg = None,
    all_bots: AllOpt = False,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Then keep only each bot's N newest backups written by "
                                                "botfleet (older ones and their checksums are deleted).",
                                                show_default="keep all")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="-",
                                                  help="- writes one bot's dump to stdout instead (nothing else "
                                                  "on stdout, progress and its sha256 on stderr; refused when "
                                                  "stdout is a terminal).", show_default="backups/NAME/")] = None,
    server: Annotated[bool, typer.Option("--server", help="A base backup of the whole server into its continuous "
                                         "archive (Barman) instead; sets the archive up on first use.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="The scheduled run (cron): dump only bots whose newest dump "
                                        "is older than [backup] dump_every, then keep their [backup] dump_keep "
                                        "newest.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Back up bots' databases: pg_dump -Fc into backups/NAME/NAME-<UTC time>.dump (mode 0600, a .sha256 beside it).

    Names sort by time. One bot's failure never stops the others (exit code 1 if
    any failed); --keep prunes only after that bot's new backup was written, and
    never touches files botfleet did not write. --output - streams one bot's dump
    to stdout (for ssh, a pipe or a file of your choosing), written only once
    pg_dump succeeded.

    --server takes a base backup of the whole server into its Barman archive
    (.botfleet/barman/), setting up the replication role, slot and WAL receiver
    on first use; see provision backups --server and provision recover.

    Example: provision backup --all --keep 7
    Example: provision backup --all --prune      (cron)
    Example: provision backup --server
    """
    from .. import commands
    from ..errors import InvalidInput

    proj = project_of(project)
    if server:
        if bots or all_bots or keep is not None or output is not None or prune:
            raise InvalidInput("--server backs up the whole server: no bot names, --all, --keep, --prune or --output")
        _server_backup(proj, admin_url, as_json)
        return
    if prune:
        if keep is not None:
            raise InvalidInput("--prune keeps [backup] dump_keep dumps per bot: leave out --keep")
        keep = proj.fleet.backup.dump_keep
    chosen = commands.chosen_bots(proj, bots or [], all_bots=all_bots)
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    if output is not None:
        _backup_to_stdout(proj, admin_url, chosen, output, all_bots=all_bots, keep=keep, as_json=as_json)
        return
    if not chosen:
        typer.echo("no bots in the registry: provision add-bot NAME")
        return
    if prune:
        from ..archiving import due_for_dump

        skipped = [b for b in chosen if not due_for_dump(proj, b)]
        for bot in skipped:
            say(f"{bot}: its newest dump is younger than [backup] dump_every ({proj.fleet.backup.dump_every}); skipped")
        chosen = [b for b in chosen if b not in skipped]
        if not chosen:
            if as_json:
                print_json([])
            return
    results = commands.backup(proj, servers_of(proj, admin_url), chosen, keep=keep, progress=say)
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        print_table(("BOT", "RESULT", "FILE", "SIZE", "PRUNED"), [
            (r.bot, r.status, r.path or "-", size(r.size_bytes), str(len(r.pruned))) for r in results
        ])
        for r in results:
            for path in r.pruned:
                typer.echo(f"  pruned {path}")
    for r in results:
        if not r.ok:
            typer.secho(f"error: {r.bot}: {r.error}", err=True, fg=typer.colors.RED)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def _server_backup(proj, admin_url: str | None, as_json: bool) -> None:
    from ..archiving import server_backup

    result = server_backup(proj, servers_of(proj, admin_url), progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    b = result.backup
    typer.secho(f"server {result.server}: base backup {b.backup_id} done", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  ended      {b.end_time}  ({size(b.size_bytes)}, {result.seconds:.1f} s)")
    typer.echo("  archive    .botfleet/barman/ (provision backups --server lists it)")


def _backup_to_stdout(proj, admin_url: str | None, chosen: list[str], output: str, *, all_bots: bool,
                      keep: int | None, as_json: bool) -> None:
    """backup NAME --output -: every refusal (exit 2) before pg_dump runs."""
    from .. import commands
    from ..errors import InvalidInput

    if output != "-":
        raise InvalidInput(f"--output takes only - (stdout), not {output!r}: backups to files go to backups/NAME/ "
                           "(provision backup NAME), or redirect: provision backup NAME --output - > FILE")
    if all_bots or len(chosen) != 1:
        raise InvalidInput("--output - writes one bot's dump: name exactly one bot")
    if keep is not None or as_json:
        raise InvalidInput("--output - writes only the dump on stdout: --keep and --json do not go with it")
    if sys.stdout.isatty():
        raise InvalidInput("stdout is a terminal: a dump is binary; redirect it (provision backup "
                           f"{chosen[0]} --output - > FILE) or pipe it")
    commands.backup_stream(proj, servers_of(proj, admin_url), chosen[0], sys.stdout.buffer, progress=say)


@app.command("restore")
@command
def restore_cmd(
    name: Annotated[str, typer.Argument(help="The bot whose database receives the backup.", show_default=False)],
    file: Annotated[Optional[Path], typer.Argument(help="A pg_dump -Fc file, e.g. from provision backup; - reads the dump "
                                         "from stdin (with --no-checksum; --yes to replace a non-empty database).",
                                         show_default=False, dir_okay=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", metavar="TIME", help="Instead of a file: the bot's database as "
                                              "it was at TIME (e.g. '2026-11-25 10:15:00+00'), from the server's "
                                              "archive (provision backups --server shows the window).",
                                              show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Replace a database that is not empty (after backing it up).")] = False,
    no_checksum: Annotated[bool, typer.Option("--no-checksum", help="Accept a file without a .sha256 beside it "
                                              "(a dump botfleet did not write).")] = False,
    from_bot: Annotated[Optional[str], typer.Option("--from-bot", help="The file is a dump of this other bot's database: "
                                                    "restore it into NAME all the same (its rows become NAME's).",
                                                    show_default=False)] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Restore a backup into a bot's database, as the bot's own role: every object belongs to the bot, no foreign grants.

    The file is checked first (its .sha256, and pg_restore --list). The restore
    is one transaction: if anything fails, the database is left as it was. A
    database that is not empty is replaced only after a yes (or --yes), and only
    after a backup of what it held; the bot's open sessions are ended.

    From stdin (-): the same checks and the same safety backup; there is no .sha256
    to check (pass --no-checksum) and no terminal to ask on (pass --yes to replace).

    --to TIME: the archive is recovered to TIME in a scratch server (stopped and
    removed afterwards), the bot's database dumped from it into backups/NAME/,
    and that dump restored as above; the other bots are not touched.

    Example: provision restore hello-bot backups/hello-bot/hello-bot-20250101T020000000000Z.dump
    Example: provision restore hello-bot --to '2026-11-25 10:15:00+00' --yes
    """
    from .. import commands
    from ..errors import InvalidInput

    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            return False
        if not typer.confirm(question, default=False):
            raise fail("aborted; nothing was changed", 1)
        return True

    proj = project_of(project)
    if (file is None) == (to is None):
        raise InvalidInput(f"give a backup file or --to TIME (not both): provision restore {name} FILE, or "
                           f"provision restore {name} --to '2026-11-25 10:15:00+00'")
    if to is not None:
        if from_bot or no_checksum:
            raise InvalidInput("--to restores the bot's own database from the archive: no --from-bot or --no-checksum")
        _restore_to(proj, admin_url, name, to, confirm, as_json)
        return
    assert file is not None
    if str(file) == "-":
        if sys.stdin.isatty():
            raise InvalidInput(f"restore {name} - reads a dump from stdin, which is a terminal: "
                               f"provision restore {name} - --no-checksum < FILE, or pipe one in")
        result = commands.restore_stream(proj, servers_of(proj, admin_url), name, sys.stdin.buffer,
                                         confirm=lambda _question: yes, require_checksum=not no_checksum,
                                         from_bot=from_bot, progress=say)
    else:
        result = commands.restore(proj, servers_of(proj, admin_url), name, file.expanduser().resolve(),
                                  confirm=confirm, require_checksum=not no_checksum, from_bot=from_bot, progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    typer.secho(f"{name}: restored", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  from       {result.file}" + ("  (checksum verified)" if result.checksum_verified else ""))
    typer.echo(f"  into       {result.database} as {result.role}: {result.objects} objects, {result.tables} tables")
    if result.safety_backup:
        typer.echo(f"  replaced   {len(result.replaced)} objects; they are in {result.safety_backup}")


def _restore_to(proj, admin_url: str | None, name: str, to: str, confirm, as_json: bool) -> None:
    from ..archiving import restore_to

    result = restore_to(proj, servers_of(proj, admin_url), name, to, confirm=confirm, progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    r = result.restore
    typer.secho(f"{name}: restored to {result.target}", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  from       base backup {result.backup_id} and the archived WAL ({result.seconds:.1f} s)")
    typer.echo(f"  dump       {result.dump}")
    typer.echo(f"  into       {r.database} as {r.role}: {r.objects} objects, {r.tables} tables")
    if r.safety_backup:
        typer.echo(f"  replaced   {len(r.replaced)} objects; they are in {r.safety_backup}")


@app.command("backups")
@command
def backups_cmd(
    name: Annotated[Optional[str], typer.Argument(help="Only this bot's dumps (a bot removed from fleet.toml too).",
                                                  show_default="every bot's")] = None,
    server: Annotated[bool, typer.Option("--server", help="The server's archive instead: its base backups, the "
                                         "recoverable window and the WAL receiver's health.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """List the dumps in backups/: bot, file, size, age and checksum state (ok, missing, mismatch).

    Reads only (each file's sha256 is computed and compared with the .sha256
    beside it). A mismatch means the file is damaged or was changed: restore
    refuses it. Exit code 0 either way; a warning on stderr names the mismatches.

    --server lists the base backups in the server's archive and the window a
    recovery can reach: from the end of the first base backup to the newest
    archived WAL.

    Example: provision backups hello-bot --json
    Example: provision backups --server
    """
    from .. import commands
    from .everyday import _age

    if server:
        if name:
            from ..errors import InvalidInput

            raise InvalidInput("--server lists the server's archive: no bot name")
        _server_backups(project_of(project), as_json)
        return

    found = commands.backups(project_of(project), name)
    if as_json:
        print_json([d.as_dict() for d in found])
    elif not found:
        typer.echo(f"no backups of {name} yet (provision backup {name})" if name
                   else "no backups yet (provision backup --all)")
    else:
        print_table(("BOT", "FILE", "SIZE", "AGE", "CHECKSUM"), [
            (d.bot, d.path, size(d.size_bytes), _age(d.age_seconds), d.checksum) for d in found
        ])
    bad = [d for d in found if d.checksum == "mismatch"]
    if bad:
        say(f"warning: {len(bad)} dump(s) do not match their .sha256 (damaged or changed): "
            + ", ".join(d.path for d in bad))


def _server_backups(proj, as_json: bool) -> None:
    from ..archiving import server_backups
    from .everyday import _age

    window = server_backups(proj)
    if as_json:
        print_json(window.as_dict())
        return
    if not window.backups:
        typer.echo("no base backup yet (provision backup --server)")
    else:
        print_table(("BACKUP", "BEGIN", "END", "SIZE", "WAL"), [
            (b.backup_id, b.begin_time or "-", b.end_time or "-", size(b.size_bytes), size(b.wal_bytes))
            for b in window.backups])
        typer.echo(f"recoverable: {window.start} .. {window.end}")
    h = window.health
    if h is not None:
        age = _age(h.last_wal_age_seconds) if h.last_wal_age_seconds is not None else "-"
        typer.echo(f"WAL receiver: {'running' if h.receiver_running else 'NOT running'}"
                   f"{' (synchronous)' if h.synchronous else ''}; newest WAL {h.last_wal or '-'}, {age} old")


@app.command("recover")
@command
def recover_cmd(
    server: Annotated[bool, typer.Option("--server", help="Recover the whole server (required: the one thing this "
                                         "command does).")] = False,
    to: Annotated[Optional[str], typer.Option("--to", metavar="TIME", help="The point in time, e.g. "
                                              "'2026-11-25 10:15:00+00' (with its time zone).",
                                              show_default="as far as the archive goes")] = None,
    into: Annotated[Optional[Path], typer.Option("--into", metavar="DIR", help="A new (or empty) folder for the "
                                                 "recovered data folder.", file_okay=False,
                                                 show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Recover the whole server from its archive into a NEW data folder, as it was at --to TIME.

    The live server is not touched: the recovered folder is a separate server,
    its WAL replayed to the target and promoted, then stopped, ready to start
    (e.g. pg_ctl -D DIR start, or point the embedded server's .botfleet/pgdata
    at it). Refused, with nothing changed, when TIME is outside the archive's
    window or in the future, when DIR is not empty, or when DIR's disk lacks
    the space. Without --to: up to the newest archived WAL, including the
    segment being streamed (after a crash: every acknowledged commit).

    Example: provision recover --server --to '2026-11-25 10:15:00+00' --into /srv/pg-recovered
    """
    from ..errors import InvalidInput
    from ..archiving import recover_plan, recover_server

    if not server:
        raise InvalidInput("recover works on the whole server: pass --server (one bot: provision restore NAME --to TIME)")
    if into is None:
        raise InvalidInput("--into DIR is required: a new folder for the recovered server")
    proj = project_of(project)
    dest = into.expanduser().absolute()
    archive, plan = recover_plan(proj, servers_of(proj, admin_url), to, dest, progress=say)
    question = (f"Recover server {archive.server} to {plan.target or 'the newest archived WAL'} from base backup "
                f"{plan.backup.backup_id} into {dest} (about {size(plan.need_bytes)})?")
    if not yes:
        confirm_or_refuse(question, "recover writes a new data folder: pass --yes to confirm; nothing was changed")
    result = recover_server(archive, plan, dest, progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    typer.secho(f"server {result.server}: recovered to {result.target or 'the newest archived WAL'}",
                fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  into       {result.into}  (from base backup {result.backup_id}, {result.seconds:.1f} s)")
    typer.echo(f"  start it   pg_ctl -D {result.into} -o '-p PORT' start   (as the data folder's owner)")
