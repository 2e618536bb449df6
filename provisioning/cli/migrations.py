"""`provision` commands for migrations: migrate, current, history, revision, downgrade, check, new-bot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import AdminUrlOpt, JsonOpt, ProjectOpt, _connect, _fail, _project, _say, app, command, print_table

BotsArg = Annotated[Optional[list[str]], typer.Argument(help="Bots (names in fleet.toml).", show_default=False)]
LockWaitOpt = Annotated[
    float, typer.Option("--lock-wait", help="Seconds to wait for another migrator of the same bot (0: fail at once).")
]


def _server_url(root: Path, admin_url: str | None, bots: list[str] | None = None) -> str | None:
    """The default server's URL, to reach its bots on, announced; no admin connection is
    opened. None when none of ``bots`` (None: the whole registry) lives there, so a fleet
    living on [servers.NAME] only never starts the embedded server for nothing."""
    from .registry import DEFAULT_SERVER, Registry
    from .server import choose

    fleet = Registry(root).load()
    if fleet.servers:
        chosen = [fleet.bots[b] for b in (bots or fleet.bots) if b in fleet.bots]
        if not any(fleet.server_of(e) == DEFAULT_SERVER for e in chosen):
            return None
    choice = choose(root, admin_url)
    _say(choice.banner())
    return choice.url


def _rev(rev: str | None) -> str:
    """A revision for a table: "base" for None, "?" when it could not be read."""
    return rev[:12] if rev else "base"


def _outcome_table(outcomes) -> None:
    print_table(("BOT", "RESULT", "FROM", "TO", "TIME"), [
        (o.bot, o.status, _rev(o.from_rev) if o.status != "skipped" else "-",
         _rev(o.to_rev) if o.status != "skipped" else "-", f"{o.seconds * 1000:.0f} ms")
        for o in outcomes
    ])
    for o in outcomes:
        if o.error:
            typer.secho(("error: " if o.status == "failed" else "note: ") + o.error, err=True,
                        fg=typer.colors.RED if o.status == "failed" else typer.colors.YELLOW)


def run_migrations(targets, dest: str, jobs: int | None, lock_wait: float, quiet: bool = False):
    """Migrate with a progress bar on stderr (hidden with --json)."""
    from .migrate import migrate_many

    if quiet or not targets:
        return migrate_many(targets, dest, jobs=jobs, lock_wait=lock_wait)
    with typer.progressbar(length=len(targets), label="migrating", file=sys.stderr,
                           item_show_func=lambda o: o.bot if o else None) as bar:
        def done(outcome) -> None:
            bar.current_item = outcome
            bar.update(1)

        return migrate_many(targets, dest, jobs=jobs, lock_wait=lock_wait, on_done=done)


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
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Bring bots to the head of their migrations, each as its OWN role, several at once.

    One bot's failure never stops the others (exit code 1 if any failed); a
    failed bot is rolled back to where it was.

    Example: provision migrate --all --jobs 4
    """
    from .errors import InvalidInput
    from .fleet import Project
    from .migrate import current_revision, offline_sql, plan_targets

    if bool(bots) == all_bots:
        raise InvalidInput("name the bots to migrate, or pass --all (not both)")
    if jobs is not None and not 1 <= jobs <= 64:
        raise InvalidInput("--jobs must be between 1 and 64")
    root = _project(project)
    url = admin_url if bot_urls else _server_url(root, admin_url, None if all_bots else bots)
    targets, early = plan_targets(Project(root), bots or [], all_bots=all_bots, admin_url=url, bot_urls=bot_urls)
    if sql_only:
        for target in targets:
            current = current_revision(target.conninfo)
            typer.echo(f"-- bot {target.bot} (database {target.database}, code {target.package}): "
                       f"{_rev(current)} -> {to}")
            typer.echo(offline_sql(target, current, to))
        for o in early:
            typer.secho(f"note: {o.error}", err=True, fg=typer.colors.YELLOW)
        if any(not o.ok for o in early):
            raise typer.Exit(1)
        return
    outcomes = run_migrations(targets, to, jobs, lock_wait, quiet=as_json)
    results = sorted(outcomes + early, key=lambda o: o.bot)
    if as_json:
        typer.echo(json.dumps([o.as_dict() for o in results], indent=2))
    else:
        if not results:
            typer.echo("no bots in the registry: provision add-bot NAME")
        else:
            _outcome_table(results)
    if any(not o.ok for o in results):
        raise typer.Exit(1)


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
    from .fleet import Project
    from .migrate import current_revision, head_of, plan_targets, script_directory, one_line

    root = _project(project)
    url = _server_url(root, admin_url, bots or None)
    targets, early = plan_targets(Project(root), bots or [], all_bots=not bots, admin_url=url)
    rows = []
    for t in targets:
        row = {"bot": t.bot, "code": t.package, "current": None, "head": None, "state": ""}
        try:
            row["head"] = head_of(script_directory(t.root, t.package), t.package)
            row["current"] = current_revision(t.conninfo)
            row["state"] = _state(t, row["current"], row["head"])
        except Exception as err:  # noqa: BLE001 - reported per bot
            row["state"] = f"error: {one_line(err)}"
        rows.append(row)
    rows += [{"bot": o.bot, "code": None, "current": None, "head": None, "state": o.error or o.status} for o in early]
    rows.sort(key=lambda r: r["bot"])
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(("BOT", "CODE", "CURRENT", "HEAD", "STATE"),
                [(r["bot"], r["code"] or "-", _rev(r["current"]), _rev(r["head"]), r["state"]) for r in rows])
    if any(r["state"].startswith("error") for r in rows):
        raise typer.Exit(1)


def _state(target, current: str | None, head: str | None) -> str:
    from .migrate import _unknown, script_directory

    script = script_directory(target.root, target.package)
    if current == head:
        return "at head"
    if current is not None and _unknown(script, current):
        return "ahead of the code (unknown revision)"
    behind = [r for r in script.iterate_revisions(head, current or "base")]
    return f"behind by {len(behind)}"


@app.command("history")
@command
def history_cmd(
    name: Annotated[str, typer.Argument(help="A bot (its code's history, its revision marked) or a code under bots/.",
                                        show_default=False)],
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """The revisions of a bot's code, newest first; the bot's current one is marked.

    Example: provision history chat-bot
    """
    from . import codes
    from .fleet import Project
    from .migrate import current_revision, plan_targets, script_directory

    root = _project(project)
    fleet = Project(root).registry.load()
    current = "?"
    if name in fleet.bots:
        found = codes.with_migrations(root, fleet.bots[name].code)
        targets, early = plan_targets(Project(root), [name], all_bots=False,
                                      admin_url=_server_url(root, admin_url, [name]))
        if targets:
            current = current_revision(targets[0].conninfo)
    else:
        found = codes.with_migrations(root, name)
    script = script_directory(str(root), found.package)
    heads = set(script.get_heads())
    for rev in script.walk_revisions():
        marks = [m for m, on in (("head", rev.revision in heads), ("current", rev.revision == current)) if on]
        down = rev.down_revision if isinstance(rev.down_revision, str) or rev.down_revision is None else ",".join(rev.down_revision)
        typer.echo(f"{_rev(down)} -> {rev.revision}{' (' + ', '.join(marks) + ')' if marks else ''}  {rev.doc or ''}".rstrip())
    if current is None:
        typer.echo("(the bot's database is at base: never migrated)")


@app.command("revision")
@command
def revision_cmd(
    code: Annotated[str, typer.Argument(help="A bot code under bots/ (shared by all its instances).", show_default=False)],
    message: Annotated[str, typer.Option("--message", "-m", help="What the revision does.", show_default=False)],
    autogenerate: Annotated[bool, typer.Option("--autogenerate", help="Fill it from the difference between the "
                                                "models and the migrations (on a scratch database).")] = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Write a new migration for a bot's code into migrations/CODE/versions/.

    With --autogenerate its operations come from the models; nothing is
    written when the models already match the migrations.

    Example: provision revision hello-bot -m "add users.bio" --autogenerate
    """
    from . import codes
    from .errors import InvalidInput
    from .revisions import new_revision

    if not message.strip() or "\n" in message:
        raise InvalidInput("-m needs a one-line message")
    root = _project(project)
    codes.with_migrations(root, code)  # bad input fails before any server starts
    if autogenerate:
        choice, conn, _info = _connect(root, admin_url)
        with conn:
            path = new_revision(conn, choice.url, root, code, message, autogenerate=True)
    else:
        path = new_revision(None, None, root, code, message, autogenerate=False)
    if path is None:
        typer.echo(f"{code}: models and migrations agree; no revision written")
        return
    typer.echo(f"wrote {path.relative_to(root) if path.is_relative_to(root) else path}")


@app.command("downgrade")
@command
def downgrade_cmd(
    name: Annotated[str, typer.Argument(help="The bot.", show_default=False)],
    revision: Annotated[str, typer.Argument(help="Target revision (an id, a unique prefix, or 'base').", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    no_backup: Annotated[bool, typer.Option("--no-backup", help="Skip the pg_dump backup taken first.")] = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Undo a bot's migrations down to REVISION, as its own role, after a pg_dump backup.

    Downgrades usually drop columns or tables: it asks first (or needs --yes).

    Example: provision downgrade chat-bot base --yes
    """
    from . import backup
    from .errors import InvalidInput
    from .fleet import Project
    from .migrate import migrate_one, plan_targets, resolve, script_directory, MigrationFailed

    root = _project(project)
    fleet = Project(root).registry.load()
    if name not in fleet.bots:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"downgrade {name} {revision} may drop data: pass --yes to confirm")
        if not typer.confirm(f"Downgrade {name!r} to {revision} (after a backup: {not no_backup})?", default=False):
            raise _fail("aborted; nothing was changed", 1)
    choice, conn, info = _connect(root, admin_url, server=fleet.server_of(fleet.bots[name]), fleet=fleet)
    with conn:
        targets, early = plan_targets(Project(root), [name], all_bots=False, admin_url=choice.url)
        if early:
            raise _fail(early[0].error or "cannot migrate", 1)
        target = targets[0]
        try:
            resolve(script_directory(target.root, target.package), target.package, revision)
        except MigrationFailed as err:
            raise InvalidInput(str(err)) from None
        if not no_backup:
            _say(f"backing up {target.database} with pg_dump")
            path = backup.dump(choice.url, target.database, Project(root).backups(name), name, server_major=info.major)
            _say(f"backup written: {path}")
    outcome = migrate_one(target, revision, downgrade=True)
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
    from . import codes
    from .fleet import Project
    from .migrate import current_revision, head_of, one_line, plan_targets, script_directory
    from .revisions import drift

    root = _project(project)
    findings: list[dict[str, str]] = []
    choice, conn, _info = _connect(root, admin_url)
    with conn:
        for package in codes.migration_codes(root):
            try:
                for diff in drift(conn, choice.url, root, package):
                    findings.append({"what": f"code {package}", "finding": f"models differ from migrations: {diff}",
                                     "fix": f"provision revision {package} -m '...' --autogenerate"})
            except Exception as err:  # noqa: BLE001 - reported, then the gate fails
                findings.append({"what": f"code {package}", "finding": one_line(err), "fix": "fix the migration"})
    targets, early = plan_targets(Project(root), [], all_bots=True, admin_url=choice.url)
    for o in early:
        if not o.ok:
            findings.append({"what": f"bot {o.bot}", "finding": o.error or o.status, "fix": f"provision add-bot {o.bot}"})
    for t in targets:
        try:
            head = head_of(script_directory(t.root, t.package), t.package)
            current = current_revision(t.conninfo)
        except Exception as err:  # noqa: BLE001
            findings.append({"what": f"bot {t.bot}", "finding": one_line(err), "fix": f"provision current {t.bot}"})
            continue
        if current != head:
            findings.append({"what": f"bot {t.bot}", "finding": f"database at {_rev(current)}, code head is {_rev(head)}",
                             "fix": f"provision migrate {t.bot}"})
    if as_json:
        typer.echo(json.dumps(findings, indent=2))
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
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Scaffold bots/NAME (models, repository, entry point) and migrations/NAME with its first revision.

    Never overwrites a file: running it again only adds what is missing.

    Example: provision new-bot weather-bot && provision add-bot weather-bot
    """
    from .scaffold import new_bot

    root = _project(project)
    written = new_bot(root, name)
    if not written:
        typer.echo(f"{name}: already scaffolded; nothing written")
        return
    for path in written:
        typer.echo(f"wrote {path.relative_to(root)}")
    typer.echo(f"next: provision add-bot {name}")
