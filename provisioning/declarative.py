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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import budget as budgets
from . import codes, compose, reconcile, settings
from .envfile import EnvFile
from .errors import InvalidInput, ProvisionError
from .migrate import MigrationFailed, head_of, parse_script_directories, script_directory, start_over, unknown_to_code
from .names import validate
from .project import Project
from .registry import DEFAULT_SERVER, BotEntry
from .servers import Server

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
    # What apply cannot do for the operator: a setting a bot's code requires that is not set, a
    # database at a revision its bot's code does not know (not migrated).
    notes: list[str] = field(default_factory=list)

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
                "changes": len(self.changes), "others": self.others, "notes": self.notes}


# --------------------------------------------------------------------------- plan


def _entry_problems(server: Server, entry: BotEntry) -> list[str]:
    """What add-bot would refuse that fleet.toml's own validation cannot know: a name
    reserved because of the admin role on this server."""
    assert server.admin is not None
    try:
        validate(entry.name, admin_role=server.admin.role)
    except InvalidInput as err:
        return [f"fleet.toml: bot {entry.name!r}: {err}"]
    return []


def _bot_step(server: Server, project: Project, entry: BotEntry, observed: reconcile.Observed,
              problems: list[str], *, credentials_only: bool = False) -> Step | None:
    """The create/update step of one registry bot (None: nothing to do). ``credentials_only``:
    the env file is not botfleet's to write here (the stack's service): only its password counts."""
    for kind, name, state in (("role", entry.role, observed.role), ("database", entry.database, observed.database)):
        if state is not None and not reconcile.ours(entry, observed, kind):
            # apply never adopts what it did not create; an operator who knows it is this
            # bot's can say so with `provision add-bot NAME` (which restores the marker).
            problems.append(f"{kind} {name!r} exists without botfleet's marker for bot {entry.name!r}; apply will "
                            f"not take it over (if it is this bot's: provision add-bot {entry.name})")
    if credentials_only and observed.env.password(entry.role) is None:
        problems.append(f"{entry.name}: no credentials for role {entry.role} in {observed.env.path} (run provision "
                        f"add-bot {entry.name} where the fleet is managed, then provision render)")
        return None
    password = "the password in its credentials file" if credentials_only else "new password"
    if not observed.exists:
        return Step(CREATE, entry.name, [f"role {entry.role} (connection limit {entry.connection_limit})",
                                         f"database {entry.database}", f"{entry.env_file} ({password})"], server.name)
    changes = reconcile.changes(server, project, entry, observed)
    if credentials_only:
        changes = [c for c in changes if c.target != reconcile.ENV]
        if observed.role is None:
            changes = [c for c in changes if c.target != reconcile.PASSWORD]
    details = [c.words for c in changes]
    return Step(UPDATE, entry.name, details, server.name) if details else None


def _migration_step(project: Project, entry: BotEntry, observed: reconcile.Observed, server: str,
                    notes: list[str]) -> Step | None:
    """A step when the bot's code has migrations and its database is not at head. A database at
    a revision its code's migrations do not know (its code changed, in fleet.toml, under a
    database another code migrated) gets no step, which could only fail: a note says why."""
    why = unknown_to_code(project.root, entry.code, observed.revision)
    if why:
        notes.append(f"{entry.name}: {why}, so it is not migrated: set its code back in fleet.toml, or "
                     f"{start_over(entry.name, entry.code)}")
        return None
    try:
        found = codes.with_migrations(project.root, entry.code)
    except (codes.NoMigrations, InvalidInput):
        return None
    try:
        head = head_of(script_directory(str(project.root), found.package), found.package)
    except MigrationFailed as err:
        return Step(MIGRATE, entry.name, [f"will fail: {err}"], server)
    if observed.database is not None and (not observed.looked_inside or observed.inside_error):
        why = observed.inside_error or "the database refuses connections"
        return Step(MIGRATE, entry.name, [f"revision unknown ({why}); to {head or 'base'}"], server)
    if observed.revision == head:
        return None
    return Step(MIGRATE, entry.name, [f"{observed.revision or 'base'} -> {head or 'base'} (code {found.package})"], server)


# The password a bot's env file is planned with while apply has yet to generate it: every
# file that carries it (the bot's secrets/NAME.url, the compose files naming its secrets)
# differs from what is on disk, as it will once apply has written the real one.
_NEW_PASSWORD = "not-yet-generated"


def _env_after(project: Project, entry: BotEntry, observed: reconcile.Observed) -> EnvFile:
    """The bot's env file as apply (converge) will leave it: its password kept, or a new one
    where converge makes one (no password in the file, or no role on the server)."""
    password = observed.env.password(entry.role) if observed.role is not None else None
    text = reconcile.expected_env(project.fleet, entry, observed.env, password or _NEW_PASSWORD)
    return EnvFile.parse(observed.env.path, text)


def _file_steps(project: Project, envs: dict[str, EnvFile]) -> list[Step]:
    """What apply's re-render will write or delete, for a project with a rendered stack:
    the stack planned from the env files as apply leaves them (``envs``), compared with the
    disk. A render apply cannot do (a bot lacking a required setting, a file botfleet did not
    write) is one step that says so, as apply's result will."""
    if not compose.stack_present(project.root):
        return []
    try:
        planned = compose.prepare(project, envs=envs)
        compose.refuse_foreign(project.root, planned)
    except ProvisionError as err:
        return [Step(FILE, compose.COMPOSE_FILE, [f"will not be written: {err}"])]
    changed, gone = compose.pending(project.root, planned)
    return ([Step(FILE, f.path, ["new" if not (project.root / f.path).exists() else "changed"]) for f in changed]
            + [Step(FILE, rel, ["deleted (no longer part of the stack)"]) for rel in gone])


def plan(
    servers: list[Server],
    project: Project,
    *,
    prune: bool = False,
    ignore: tuple[str, ...] = (),
    migrations: bool = True,
    credentials_only: bool = False,
    progress: Progress = _quiet,
) -> FleetPlan:
    """Every step apply would take to make the servers and the files match fleet.toml.
    Reads only. ``servers`` must be open and include every server that has registry bots.
    ``credentials_only`` (the stack's provisioning service): the bots of the servers given
    only, their credentials files read and never written, no files re-rendered."""
    from .doctor import stray_bots

    fleet = project.fleet
    problems: list[str] = []
    by_name = {server.name: server for server in servers}
    bots = {n: e for n, e in fleet.bots.items() if not credentials_only or e.server in by_name}
    for entry in bots.values():
        server = by_name.get(entry.server)
        if server is None:
            problems.append(f"bot {entry.name}: its server {entry.server} was not reached")
            continue
        problems += _entry_problems(server, entry)
    for name in fleet.server_names():
        if name == DEFAULT_SERVER and not compose.stack_present(project.root):
            continue  # the default server's size is known only for a rendered stack
        try:
            if name == DEFAULT_SERVER:
                budgets.validate_stack(fleet.stack)
            budgets.require_fit(budgets.server_budget(fleet, name),
                          "fleet.toml" + ("" if name == DEFAULT_SERVER else f" on server {name}"))
        except InvalidInput as err:
            problems.append(str(err))
    if problems:
        return FleetPlan([], problems)

    steps: list[Step] = []
    migrate: list[Step] = []
    envs: dict[str, EnvFile] = {}  # each bot's env file as apply leaves it (the stack follows them)
    mismatches: list[str] = []  # bots whose database another code migrated
    names = sorted(bots)
    # One connection per bot database, a few at once (reconcile.observe_many), server by server.
    # While the last server's bot databases are visited, this thread plans the files: they need
    # only each bot's role and env file, which observe_many reads before it looks inside.
    seen: dict[str, reconcile.Observed] = {}
    outside: dict[str, reconcile.Observed] = {}
    early: dict[str, Any] = {}
    visits = [(server, [bots[n] for n in names if bots[n].server == server.name]) for server in servers]
    visits = [(server, mine) for server, mine in visits if mine]

    def meanwhile(mine: list[BotEntry], observed: list[reconcile.Observed]) -> None:
        outside.update(zip((e.name for e in mine), observed))
        if len(outside) != len(bots) or credentials_only:
            return
        if migrations:  # each code's script directory parsed once (cached), beside the pool
            parse_script_directories(project.root, {e.code for e in bots.values()})
        early["files"] = _file_steps(project, {name: _env_after(project, bots[name], outside[name]) for name in names})
        # each code's REQUIRED_SETTINGS once, against each env file as observe_many read it
        required: dict[str, tuple[str, ...]] = {}
        early["missing"] = [settings.missing_hint(bot, keys) for bot in sorted(bots)
                            if (keys := settings.lacking(project.root, bots[bot].code,
                                                         settings.of(outside[bot].env), required))]

    for server, mine in visits:
        progress(f"looking inside {len(mine)} bot database(s) on server {server.name}")
        seen.update(zip((e.name for e in mine), reconcile.observe_many(
            server, project, mine, meanwhile=lambda observed, mine=mine: meanwhile(mine, observed))))
    for i, name in enumerate(names, 1):
        progress(f"comparing {name} ({i}/{len(names)})")
        entry = bots[name]
        server = by_name[entry.server]
        observed = seen[name]
        step = _bot_step(server, project, entry, observed, problems, credentials_only=credentials_only)
        if step is not None:
            steps.append(step)
        if not credentials_only:
            envs[name] = _env_after(project, entry, observed)
        if migrations:
            m = _migration_step(project, entry, observed, server.name, mismatches)
            if m is not None:
                migrate.append(m)
    others: list[str] = []
    for server in servers:
        assert server.conn is not None
        for bot, objects in stray_bots(server.conn, fleet.only(server.name), ignore).items():
            if bot in fleet.bots:
                # Left over where a registry bot no longer lives: never pruned (remove-bot
                # would also delete the live bot's env file and registry entry).
                steps.append(Step(KEEP, bot, [*objects, f"left over here; {bot} lives on server "
                                              f"{fleet.bots[bot].server} (never pruned)"], server.name))
            elif not project.env_path(bot).exists():
                # Not this project's (it holds no credentials for it): another fleet on the
                # same server, or a bot set up elsewhere. Never pruned, only counted.
                others.append(bot)
            elif prune:
                steps.append(Step(REMOVE, bot, ["pg_dump backup into " + str(Path("backups") / bot), *objects,
                                                f"secrets/{bot}.env"], server.name))
            else:
                steps.append(Step(KEEP, bot, [*objects, "not in fleet.toml (apply --prune backs it up, then removes it)"],
                                  server.name))
    steps += migrate
    notes: list[str] = list(mismatches)
    if not credentials_only:
        steps += early["files"] if "files" in early else _file_steps(project, envs)
        notes += early["missing"] if "missing" in early else [
            settings.missing_hint(bot, keys) for bot in sorted(bots) if (keys := settings.missing(project, bot))]
    return FleetPlan(steps, problems, others, notes)


# --------------------------------------------------------------------------- apply


@dataclass
class StepResult:
    action: str
    subject: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def migration_results(outcomes: list[Any]) -> list[StepResult]:
    """migrate's per-bot outcomes as apply's results."""
    return [StepResult(MIGRATE, o.bot, o.ok, o.error or f"{o.status}: {o.from_rev or 'base'} -> {o.to_rev or 'base'}")
            for o in sorted(outcomes, key=lambda o: o.bot)]


def apply_files(project: Project) -> list[StepResult]:
    """Re-render a project's stack once every bot's env file is written."""
    if not compose.stack_present(project.root):
        return []
    try:
        result = compose.render(project)
    except ProvisionError as err:
        return [StepResult(FILE, compose.COMPOSE_FILE, False, str(err))]
    return [StepResult(FILE, path, True, "written") for path in result.written] + \
           [StepResult(FILE, path, True, "deleted") for path in result.removed]
