"""`provision` commands for the declarative fleet: plan, apply."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from .cli import AdminUrlOpt, JsonOpt, ProjectOpt, _each_server, _fail, _project, _say, _servers_to_visit, app, command

PruneOpt = Annotated[bool, typer.Option("--prune", help="Also remove bots this project created (it holds their "
                                        "secrets/NAME.env) that fleet.toml no longer names, each after a pg_dump backup.")]
IgnoreOpt = Annotated[
    Optional[list[str]],
    typer.Option("--ignore-stray", metavar="GLOB", help="Bot names (glob, repeatable) that belong to another fleet on "
                 "the same server: never listed, never pruned.", show_default=False),
]
NoMigrateOpt = Annotated[bool, typer.Option("--no-migrate", help="Leave migrations out (neither planned nor run).")]


def _print_plan(fleet_plan) -> None:
    from .declarative import SYMBOL

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


def _make_plan(links, root, prune: bool, ignore, no_migrate: bool):
    from .declarative import plan
    from .fleet import Project

    return plan(links, Project(root), prune=prune, ignore=tuple(ignore or ()), migrations=not no_migrate, progress=_say)


def _links(servers):
    from .declarative import ServerLink

    return [ServerLink(name, conn, info, choice.url) for name, choice, conn, info in servers]


def _migrate(project, url: str | None, fleet_plan, jobs: int | None, quiet: bool):
    """The plan's migrate steps: each bot to head as its own role, with migrate's progress bar."""
    from .cli_migrate import run_migrations
    from .declarative import MIGRATE, migration_results
    from .migrate import DEFAULT_LOCK_WAIT, plan_targets

    bots = [s.subject for s in fleet_plan.of(MIGRATE)]
    if not bots:
        return []
    targets, early = plan_targets(project, bots, all_bots=False, admin_url=url)
    return migration_results(run_migrations(targets, "head", jobs, DEFAULT_LOCK_WAIT, quiet=quiet) + early)


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
    migrations, bots on the server that fleet.toml no longer names, and the
    compose files a re-render would write. A registry that cannot be applied
    (a bad name or value, a fleet over its budget) is exit code 2.

    Example: provision plan --prune
    """
    from .fleet import Project

    root = _project(project)
    fleet = Project(root).registry.load()
    with _each_server(root, fleet, admin_url, _servers_to_visit(root, fleet, admin_url)) as servers:
        fleet_plan = _make_plan(_links(servers), root, prune, ignore_stray, no_migrate)
    if as_json:
        typer.echo(json.dumps(fleet_plan.as_dict(), indent=2))
    elif not fleet_plan.problems:
        _print_plan(fleet_plan)
    if fleet_plan.problems:
        raise _fail(fleet_plan.refusal(), 2)
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
    from .declarative import apply_files, apply_server
    from .errors import InvalidInput
    from .fleet import Project

    if jobs is not None and not 1 <= jobs <= 64:
        raise InvalidInput("--jobs must be between 1 and 64")
    root = _project(project)
    fleet = Project(root).registry.load()
    default_url = None
    with _each_server(root, fleet, admin_url, _servers_to_visit(root, fleet, admin_url)) as servers:
        links = _links(servers)
        default_url = next((link.url for link in links if link.name == "default"), None)
        fleet_plan = _make_plan(links, root, prune, ignore_stray, no_migrate)
        if fleet_plan.problems:
            raise _fail(fleet_plan.refusal(), 2)
        removals = [s.subject for s in fleet_plan.of("remove")]
        if removals and not yes:
            if not sys.stdin.isatty():
                raise InvalidInput(f"apply --prune would remove {', '.join(removals)} (after backups): "
                                   "pass --yes to confirm; nothing was changed")
            if not as_json:
                _print_plan(fleet_plan)
            if not typer.confirm(f"Remove {', '.join(removals)} (each backed up first)?", default=False):
                raise _fail("aborted; nothing was changed", 1)
        results = apply_server(links, Project(root), fleet_plan, progress=_say)
    # Migrations run in forked workers: after the admin connections are closed.
    results += _migrate(Project(root), default_url, fleet_plan, jobs, quiet=as_json)
    results += apply_files(Project(root))
    if as_json:
        typer.echo(json.dumps({"plan": fleet_plan.as_dict(), "results": [r.as_dict() for r in results]}, indent=2))
    else:
        if not results:
            typer.secho("nothing to do: the server and the files match fleet.toml", fg=typer.colors.GREEN)
        for r in results:
            typer.secho(f"{'ok' if r.ok else 'FAILED':<7}{r.action:<8}{r.subject}  {r.detail}".rstrip(),
                        fg=typer.colors.GREEN if r.ok else typer.colors.RED)
        kept = fleet_plan.of("keep")
        if kept:
            typer.echo(f"kept (not in fleet.toml; --prune removes them): {', '.join(s.subject for s in kept)}")
    if any(not r.ok for r in results):
        raise typer.Exit(1)
