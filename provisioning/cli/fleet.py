"""`provision` commands for the fleet as a whole: plan, apply (fleet.toml as the declared state), doctor."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, IgnoreOpt, JsonOpt, MigrationBar, ProjectOpt, app, command, fail, print_json, project_of, say,
    servers_of,
)

PruneOpt = Annotated[bool, typer.Option("--prune", help="Also remove bots this project created (it holds their "
                                        "secrets/NAME.env) that fleet.toml no longer names, each after a pg_dump backup.")]
NoMigrateOpt = Annotated[bool, typer.Option("--no-migrate", help="Leave migrations out (neither planned nor run).")]


def _print_plan(fleet_plan) -> None:
    from ..declarative import SYMBOL

    for note in fleet_plan.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    if not fleet_plan.steps:
        typer.secho("nothing to do: the server and the files match fleet.toml", fg=typer.colors.GREEN)
        if fleet_plan.others:
            typer.echo(f"({len(fleet_plan.others)} other botfleet bot(s) on the server are not this project's: left alone)")
        return
    colors = {"+": typer.colors.GREEN, "~": typer.colors.YELLOW, "-": typer.colors.RED, ">": typer.colors.CYAN,
              "*": typer.colors.BLUE, "=": typer.colors.BRIGHT_BLACK}
    for step in fleet_plan.steps:
        sym = SYMBOL[step.action]
        where = "" if step.server == "default" or step.action == "file" else f"  (server {step.server})"
        typer.secho(f"{sym} {step.action:<8}{step.subject}{where}", fg=colors[sym], bold=step.action != "keep")
        for detail in step.details:
            typer.echo(f"    {detail}")
    typer.echo(f"plan: {fleet_plan.summary()}")


@app.command("plan")
@command
def plan_cmd(
    prune: PruneOpt = False,
    ignore_stray: IgnoreOpt = None,
    no_migrate: NoMigrateOpt = False,
    detailed_exitcode: Annotated[bool, typer.Option("--detailed-exitcode", help="Exit code 3 when there are changes "
                                                    "to apply (0: none), for CI and scripts.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """What `provision apply` would change so the server and the files match fleet.toml. Changes nothing.

    Lists bots to create, bots whose role, database or env file drifted from
    their entry (pools, replicas, limits, timeouts), bots behind their
    migrations, bots on the server that fleet.toml no longer names, and each
    compose file apply's re-render will write or delete. A bot whose database
    is at a revision its code does not know is a note, not a migration. A
    registry that cannot be applied (a bad name or value, a fleet over its
    budget) is exit code 2.

    Example: provision plan --prune
    """
    from .. import commands

    proj = project_of(project)
    fleet_plan = commands.plan(proj, servers_of(proj, admin_url, read_only=True), prune=prune, ignore=tuple(ignore_stray or ()),
                               migrations=not no_migrate, progress=say)
    if as_json:
        print_json(fleet_plan.as_dict())
    elif not fleet_plan.problems:
        _print_plan(fleet_plan)
    if fleet_plan.problems:
        raise fail(fleet_plan.refusal(), 2)
    if detailed_exitcode and fleet_plan.changes:
        raise typer.Exit(3)


@app.command("apply")
@command
def apply_cmd(
    prune: PruneOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before pruning.")] = False,
    ignore_stray: IgnoreOpt = None,
    no_migrate: NoMigrateOpt = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Bots migrated at once.",
                                                show_default="CPUs x2, at most 8")] = None,
    credentials_only: Annotated[bool, typer.Option(
        "--credentials-only", help="The compose stack's provisioning service: converge only the default server's "
        "bots, each with the password in its credentials file; write no file, prune nothing.")] = False,
    owns_server: Annotated[bool, typer.Option(
        "--owns-server", help="botfleet runs the default server (the compose stack's postgres): close its maintenance "
        "databases postgres and template1 to PUBLIC, so bots reach their own database only.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Make the server and the files match fleet.toml: the steps `provision plan` lists, and nothing else.

    Creates and converges bots with add-bot's own steps (passwords are kept),
    migrates them to head as their own roles, re-renders a rendered stack.
    Bots that fleet.toml no longer names are removed only with --prune, each
    after a pg_dump backup (asks first; --yes for scripts). One bot's failure
    does not stop the others (exit code 1). Running it again does nothing.

    Example: provision apply --prune --yes
    """
    from .. import commands
    from ..errors import InvalidInput

    def confirm(fleet_plan) -> bool:
        removals = ", ".join(s.subject for s in fleet_plan.of("remove"))
        if yes:
            return True
        if not sys.stdin.isatty():
            raise InvalidInput(f"apply --prune would remove {removals} (after backups): "
                               "pass --yes to confirm; nothing was changed")
        if not as_json:
            _print_plan(fleet_plan)
        if not typer.confirm(f"Remove {removals} (each backed up first)?", default=False):
            raise fail("aborted; nothing was changed", 1)
        return True

    proj = project_of(project)
    with MigrationBar(quiet=as_json) as on_migrated:
        applied = commands.apply(proj, servers_of(proj, admin_url), prune=prune, ignore=tuple(ignore_stray or ()),
                                 migrations=not no_migrate, jobs=jobs, credentials_only=credentials_only,
                                 owns_server=owns_server,
                                 confirm_removals=confirm, on_migrated=on_migrated, progress=say)
    if as_json:
        print_json(applied.as_dict())
    else:
        if not applied.results:
            typer.secho("nothing to do: the server and the files match fleet.toml", fg=typer.colors.GREEN)
        for r in applied.results:
            typer.secho(f"{'ok' if r.ok else 'FAILED':<7}{r.action:<8}{r.subject}  {r.detail}".rstrip(),
                        fg=typer.colors.GREEN if r.ok else typer.colors.RED)
        kept = applied.plan.of("keep")
        if kept:
            typer.echo(f"kept (not in fleet.toml; --prune removes them): {', '.join(s.subject for s in kept)}")
    if not applied.ok:
        raise typer.Exit(1)


def _who(finding) -> str:
    who = finding.bot or "fleet"
    return who if finding.server == "default" else f"{who} (server {finding.server})"


@app.command("doctor")
@command
def doctor_cmd(
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is safe (REVOKE, ALTER ROLE/DATABASE back to the "
                                      "registry, ALTER ... OWNER TO the bot, chmod). Never drops anything.")] = False,
    ignore_stray: IgnoreOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Audit the fleet's isolation against the registry; exit code 1 on any finding, each printed with its fix.

    Checks who may connect to each bot database (PUBLIC or another bot's role),
    role attributes, memberships between roles, objects not owned by the bot,
    connection limits, timeouts and guards, each database's size against its
    storage quota (an enforced one it keeps: provision quota enforce lifts it),
    env files (0600, URL matching the registry),
    bots missing on the server and botfleet databases or roles the registry does
    not know; roles that are members of a bot's role or hold privileges on its
    objects (default privileges too); a login as each bot with its env file's
    password; what killed runs left (temporary files, backups without a checksum,
    scratch databases). --fix repairs what is safe, then checks again.

    Example: provision doctor --fix
    """
    from .. import commands

    proj = project_of(project)
    report = commands.doctor(proj, servers_of(proj, admin_url, read_only=True), fix=fix, ignore=tuple(ignore_stray or ()), progress=say)
    if as_json:
        print_json({"ok": report.ok, "found": [f.as_dict() for f in report.found],
                    "fixed": [f.as_dict() for f in report.tried],
                    "remaining": [f.as_dict() for f in report.remaining], "notes": report.notes})
    else:
        for f in report.tried:
            colour = typer.colors.GREEN if f.status == "fixed" else typer.colors.RED
            typer.secho(f"{f.status}: {_who(f)}: {f.message}", fg=colour)
            typer.echo(f"    {f.fix}" + (f"  -> {f.error}" if f.error else ""))
        for f in report.remaining:
            typer.secho(f"finding: {_who(f)}: {f.message}", fg=typer.colors.YELLOW)
            typer.echo(f"    fix: {f.fix}" + ("  (provision doctor --fix does this)" if f.fixable and not fix else ""))
        for note in report.notes:
            typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
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
