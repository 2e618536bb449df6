"""`provision` commands for a bot's data: backup, restore."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, AllOpt, BotsArg, JsonOpt, ProjectOpt, app, command, fail, print_json, print_table, project_of, say,
    servers_of, size,
)


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
    from .. import commands
    from ..errors import InvalidInput

    proj = project_of(project)
    chosen = commands.chosen_bots(proj, bots or [], all_bots=all_bots)
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    if not chosen:
        typer.echo("no bots in the registry: provision add-bot NAME")
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


@app.command("restore")
@command
def restore_cmd(
    name: Annotated[str, typer.Argument(help="The bot whose database receives the backup.", show_default=False)],
    file: Annotated[Path, typer.Argument(help="A pg_dump -Fc file, e.g. from provision backup.", show_default=False,
                                         dir_okay=False)],
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

    Example: provision restore hello-bot backups/hello-bot/hello-bot-20250101T020000000000Z.dump
    """
    from .. import commands

    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            return False
        if not typer.confirm(question, default=False):
            raise fail("aborted; nothing was changed", 1)
        return True

    proj = project_of(project)
    result = commands.restore(proj, servers_of(proj, admin_url), name, file.expanduser().resolve(), confirm=confirm,
                              require_checksum=not no_checksum, from_bot=from_bot, progress=say)
    if as_json:
        print_json(result.as_dict())
        return
    typer.secho(f"{name}: restored", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  from       {result.file}" + ("  (checksum verified)" if result.checksum_verified else ""))
    typer.echo(f"  into       {result.database} as {result.role}: {result.objects} objects, {result.tables} tables")
    if result.safety_backup:
        typer.echo(f"  replaced   {len(result.replaced)} objects; they are in {result.safety_backup}")
