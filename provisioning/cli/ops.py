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
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="-",
                                                  help="- writes one bot's dump to stdout instead (nothing else "
                                                  "on stdout, progress and its sha256 on stderr; refused when "
                                                  "stdout is a terminal).", show_default="backups/NAME/")] = None,
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

    Example: provision backup --all --keep 7
    """
    from .. import commands
    from ..errors import InvalidInput

    proj = project_of(project)
    chosen = commands.chosen_bots(proj, bots or [], all_bots=all_bots)
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    if output is not None:
        _backup_to_stdout(proj, admin_url, chosen, output, all_bots=all_bots, keep=keep, as_json=as_json)
        return
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
    file: Annotated[Path, typer.Argument(help="A pg_dump -Fc file, e.g. from provision backup; - reads the dump "
                                         "from stdin (with --no-checksum; --yes to replace a non-empty database).",
                                         show_default=False, dir_okay=False)],
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

    Example: provision restore hello-bot backups/hello-bot/hello-bot-20250101T020000000000Z.dump
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


@app.command("backups")
@command
def backups_cmd(
    name: Annotated[Optional[str], typer.Argument(help="Only this bot's dumps (a bot removed from fleet.toml too).",
                                                  show_default="every bot's")] = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """List the dumps in backups/: bot, file, size, age and checksum state (ok, missing, mismatch).

    Reads only (each file's sha256 is computed and compared with the .sha256
    beside it). A mismatch means the file is damaged or was changed: restore
    refuses it. Exit code 0 either way; a warning on stderr names the mismatches.

    Example: provision backups hello-bot --json
    """
    from .. import commands
    from .everyday import _age

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
