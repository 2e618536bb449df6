"""`provision plan` / `provision apply`: fleet.toml as the declared state of the fleet.

An operator edits the registry by hand (bots, pool sizes, replicas, timeouts,
[server] settings) or deletes a bot's table from it. ``plan`` compares the
registry with the server, the bots' env files, their migrations and the
rendered stack, and lists every step that ``apply`` would take. It only reads.
``apply`` takes exactly those steps, with the functions the single commands
use (add-bot's converge, remove-bot, migrate, render), so a bot converged by
``apply`` is indistinguishable from one set up by hand, and a second ``apply``
finds nothing to do.

What it never does on its own:
- remove a bot: a bot on the server that the registry no longer names is kept
  (and listed) unless ``--prune``, and then only after a pg_dump backup; a
  failed backup removes nothing;
- touch objects botfleet did not create (no marker comment), or another
  fleet's bots on the same server: only a bot whose env file this project
  still holds can be pruned (``ignore`` globs exclude more);
- change a password: a bot keeps the one in its env file (a missing env file
  means a new password, as with add-bot).

A registry that cannot be applied (an invalid name or option, a fleet over its
connection or memory budget, names taken by objects botfleet does not own) is
refused as a whole before any change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg

from . import databases, roles
from .db import AdminInfo, connect, with_database
from .errors import InvalidInput, ProvisionError
from .fleet import (
    BotOptions, Project, add_bot, check_options, database_spec, database_url, marker, remove_bot, render_env,
    role_spec, stored_password,
)
from .passwords import verifier_matches
from .files import read_env_file
from .names import validate
from .registry import DEFAULT_SERVER, BotEntry, Fleet

Progress = Callable[[str], None]

# Step actions, in the order apply takes them (and plan prints them).
CREATE, UPDATE, REMOVE, MIGRATE, FILE, KEEP = "create", "update", "remove", "migrate", "file", "keep"
SYMBOL = {CREATE: "+", UPDATE: "~", REMOVE: "-", MIGRATE: ">", FILE: "*", KEEP: "="}


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Step:
    action: str  # create | update | remove | migrate | file | keep (keep: nothing will be done)
    subject: str  # a bot name, or a file path for "file"
    details: list[str] = field(default_factory=list)
    server: str = DEFAULT_SERVER  # where a bot step happens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FleetPlan:
    steps: list[Step]
    problems: list[str]  # why the registry cannot be applied as it is; apply refuses while any exists
    # botfleet bots on the server that are neither in fleet.toml nor this project's
    # (no secrets/NAME.env): another fleet's. Never changed.
    others: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action != KEEP]

    def refusal(self) -> str:
        """Why this plan cannot be applied, in one line ("" when it can)."""
        return "; ".join(self.problems) + "; nothing was changed" if self.problems else ""

    def of(self, action: str) -> list[Step]:
        return [s for s in self.steps if s.action == action]

    def summary(self) -> str:
        counts = {a: len(self.of(a)) for a in (CREATE, UPDATE, MIGRATE, REMOVE, FILE)}
        words = {CREATE: "to create", UPDATE: "to update", MIGRATE: "to migrate", REMOVE: "to remove", FILE: "file(s) to write"}
        text = ", ".join(f"{n} {words[a]}" for a, n in counts.items())
        kept = len(self.of(KEEP))
        text += f"; {kept} not in fleet.toml kept (--prune removes them)" if kept else ""
        if self.others:
            text += f"; {len(self.others)} other botfleet bot(s) on the server are not this project's (left alone)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"steps": [s.as_dict() for s in self.steps], "problems": self.problems,
                "changes": len(self.changes), "others": self.others}


# --------------------------------------------------------------------------- plan

# add-bot's option names in its error messages -> the registry's keys.
_OPTION_KEYS = {"--pool-size": "pool_size", "--max-overflow": "max_overflow", "--replicas": "replicas",
                "--statement-timeout": "statement_timeout", "--idle-timeout": "idle_in_transaction_session_timeout",
                "--db-host": "db_host", "--db-port": "db_port"}


def _entry_problems(project: Project, admin: AdminInfo, entry: BotEntry) -> list[str]:
    """A hand-edited entry that add-bot would refuse, in add-bot's words."""
    where = f"fleet.toml: bot {entry.name!r}"
    try:
        names = validate(entry.name, admin_role=admin.role)
        check_options(BotOptions(
            pool_size=entry.pool_size, max_overflow=entry.max_overflow, replicas=entry.replicas,
            statement_timeout=entry.statement_timeout, idle_timeout=entry.idle_in_transaction_session_timeout,
            db_host=entry.db_host or None, db_port=entry.db_port or None,
        ))
    except InvalidInput as err:
        message = str(err)
        for flag, key in _OPTION_KEYS.items():
            message = message.replace(flag, key)
        return [f"{where}: {message}"]
    out = []
    if (entry.database, entry.role) != (names.database, names.role):
        out.append(f"{where}: database and role must be {names.database} and {names.role} "
                   "(botfleet derives them from the name; rename a bot by adding a new one)")
    return out


def _env_diff(path: Path, expected: str) -> list[str]:
    """How the env file differs from what add-bot would write (never showing the password)."""
    from .db import parse_url

    have = read_env_file(path)
    want = dict(line.split("=", 1) for line in expected.splitlines() if line and not line.startswith("#"))
    out = []
    h_url, w_url = parse_url(have.get("DATABASE_URL", "")), parse_url(want["DATABASE_URL"])
    for key in ("host", "port", "dbname"):
        if (h_url.get(key) or "") != (w_url.get(key) or ""):
            out.append(f"DATABASE_URL {key} {h_url.get(key) or '-'} -> {w_url.get(key)}")
    for key, value in want.items():
        if key != "DATABASE_URL" and have.get(key) != value:
            out.append(f"{key} {have.get(key, '-')} -> {value}")
    return out or ["rewritten in add-bot's format"]


@dataclass
class _Inside:
    """What plan reads inside one bot database, over one connection."""

    public_schema_open: bool = False
    revision: str | None = None
    error: str | None = None  # could not look inside


def _look_inside(admin_url: str, state: databases.DatabaseState | None, database: str) -> _Inside | None:
    """None when there is no database, or it refuses connections (apply re-allows them first)."""
    from .migrate import revision_of

    if state is None or not state.allow_connections:
        return None
    try:
        with connect(with_database(admin_url, database)) as db_conn:
            return _Inside(databases.public_schema_open(db_conn), revision_of(db_conn))
    except (ProvisionError, psycopg.Error) as err:
        return _Inside(error=str(err).splitlines()[0])


def _bot_step(project: Project, fleet: Fleet, entry: BotEntry, role_state: roles.RoleState | None,
              db_state: databases.DatabaseState | None, inside: _Inside | None, problems: list[str]) -> Step | None:
    """The create/update step of one registry bot (None: nothing to do)."""
    for kind, name, state in (("role", entry.role, role_state), ("database", entry.database, db_state)):
        if state is not None and state.comment != marker(entry.name):
            # apply never adopts what it did not create; an operator who knows it is this
            # bot's can say so with `provision add-bot NAME` (which restores the marker).
            problems.append(f"{kind} {name!r} exists without botfleet's marker for bot {entry.name!r}; apply will "
                            f"not take it over (if it is this bot's: provision add-bot {entry.name})")
    env_path = project.env_file(entry.name)
    rel = env_path.relative_to(project.root)
    if role_state is None and db_state is None:
        return Step(CREATE, entry.name, [f"role {entry.role} (connection limit {entry.connection_limit})",
                                         f"database {entry.database}", f"{rel} (new password)"])
    details: list[str] = []
    if db_state is None:
        details.append(f"create the missing database {entry.database} (empty)")
    else:
        details += databases.drift(database_spec(entry), db_state)
    if inside is not None and inside.error:
        details.append(f"cannot look inside {entry.database}: {inside.error}")
    elif inside is not None and inside.public_schema_open:
        details.append("revoke PUBLIC rights on schema public")
    if role_state is None:
        details.append(f"create the missing role {entry.role}; {rel} gets a new password")
        return Step(UPDATE, entry.name, details)
    details[:0] = roles.drift(role_spec(entry), role_state)
    password = stored_password(env_path, entry.role)
    if password is None:
        details.append(f"{rel}: {'missing' if not env_path.exists() else 'no usable DATABASE_URL'}; "
                       "written with a new password (set on the server)")
    else:
        host, port = fleet.endpoint(entry)
        expected = render_env(entry, database_url(entry, host, port, password))
        if env_path.read_text(encoding="utf-8") != expected:
            details += [f"{rel}: {d}" for d in _env_diff(env_path, expected)]
        if role_state.verifier is not None and not verifier_matches(password, role_state.verifier):
            details.append(f"server password reset to the one in {rel}")
    return Step(UPDATE, entry.name, details) if details else None


def _migration_step(project: Project, entry: BotEntry, db_exists: bool, inside: _Inside | None) -> Step | None:
    """A step when the bot's code has migrations and its database is not at head."""
    from . import codes
    from .migrate import MigrationFailed, head_of, script_directory

    try:
        found = codes.with_migrations(project.root, entry.code)
    except (codes.NoMigrations, InvalidInput):
        return None
    try:
        head = head_of(script_directory(str(project.root), found.package), found.package)
    except MigrationFailed as err:
        return Step(MIGRATE, entry.name, [f"will fail: {err}"])
    if db_exists and (inside is None or inside.error):
        why = inside.error if inside is not None else "the database refuses connections"
        return Step(MIGRATE, entry.name, [f"revision unknown ({why}); to {head or 'base'}"])
    current = inside.revision if inside is not None else None
    if current == head:
        return None
    return Step(MIGRATE, entry.name, [f"{current or 'base'} -> {head or 'base'} (code {found.package})"])


def _file_steps(root: Path, fleet: Fleet) -> list[Step]:
    """What a re-render would write or delete, for a project with a rendered stack."""
    from . import compose

    if not compose.stack_present(root):
        return []
    try:
        planned = compose.plan(root, fleet)
    except compose.StackInvalid:
        # Some bots' env files are about to be (re)written: the stack follows them.
        return [Step(FILE, compose.COMPOSE_FILE, ["re-rendered after the bots' env files are written"])]
    changed, gone = compose.pending(root, planned)
    return ([Step(FILE, f.path, ["new" if not (root / f.path).exists() else "changed"]) for f in changed]
            + [Step(FILE, rel, ["deleted (no longer part of the stack)"]) for rel in gone])


@dataclass
class ServerLink:
    """An open admin connection to one of the fleet's servers."""

    name: str  # DEFAULT_SERVER or a [servers.NAME]
    conn: psycopg.Connection
    admin: AdminInfo
    url: str = field(repr=False)


def plan(
    servers: list[ServerLink],
    project: Project,
    *,
    prune: bool = False,
    ignore: tuple[str, ...] = (),
    migrations: bool = True,
    progress: Progress = _quiet,
) -> FleetPlan:
    """Every step apply would take to make the servers and the files match fleet.toml.
    Reads only. ``servers`` must include every server that has registry bots."""
    from . import budget as budgets
    from . import compose
    from .doctor import stray_bots

    fleet = project.registry.load()
    problems: list[str] = []
    links = {link.name: link for link in servers}
    for entry in fleet.bots.values():
        link = links.get(fleet.server_of(entry))
        if link is None:
            problems.append(f"bot {entry.name}: its server {fleet.server_of(entry)} was not reached")
            continue
        problems += _entry_problems(project, link.admin, entry)
    for server in fleet.server_names():
        if server == DEFAULT_SERVER and not compose.stack_present(project.root):
            continue  # the default server's size is known only for a rendered stack
        try:
            if server == DEFAULT_SERVER:
                budgets.validate_server(fleet.server)
            budgets.check(budgets.server_budget(fleet, server),
                          "fleet.toml" + ("" if server == DEFAULT_SERVER else f" on server {server}"))
        except InvalidInput as err:
            problems.append(str(err))
    if problems:
        return FleetPlan([], problems)

    steps: list[Step] = []
    migrate: list[Step] = []
    names = sorted(fleet.bots)
    for i, name in enumerate(names, 1):
        progress(f"comparing {name} ({i}/{len(names)})")
        entry = fleet.bots[name]
        link = links[fleet.server_of(entry)]
        role_state = roles.inspect(link.conn, entry.role, read_verifier=link.admin.superuser)
        db_state = databases.inspect(link.conn, entry.database)
        inside = _look_inside(link.url, db_state, entry.database)  # one connection per bot database
        step = _bot_step(project, fleet, entry, role_state, db_state, inside, problems)
        if step is not None:
            steps.append(dataclasses.replace(step, server=link.name))
        if migrations:
            m = _migration_step(project, entry, db_state is not None, inside)
            if m is not None:
                migrate.append(dataclasses.replace(m, server=link.name))
    others: list[str] = []
    for link in servers:
        here = Fleet(fleet.server, fleet.on(link.name), fleet.servers)
        for bot, objects in stray_bots(link.conn, here, ignore).items():
            if bot in fleet.bots:
                # Left over where a registry bot no longer lives: never pruned (remove-bot
                # would also delete the live bot's env file and registry entry).
                steps.append(Step(KEEP, bot, [*objects, f"left over here; {bot} lives on server "
                                              f"{fleet.server_of(fleet.bots[bot])} (never pruned)"], link.name))
            elif not project.env_file(bot).exists():
                # Not this project's (it holds no credentials for it): another fleet on the
                # same server, or a bot set up elsewhere. Never pruned, only counted.
                others.append(bot)
            elif prune:
                steps.append(Step(REMOVE, bot, ["pg_dump backup into " + str(Path("backups") / bot), *objects,
                                                f"secrets/{bot}.env"], link.name))
            else:
                steps.append(Step(KEEP, bot, [*objects, "not in fleet.toml (apply --prune backs it up, then removes it)"],
                                  link.name))
    steps += migrate
    steps += _file_steps(project.root, fleet)
    return FleetPlan(steps, problems, others)


# --------------------------------------------------------------------------- apply


@dataclass
class StepResult:
    action: str
    subject: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_server(
    servers: list[ServerLink],
    project: Project,
    fleet_plan: FleetPlan,
    *,
    progress: Progress = _quiet,
) -> list[StepResult]:
    """The plan's create, update and remove steps, bot by bot; one bot's failure does
    not stop the others. Refuses (InvalidInput) a plan with problems, before any change.
    The stack is re-rendered once, afterwards (:func:`apply_files`), not after each bot."""
    if fleet_plan.problems:
        raise InvalidInput(fleet_plan.refusal())
    results: list[StepResult] = []
    links = {link.name: link for link in servers}
    for step in fleet_plan.steps:
        if step.action not in (CREATE, UPDATE, REMOVE):
            continue
        link = links[step.server]
        progress(f"{step.action} {step.subject}" + ("" if step.server == DEFAULT_SERVER else f" on server {step.server}"))
        try:
            if step.action == REMOVE:
                removed = remove_bot(link.conn, link.admin, link.url, project, step.subject, backup=True,
                                     progress=progress, rerender=False)
                results.append(StepResult(REMOVE, step.subject, True, f"backup {removed.backup}" if removed.backup else ""))
            else:
                added = add_bot(link.conn, link.admin, link.url, project, step.subject, BotOptions(), progress=progress,
                                rerender=False)
                results.append(StepResult(step.action, step.subject, True, added.status))
        except ProvisionError as err:
            results.append(StepResult(step.action, step.subject, False, str(err)))
    return results


def migration_results(outcomes: list[Any]) -> list[StepResult]:
    """migrate's per-bot outcomes as apply's results."""
    return [StepResult(MIGRATE, o.bot, o.ok, o.error or f"{o.status}: {o.from_rev or 'base'} -> {o.to_rev or 'base'}")
            for o in sorted(outcomes, key=lambda o: o.bot)]


def apply_files(project: Project) -> list[StepResult]:
    """Re-render a project's stack once every bot's env file is written."""
    from . import compose

    if not compose.stack_present(project.root):
        return []
    try:
        result = compose.render(project.root)
    except ProvisionError as err:
        return [StepResult(FILE, compose.COMPOSE_FILE, False, str(err))]
    return [StepResult(FILE, path, True, "written") for path in result.written] + \
           [StepResult(FILE, path, True, "deleted") for path in result.removed]
