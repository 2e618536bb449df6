"""`provision` commands for migrations: migrate, current, history, revision, downgrade, check, new-bot."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, BotsArg, JsonOpt, MigrationBar, ProjectOpt, app, command, confirm_or_refuse, fail, print_json,
    print_table, project_of, rev, say, servers_of,
)

LockWaitOpt = Annotated[
    float, typer.Option("--lock-wait", help="Seconds to wait for another migrator of the same bot (0: fail at once).")
]


def _outcome_table(outcomes) -> None:
    print_table(("BOT", "RESULT", "FROM", "TO", "TIME"), [
        (o.bot, o.status, rev(o.from_rev) if o.status != "skipped" else "-",
         rev(o.to_rev) if o.status != "skipped" else "-", f"{o.seconds * 1000:.0f} ms")
        for o in outcomes
    ])
    for o in outcomes:
        if o.error:
            typer.secho(("error: " if o.status == "failed" else "note: ") + o.error, err=True,
                        fg=typer.colors.RED if o.status == "failed" else typer.colors.YELLOW)


@app.command("migrate")
@command
def migrate_cmd(
    bots: BotsArg = None,
    all_bots: Annotated[bool, typer.Option("--all", help="Every bot in the registry.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Bots migrated at once (worker processes).",
                                                show_default="CPUs x2, at most 8")] = None,
    to: Annotated[str, typer.Option("--to", help="Target revision.")] = "head",
    sql_only: Annotated[bool, typer.Option("--sql", help="Print the SQL instead of running it.")] = False,
    bot_urls: Annotated[bool, typer.Option("--bot-urls", help="Connect with each bot's own DATABASE_URL from its env "
                                           "file (inside the compose network) instead of via its server's admin address; "
                                           "with --admin-url, the default server's bots still go there (behind PgBouncer).")] = False,
    lock_wait: LockWaitOpt = 60.0,
    replay: Annotated[bool, typer.Option("--replay/--no-replay", help="To head: Alembic migrates the first bot of each "
                                         "code and the code's other bots starting at the same revision run the SQL it "
                                         "ran (kept only when no migration read the database and none named that bot), "
                                         "each in one transaction under its lock. --no-replay: Alembic for every bot.")] = True,
    self_: Annotated[bool, typer.Option("--self", help="Inside a bot's container: migrate that bot alone, as its role, "
                                        "with its own DATABASE_URL (or DATABASE_URL_FILE) and BOTFLEET_BOT/BOTFLEET_CODE; "
                                        "no fleet.toml, no admin.")] = False,
    check: Annotated[bool, typer.Option("--check", help="With --self: migrate nothing, exit 1 unless the bot's "
                                        "database is at the target (how the stack's bots wait for their schema).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Bring bots to the head of their migrations, each as its OWN role, several at once.

    One bot's failure never stops the others (exit code 1 if any failed); a
    failed bot is rolled back to where it was.

    Example: provision migrate --all --jobs 4
    """
    from .. import commands

    if self_:
        _migrate_self(project, to, lock_wait, as_json, check)
        return
    proj = project_of(project)
    servers = servers_of(proj, admin_url)
    if sql_only:
        scripts, early = commands.migrate_sql(proj, servers, bots or [], all_bots=all_bots, to=to, bot_urls=bot_urls)
        for script in scripts:
            typer.echo(f"-- bot {script.bot} (database {script.database}, code {script.package}): "
                       f"{rev(script.current)} -> {to}")
            typer.echo(script.sql)
        for o in early:
            typer.secho(f"note: {o.error}", err=True, fg=typer.colors.YELLOW)
        if any(not o.ok for o in early):
            raise typer.Exit(1)
        return
    with MigrationBar(quiet=as_json) as on_done:
        results = commands.migrate(proj, servers, bots or [], all_bots=all_bots, to=to, jobs=jobs, bot_urls=bot_urls,
                                   lock_wait=lock_wait, on_done=on_done, replay=replay)
    if as_json:
        print_json([o.as_dict() for o in results])
    elif not results:
        typer.echo("no bots in the registry: provision add-bot NAME")
    else:
        _outcome_table(results)
    if any(not o.ok for o in results):
        raise typer.Exit(1)


def _migrate_self(project, to: str, lock_wait: float, as_json: bool, check: bool) -> None:
    import os
    from pathlib import Path

    from .. import commands
    from ..errors import InvalidInput

    bot, code = os.environ.get("BOTFLEET_BOT", ""), os.environ.get("BOTFLEET_CODE", "")
    url, url_file = os.environ.get("DATABASE_URL"), os.environ.get("DATABASE_URL_FILE")
    if not bot or not code or bool(url) == bool(url_file):
        raise InvalidInput("migrate --self needs BOTFLEET_BOT, BOTFLEET_CODE and one of DATABASE_URL or DATABASE_URL_FILE")
    if url_file:
        url = Path(url_file).read_text(encoding="utf-8").strip()
    root = (project or Path.cwd()).resolve()
    outcome = commands.migrate_self(root, bot, code, url or "", to=to, check=check, lock_wait=lock_wait)
    if outcome is None:
        say(f"{bot}: code {code} has no migrations")
        return
    if as_json:
        print_json(outcome.as_dict())
    else:
        say(f"{bot}: {outcome.status}: {rev(outcome.from_rev)} -> {rev(outcome.to_rev)}")
    if not outcome.ok:
        raise typer.Exit(1) if as_json else fail(outcome.error or f"{bot}: migration failed", 1)


@app.command("current")
@command
def current_cmd(
    bots: BotsArg = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Each bot's migration revision against its code's head.

    Example: provision current hello-bot
    """
    from .. import commands

    proj = project_of(project)
    rows = commands.current(proj, servers_of(proj, admin_url, read_only=True), bots or [])
    if as_json:
        print_json(rows)
        return
    print_table(("BOT", "CODE", "CURRENT", "HEAD", "STATE"),
                [(r["bot"], r["code"] or "-", rev(r["current"]), rev(r["head"]), r["state"]) for r in rows])
    if any(r["state"].startswith("error") for r in rows):
        raise typer.Exit(1)


@app.command("history")
@command
def history_cmd(
    name: Annotated[str, typer.Argument(help="A bot (its code's history, its revision marked) or a code under bots/.",
                                        show_default=False)],
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """The revisions of a bot's code, newest first; the bot's current one is marked.

    Example: provision history chat-bot
    """
    from .. import commands

    proj = project_of(project)
    found = commands.history(proj, servers_of(proj, admin_url), name)
    if as_json:
        print_json({"code": found.package, "current": found.current, "revisions": found.revisions})
        return
    for r in found.revisions:
        marks = [m for m in ("head", "current") if r[m]]
        typer.echo(f"{rev(r['down_revision'])} -> {r['revision']}{' (' + ', '.join(marks) + ')' if marks else ''}  "
                   f"{r['doc']}".rstrip())
    if found.current is None:
        typer.echo("(the bot's database is at base: never migrated)")


@app.command("revision")
@command
def revision_cmd(
    code: Annotated[str, typer.Argument(help="A bot code under bots/ (shared by all its instances).", show_default=False)],
    message: Annotated[str, typer.Option("--message", "-m", help="What the revision does.", show_default=False)],
    autogenerate: Annotated[bool, typer.Option("--autogenerate", help="Fill it from the difference between the "
                                                "models and the migrations (on a scratch database).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Write a new migration for a bot's code into migrations/CODE/versions/.

    With --autogenerate its operations come from the models; nothing is
    written when the models already match the migrations.

    Example: provision revision hello-bot -m "add users.bio" --autogenerate
    """
    from .. import commands

    proj = project_of(project)
    path = commands.revision(proj, servers_of(proj, admin_url), code, message, autogenerate=autogenerate)
    shown = None if path is None else str(path.relative_to(proj.root) if path.is_relative_to(proj.root) else path)
    if as_json:
        print_json({"code": code, "written": shown})
    elif shown is None:
        typer.echo(f"{code}: models and migrations agree; no revision written")
    else:
        typer.echo(f"wrote {shown}")


@app.command("downgrade")
@command
def downgrade_cmd(
    name: Annotated[str, typer.Argument(help="The bot.", show_default=False)],
    revision: Annotated[str, typer.Argument(help="Target revision (an id, a unique prefix, or 'base').", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    no_backup: Annotated[bool, typer.Option("--no-backup", help="Skip the pg_dump backup taken first.")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Undo a bot's migrations down to REVISION, as its own role, after a pg_dump backup.

    Downgrades usually drop columns or tables: it asks first (or needs --yes).

    Example: provision downgrade chat-bot base --yes
    """
    from .. import commands
    from ..errors import InvalidInput

    proj = project_of(project)
    if name not in proj.fleet.bots:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    if not yes:
        confirm_or_refuse(f"Downgrade {name!r} to {revision} (after a backup: {not no_backup})?",
                          f"downgrade {name} {revision} may drop data: pass --yes to confirm")
    outcome = commands.downgrade(proj, servers_of(proj, admin_url), name, revision, backup=not no_backup, progress=say)
    if as_json:
        print_json(outcome.as_dict())
    else:
        _outcome_table([outcome])
    if not outcome.ok:
        raise typer.Exit(1)


@app.command("check")
@command
def check_cmd(
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """CI gate: exit 1 when any code's models and migrations disagree, or any bot is not at head.

    Models are compared with a scratch database migrated to head (created and
    dropped on the admin's server); bots' databases are only read.

    Example: provision check
    """
    from .. import commands

    proj = project_of(project)
    findings = commands.check(proj, servers_of(proj, admin_url))
    if as_json:
        print_json(findings)
    elif not findings:
        typer.secho("ok: models match migrations and every bot is at head", fg=typer.colors.GREEN)
    else:
        for f in findings:
            typer.echo(f"{f['what']}: {f['finding']}\n  fix: {f['fix']}")
    if findings:
        raise typer.Exit(1)


@app.command("new-bot")
@command
def new_bot_cmd(
    name: Annotated[str, typer.Argument(help="The new bot code: 1-40 of a-z 0-9 '-', starting with a letter.",
                                        show_default=False)],
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Scaffold bots/NAME (models, repository, entry point) and migrations/NAME with its first revision.

    Never overwrites a file: running it again only adds what is missing.

    Example: provision new-bot weather-bot && provision add-bot weather-bot
    """
    from .. import commands

    proj = project_of(project)
    written = [str(p.relative_to(proj.root)) for p in commands.new_bot(proj, name)]
    if as_json:
        print_json({"code": name, "written": written})
        return
    if not written:
        typer.echo(f"{name}: already scaffolded; nothing written")
        return
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"next: provision add-bot {name}")
