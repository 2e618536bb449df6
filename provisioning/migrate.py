"""Run bots' Alembic migrations: as each bot's own role, many bots at once, safely.

Why processes and not threads or tasks: Alembic's ``context`` and ``op`` are
module-level proxies to *the* current migration context. Two upgrades in
threads of one process (or interleaved asyncio tasks) would each install
their context into the same global and run each other's operations against
the wrong database. So each worker *process* migrates one bot at a time,
and a small pool of them (``--jobs``) migrates many bots in turn. Workers are
forked from the parent after alembic and SQLAlchemy are imported and each
code's script directory and models are loaded (``_warm``), so a worker costs
milliseconds, not an interpreter start and ~0.3 s of imports.

Per bot (``migrate_one``), on ONE connection:
1. connect as the bot's own role (so the bot owns everything it creates) with
   psycopg's async driver; a bot already at head is answered by one plain
   query here (no Alembic); otherwise the connection is handed to the
   process's SQLAlchemy engine for its server (its dialect initialised once,
   not per bot) and Alembic runs on it through ``run_sync``;
2. take a session advisory lock keyed on the bot database: a second migrator
   of the same bot waits (``lock_wait`` seconds) or reports that it is busy;
3. read the current revision and refuse a database ahead of the scripts or
   code with several heads;
4. run the upgrade in ONE transaction (PostgreSQL has transactional DDL): a
   failing revision rolls every step of this run back, so the schema and the
   version table are exactly as before, and the error names the bot, the
   revision and the cause.

A bot's conninfo holds its password: it is passed to workers through a pipe
(never argv), is excluded from ``repr`` and never appears in an Outcome.

Workers die with the process that forked them (``_die_with_parent``): a killed
``provision migrate --all`` leaves no worker waiting forever for work that will
never come, and a worker killed mid-migration takes its transaction with it
(the server rolls it back when the session ends).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import ctypes
import functools
import io
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

# alembic and SQLAlchemy are imported where a migration runs, not here: every command imports
# this module, and they cost more start-up than the rest of the CLI (an add-bot --no-migrate,
# a list or a plan with nothing to migrate never loads them).
if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

from . import codes
from .db import LOCK_NAMESPACE, as_role, lock_key
from .errors import InvalidInput
from .project import Project
from .registry import DEFAULT_SERVER

# Advisory locks are per database; this second key space keeps a migration
# lock distinct from any other botfleet lock taken in the same database.
MIGRATION_LOCK_SPACE = LOCK_NAMESPACE + 1
DEFAULT_LOCK_WAIT = 60.0
# Once it holds the migration lock, DDL waits at most this long for a table
# lock (a running bot keeps working instead of queueing behind the ALTER).
DDL_LOCK_TIMEOUT = "15s"


@dataclass(frozen=True)
class Target:
    """One bot to migrate. ``conninfo`` carries the password: never printed."""

    bot: str
    root: str
    package: str
    database: str
    conninfo: str = field(repr=False)


@dataclass
class Outcome:
    bot: str
    status: str  # upgraded | downgraded | up to date | failed | skipped
    from_rev: str | None = None
    to_rev: str | None = None
    seconds: float = 0.0
    error: str | None = None
    applied: list[str] = field(default_factory=list)
    # How it was migrated: "alembic", or "replay" (the SQL Alembic ran for another bot of its code).
    by: str = ""
    # What Alembic ran for it, when another bot of its code may run the same (see Recipe).
    recipe: Recipe | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "recipe"}


@dataclass(frozen=True)
class Statement:
    """One statement as SQLAlchemy handed it to psycopg: its text, its parameters (None, a dict,
    or a list of them for ``many``), exactly, so it runs again exactly as it ran."""

    sql: str
    params: Any
    many: bool = False


@dataclass(frozen=True)
class Recipe:
    """What Alembic ran for ONE bot of a code from one starting point to the code's head, to run
    again as it is on the code's other bots (a fleet's bots of one code share their migrations).

    It is kept only when it can stand for Alembic on another bot: no statement run by a migration
    returned rows (a migration that reads the database, even the catalogs through an inspector,
    could decide differently in another database), none names that bot's database or role, the
    run stayed in one transaction (no autocommit block: a replay is one transaction), and it is
    not huge (RECIPE_MAX_CHARS). The bot replaying it must start at the same revision, on the
    same server (address and version).
    ``setup``: what Alembic ran before the first migration that changed anything (creating the
    version table); ``step_ends``: how many statements had run when each revision was done."""

    root: str
    package: str
    server: tuple[str, str, str]  # host, port, server version: DDL may be compiled for a version
    from_rev: str | None
    had_table: bool
    to_rev: str | None
    steps: tuple[str, ...]
    setup: tuple[Statement, ...]
    statements: tuple[Statement, ...]
    step_ends: tuple[int, ...]


class MigrationFailed(Exception):
    """Raised inside a worker; its message is one line that names bot, revision and cause."""


def alembic_config(root: Path, package: str, *, output: io.TextIOBase | None = None) -> Config:
    """A Config for one code's script directory with the shared env.py.

    Paths go through ini options, so ``%`` is escaped for ConfigParser;
    connections, URLs and metadata only ever go through ``attributes``.
    """
    from alembic.config import Config

    cfg = Config(output_buffer=output) if output is not None else Config()
    migrations = root / "migrations"
    cfg.set_main_option("script_location", str(migrations).replace("%", "%%"))
    cfg.set_main_option("version_locations", str(migrations / package / "versions").replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("botfleet_code", package)
    cfg.attributes["code"] = package
    return cfg


@functools.lru_cache(maxsize=None)
def script_directory(root: str, package: str) -> ScriptDirectory:
    """Parsed once per worker process and code (versions never change during a run)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(Path(root), package))


def parse_script_directories(root: Path, bot_codes: set[str]) -> None:
    """Parse (into :func:`script_directory`'s cache) the script directory of each of ``bot_codes``
    that has migrations, ahead of the per-bot work that reads them (a code whose directory cannot
    be read is left to that work, which says why)."""
    for code in sorted(bot_codes):
        try:
            script_directory(str(root), codes.with_migrations(root, code).package)
        except Exception:  # noqa: BLE001 - see above
            pass


@functools.lru_cache(maxsize=None)
def metadata_for(root: str, package: str):
    return codes.load_metadata(Path(root), package)


def one_line(err: BaseException) -> str:
    """The cause of a failure in one line, from the driver's error when there is one."""
    from sqlalchemy.exc import DBAPIError

    orig = getattr(err, "orig", None) if isinstance(err, DBAPIError) else None
    source = orig if orig is not None else err
    first = next((ln.strip() for ln in str(source).splitlines() if ln.strip()), "")
    return f"{type(source).__name__}: {first}" if first else type(source).__name__


def head_of(script: ScriptDirectory, package: str) -> str | None:
    heads = script.get_heads()
    if len(heads) > 1:
        raise MigrationFailed(
            f"code {package} has {len(heads)} heads ({', '.join(sorted(heads))}); "
            "merge them (alembic merge) before migrating"
        )
    return heads[0] if heads else None


def resolve(script: ScriptDirectory, package: str, rev: str) -> str | None:
    """A revision name (head, base, a prefix, relative like -1 is not accepted) to its id."""
    from alembic.util import CommandError

    if rev in ("head", "heads"):
        return head_of(script, package)
    if rev == "base":
        return None
    try:
        found = script.get_revision(rev)
    except CommandError as err:
        raise MigrationFailed(f"unknown revision {rev!r} for code {package}: {one_line(err)}") from None
    if found is None:
        raise MigrationFailed(f"unknown revision {rev!r} for code {package}")
    return found.revision


def _path(script: ScriptDirectory, current: str | None, dest: str | None, downgrade: bool) -> list[str]:
    """The revisions a run applies, in the order it applies them."""
    if downgrade:
        revs = script.iterate_revisions(current, dest or "base")
        return [r.revision for r in revs if r.revision != dest]
    revs = list(script.iterate_revisions(dest or "base", current or "base"))
    return [r.revision for r in reversed(revs)]


async def _lock(rows: Rows, target: Target, lock_wait: float) -> None:
    """Take the bot database's migration lock (a session advisory lock), then set the session up
    for the migration. ``rows(sql, params)``: one psycopg-style query on the bot's connection, its
    rows (through SQLAlchemy for Alembic's connection, straight on psycopg's for a replay)."""
    key = {"a": MIGRATION_LOCK_SPACE, "b": lock_key(target.database)}
    if lock_wait <= 0:
        if not (await rows("SELECT pg_try_advisory_lock(%(a)s, %(b)s)", key))[0][0]:
            raise MigrationFailed(f"{target.bot}: is being migrated by another process right now; try again later")
    else:
        # The wait is lock_wait's, not the role's statement_timeout (30 s by default, which would
        # end a longer --lock-wait early).
        await rows("SELECT set_config('lock_timeout', %(t)s, false), set_config('statement_timeout', '0', false)",
                   {"t": f"{int(lock_wait * 1000)}ms"})
        try:
            await rows("SELECT pg_advisory_lock(%(a)s, %(b)s)", key)
        except Exception as err:
            if isinstance(getattr(err, "orig", err), psycopg.errors.LockNotAvailable):
                raise MigrationFailed(
                    f"{target.bot}: another process has been migrating it for {lock_wait:g}s; gave up waiting"
                ) from None
            raise
    # Holding it: DDL waits at most DDL_LOCK_TIMEOUT for a table lock (a running bot keeps working
    # instead of queueing behind an ALTER), and a migration may run longer than the role's default.
    await rows("SELECT set_config('lock_timeout', %(t)s, false), set_config('statement_timeout', '0', false)",
               {"t": DDL_LOCK_TIMEOUT})


def _server_key(conn: psycopg.AsyncConnection) -> tuple[str, str, str]:
    return (conn.info.host, str(conn.info.port), str(conn.info.server_version))


class _Handoff:
    """The connection :func:`_run` opened for one bot, given to its server's engine on the
    engine's next connect, exactly once (NullPool: closing it closes the connection)."""

    def __init__(self) -> None:
        self.conn: psycopg.AsyncConnection | None = None

    async def take(self) -> psycopg.AsyncConnection:
        conn, self.conn = self.conn, None
        if conn is None:
            raise RuntimeError("the migrator asked for a second connection to one bot's database")
        return conn


_ENGINES: dict[tuple[str, str, str], tuple[Any, _Handoff]] = {}


def _engine_for(conn: psycopg.AsyncConnection) -> tuple[Any, _Handoff]:
    """One SQLAlchemy engine per server (address and version) and process: its dialect reads the
    server's version and settings once (on the first bot), not again for every bot database."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    key = _server_key(conn)
    found = _ENGINES.get(key)
    if found is None:
        handoff = _Handoff()
        engine = create_async_engine("postgresql+psycopg://", async_creator=handoff.take, poolclass=NullPool)
        found = _ENGINES[key] = (engine, handoff)
    return found


# One query on a bot's connection, its rows (see _lock).
Rows = Callable[..., Awaitable[list[Any]]]
# The version table, where the bot's search_path finds it (as Alembic's default version_table).
_HAS_VERSION_TABLE = "SELECT to_regclass('alembic_version') IS NOT NULL"
_VERSIONS = "SELECT version_num FROM alembic_version"


async def _version(conn: psycopg.AsyncConnection) -> str | None:
    """The revision in the version table, read with one plain query (None: none recorded)."""
    try:
        row = await (await conn.execute(_VERSIONS)).fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    await conn.rollback()
    return row[0] if row else None


async def _revision_state(rows: Rows, target: Target) -> tuple[bool, str | None]:
    """Whether the bot's database has the version table, and the revision it records (what
    alembic's get_current_revision answers, without its reflection). ``rows``: as :func:`_lock`'s."""
    if not (await rows(_HAS_VERSION_TABLE))[0][0]:
        return False, None
    found = [r[0] for r in await rows(_VERSIONS)]
    if len(found) > 1:
        raise MigrationFailed(f"{target.bot}: its version table records {len(found)} revisions "
                              f"({', '.join(sorted(found))}); merge the code's heads first")
    return True, found[0] if found else None


async def _run(target: Target, dest_name: str, outcome: Outcome, *, downgrade: bool, lock_wait: float,
               recipe: Recipe | None = None, record: bool = False) -> Outcome:
    script = script_directory(target.root, target.package)
    # One connection per bot, whatever the outcome. A bot already at head is answered from one
    # plain query on it, before the lock: no engine, no Alembic (a migrate --all with nothing
    # pending costs a connection and a query per bot).
    first = await psycopg.AsyncConnection.connect(target.conninfo, connect_timeout=10)
    try:
        to_head = not downgrade and dest_name == "head"
        if not downgrade and dest_name in ("head", "heads"):
            current = await _version(first)
            outcome.from_rev = outcome.to_rev = current
            if current is not None and current == head_of(script, target.package):
                outcome.status = "up to date"
                return outcome
        if (to_head and recipe is not None and (recipe.root, recipe.package) == (target.root, target.package)
                and recipe.server == _server_key(first) and await _replay(first, recipe, target, outcome, script, lock_wait)):
            return outcome
        names = (target.database, first.info.user)
        engine, handoff = _engine_for(first)
        handoff.conn = first
        try:
            return await _run_locked(engine, script, target, dest_name, outcome, downgrade=downgrade,
                                     lock_wait=lock_wait, record=(names, _server_key(first)) if record and to_head else None)
        finally:
            handoff.conn = None  # untaken when the engine never connected
    finally:
        await first.close()  # a no-op when the engine's close already closed it


async def _replay(conn: psycopg.AsyncConnection, recipe: Recipe, target: Target, outcome: Outcome,
                  script: ScriptDirectory, lock_wait: float) -> bool:
    """Run ``recipe`` (what Alembic ran for another bot of this code) on this bot, under its
    migration lock, in ONE transaction, as Alembic would have: True when done. False, with nothing
    changed and the lock kept for Alembic, when this bot does not start where the recipe did."""

    async def rows(query: str, params: dict[str, Any] | None = None) -> list[Any]:
        return await (await conn.execute(query, params)).fetchall()

    await _lock(rows, target, lock_wait)
    await conn.commit()  # the session's settings, kept whatever the migration's transaction does
    had_table, current = await _revision_state(rows, target)
    if (current, had_table) != (recipe.from_rev, recipe.had_table):
        await conn.rollback()
        return False
    outcome.from_rev = outcome.to_rev = current
    done = 0
    try:
        async with conn.cursor() as cur:
            for statement in recipe.setup:
                await _execute(cur, statement)
            for statement in recipe.statements:
                await _execute(cur, statement)
                done += 1
        _, after = await _revision_state(rows, target)
    except psycopg.Error as err:
        await conn.rollback()
        failing = recipe.steps[min(bisect.bisect_right(recipe.step_ends, done), len(recipe.steps) - 1)]
        doc = script.get_revision(failing).doc
        raise MigrationFailed(
            f"{target.bot}: revision {failing}{f' ({doc})' if doc else ''} failed: {one_line(err)}; "
            f"rolled back, still at {current or 'base'}"
        ) from None
    if after != recipe.to_rev:
        await conn.rollback()
        raise MigrationFailed(f"{target.bot}: the replayed migrations left it at {after or 'base'}, not at "
                              f"{recipe.to_rev}; rolled back, still at {current or 'base'}")
    await conn.commit()
    outcome.to_rev, outcome.applied = after, list(recipe.steps)
    outcome.status, outcome.by = "upgraded", "replay"
    return True


async def _execute(cur: psycopg.AsyncCursor, statement: Statement) -> None:
    if statement.many:
        await cur.executemany(statement.sql, statement.params)
    else:
        await cur.execute(statement.sql, statement.params)


class _Recorder:
    """The statements Alembic runs on one bot's connection (SQLAlchemy's cursor events), for a
    :class:`Recipe`: those before the first migration (``setup``: Alembic making its version
    table; its reads of that table are left out) and those from there on (``statements``)."""

    def __init__(self) -> None:
        self.setup: list[Statement] = []
        self.statements: list[Statement] = []
        self.step_ends: list[int] = []
        self.started = False  # Alembic asked for the migrations to run: what follows is theirs
        self.reads = False  # a statement of a migration returned rows
        # The run did not stay in one transaction: a migration's autocommit_block (CREATE INDEX
        # CONCURRENTLY), a transaction per migration, a changed isolation level. A replay runs
        # everything in one transaction, which such a run cannot be.
        self.split = False
        self.expected = 0  # revisions to apply: the run's own commit comes after the last
        self._last: tuple[list[Statement], Statement] | None = None

    def ended(self, conn, *args) -> None:  # noqa: ANN001 - commit, rollback, execution options
        if self.started and len(self.step_ends) < self.expected:
            self.split = True

    def before(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        into = self.statements if self.started else self.setup
        into.append(Statement(statement, copy.deepcopy(parameters), bool(executemany)))
        self._last = (into, into[-1])

    def after(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if cursor.description is None or self._last is None:
            return
        into, last = self._last
        if not self.started:
            into.remove(last)  # Alembic reading its version table before the migrations
        elif not _STAMP.match(statement):  # Alembic's own stamp of a revision returns it (RETURNING)
            self.reads = True


# A recording larger than this (its SQL and parameters as text) is not replayed.
RECIPE_MAX_CHARS = 16 * 1024 * 1024
# How Alembic writes the revision it reached into its version table (HeadMaintainer).
_STAMP = re.compile(r"\s*(INSERT INTO|UPDATE|DELETE FROM) alembic_version\b")


async def _run_locked(engine, script: ScriptDirectory, target: Target, dest_name: str, outcome: Outcome, *,
                      downgrade: bool, lock_wait: float, record: tuple[tuple[str, str], tuple[str, str, str]] | None = None,
                      ) -> Outcome:
    """Alembic on the bot's connection. ``record``: (the bot's database and role, its server):
    keep what Alembic runs as ``outcome.recipe`` when it may stand for Alembic on other bots."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    async with engine.connect() as conn:
        async def rows(query: str, params: dict[str, Any] | None = None) -> list[Any]:
            return list((await conn.exec_driver_sql(query, params) if params else await conn.exec_driver_sql(query)).all())

        await _lock(rows, target, lock_wait)
        had_table, current = await _revision_state(rows, target)
        # Commit the lock/SET transaction: Alembic only manages (and commits)
        # a transaction it begins itself.
        await conn.commit()
        outcome.from_rev = outcome.to_rev = current
        if current is not None and is_unknown(script, current):
            raise MigrationFailed(
                f"{target.bot}: its database is at revision {current}, which code {target.package}'s "
                "migrations do not know (is the database ahead of this code?); nothing changed"
            )
        dest = resolve(script, target.package, dest_name)
        try:
            steps = _path(script, current, dest, downgrade)
        except (CommandError, RevisionError) as err:
            hint = "; use provision downgrade" if not downgrade else ""
            raise MigrationFailed(f"{target.bot}: cannot go from {current or 'base'} to {dest_name}: {err}{hint}") from None
        if not steps:
            outcome.status = "up to date"
            return outcome
        applied: list[object] = []
        recorder = _Recorder() if record else None
        if recorder is not None:
            recorder.expected = len(steps)

        def step_done(ctx, step, heads, run_args) -> None:  # on_version_apply: one call per step
            applied.append(step)
            if recorder is not None:
                recorder.step_ends.append(len(recorder.statements))

        def run(sync_conn) -> None:
            from sqlalchemy import event

            cfg = alembic_config(Path(target.root), target.package)
            cfg.attributes.update(
                connection=sync_conn, target_metadata=metadata_for(target.root, target.package),
                on_version_apply=step_done,
            )
            if downgrade:
                fn = lambda rev, ctx: script._downgrade_revs(dest or "base", rev)  # noqa: E731
            else:
                def fn(rev, ctx):
                    if recorder is not None:
                        recorder.started = True  # Alembic has read (and made) its version table
                    return script._upgrade_revs(dest, rev)
            hooks = [] if recorder is None else [
                ("before_cursor_execute", recorder.before), ("after_cursor_execute", recorder.after),
                ("commit", recorder.ended), ("rollback", recorder.ended),
                ("set_connection_execution_options", recorder.ended)]
            for name, hook in hooks:
                event.listen(sync_conn, name, hook)
            try:
                with EnvironmentContext(cfg, script, fn=fn, destination_rev=dest or "base"):
                    script.run_env()
            finally:
                for name, hook in hooks:
                    event.remove(sync_conn, name, hook)

        try:
            await conn.run_sync(run)
        except MigrationFailed:
            raise
        except Exception as err:  # noqa: BLE001 - reported per bot
            await conn.rollback()
            failing = steps[len(applied)] if len(applied) < len(steps) else steps[-1]
            doc = script.get_revision(failing).doc if not downgrade else None
            what = f"revision {failing}" + (f" ({doc})" if doc else "")
            raise MigrationFailed(
                f"{target.bot}: {'downgrade of ' if downgrade else ''}{what} failed: {one_line(err)}; "
                f"rolled back, still at {current or 'base'}"
            ) from None
        _, after = await _revision_state(rows, target)
        await conn.commit()
        outcome.to_rev = after
        outcome.applied = steps
        outcome.status = "downgraded" if downgrade else "upgraded"
        outcome.by = "alembic"
        if recorder is not None and record is not None:
            outcome.recipe = _recipe(recorder, record[0], record[1], target, current, had_table, after, steps)
        return outcome


def _recipe(recorder: _Recorder, names: tuple[str, str], server: tuple[str, str, str], target: Target,
            current: str | None, had_table: bool, after: str | None, steps: list[str]) -> Recipe | None:
    """The recipe of a recorded run, when it may stand for Alembic on another bot (see Recipe)."""
    if recorder.reads or recorder.split or not recorder.statements or len(recorder.step_ends) != len(steps):
        return None
    text = "\n".join(f"{st.sql}\n{st.params!r}" for st in recorder.setup + recorder.statements)
    if any(name and name in text for name in names):
        return None  # SQL naming this bot's database or role is this bot's own
    if len(text) > RECIPE_MAX_CHARS:
        return None  # a data migration's rows: not copied to every worker; Alembic it is
    return Recipe(root=target.root, package=target.package, server=server, from_rev=current, had_table=had_table,
                  to_rev=after, steps=tuple(steps), setup=tuple(recorder.setup), statements=tuple(recorder.statements),
                  step_ends=tuple(recorder.step_ends))


def is_unknown(script: ScriptDirectory, rev: str) -> bool:
    from alembic.util import CommandError

    try:
        return script.get_revision(rev) is None
    except CommandError:
        return True


def unknown_to_code(root: Path, code: str, revision: str | None) -> str | None:
    """Why code ``code``'s migrations cannot carry on a bot database at ``revision``: it is none
    of their revisions (another code migrated that database, or it is ahead of this checkout),
    in words that name the code that has it when one under migrations/ does. None when they
    know it, when the database was never migrated (``revision`` None: any code may start it),
    or when there is no such code under bots/."""
    if revision is None:
        return None
    try:
        package = codes.with_migrations(root, code).package
        if not is_unknown(script_directory(str(root), package), revision):
            return None
    except codes.NoMigrations:
        package = codes.find(root, code).package  # a code without migrations knows no revision
    except InvalidInput:
        return None
    owner = next((p for p in codes.migration_codes(root)
                  if p != package and not is_unknown(script_directory(str(root), p), revision)), None)
    whose = f"a revision of code {owner}" if owner else "a revision none of this project's codes has"
    return f"its database is at revision {revision} ({whose}), which code {package}'s migrations do not know"


def start_over(bot: str, code: str) -> str:
    """The ways out for a bot whose database another code migrated, as commands to run."""
    return (f"deploy {code} as a new bot (provision add-bot NEW-NAME --code {code}), or, to start {bot} over: "
            f"provision backup {bot}, provision remove-bot {bot}, provision add-bot {bot} --code {code}")


def migrate_one(target: Target, dest: str = "head", *, downgrade: bool = False, lock_wait: float = DEFAULT_LOCK_WAIT,
                recipe: Recipe | None = None, record: bool = False) -> Outcome:
    """Upgrade (or downgrade) one bot; never raises: failures are in the Outcome.

    ``recipe``: what Alembic ran for another bot of its code (:func:`migrate_many`), run again
    here when this bot starts where that one did; else Alembic runs. ``record``: keep what
    Alembic runs here as ``outcome.recipe`` (when it may stand for Alembic on other bots)."""
    started = time.perf_counter()
    # "?" until the bot's version table has been read.
    outcome = Outcome(bot=target.bot, status="failed", from_rev="?", to_rev="?")
    try:
        asyncio.run(_run(target, dest, outcome, downgrade=downgrade, lock_wait=lock_wait, recipe=recipe, record=record))
    except MigrationFailed as err:
        outcome.status, outcome.error = "failed", str(err)
    except Exception as err:  # noqa: BLE001 - one bot's failure never stops the others
        cause = getattr(err, "orig", None) or err
        connecting = isinstance(cause, psycopg.OperationalError) and outcome.from_rev == "?"
        outcome.status = "failed"
        outcome.error = f"{target.bot}: {'cannot connect as its role: ' if connecting else ''}{one_line(err)}"
    outcome.seconds = time.perf_counter() - started
    return outcome


# prctl(2) option: the signal a process gets when the thread that forked it ends.
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """End this worker when ``parent`` (the migrating command) ends, however it ends.

    A pool's workers block reading the task queue, whose write end every worker also holds,
    so a parent killed with SIGKILL would leave them blocked forever. On Linux the kernel sends
    SIGKILL when the parent goes (PR_SET_PDEATHSIG); elsewhere a watchdog thread checks the
    parent every second. A parent that died before this ran is caught by the getppid check."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="botfleet-parent-watchdog", daemon=True).start()


def _init_worker(parent: int) -> None:
    _die_with_parent(parent)
    # A forked worker must not reuse the parent's event loop policy state.
    asyncio.set_event_loop_policy(None)


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def default_jobs(n: int) -> int:
    return max(1, min(n, 2 * (os.cpu_count() or 1), 8))


def _warm(targets: list[Target]) -> None:
    """Before the fork: import what a migration runs on (alembic, its templates' mako, SQLAlchemy's
    psycopg dialect and ORM), parse each code's script directory and load its models, once,
    instead of once in every worker (~0.3 s of CPU each). A code that fails to load is left to
    the workers, which report it bot by bot."""
    import importlib

    for module in ("alembic.runtime.environment", "alembic.runtime.migration", "alembic.op",
                   "sqlalchemy.dialects.postgresql.psycopg", "sqlalchemy.ext.asyncio"):
        importlib.import_module(module)
    for root, package in sorted({(t.root, t.package) for t in targets}):
        try:
            script_directory(root, package).get_heads()  # the revision files are imported here
            metadata_for(root, package)
        except Exception:  # noqa: BLE001 - see above
            pass


def migrate_many(
    targets: list[Target],
    dest: str = "head",
    *,
    jobs: int | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT,
    on_done: Callable[[Outcome], None] = lambda _o: None,
    replay: bool = True,
) -> list[Outcome]:
    """Migrate every target with at most ``jobs`` worker processes; results in input order.

    ``replay`` (to head only): the first bot of each code is migrated by Alembic, which records
    the statements it runs; the code's other bots that start where that one did then run those
    statements again (:class:`Recipe`, :func:`_replay`), each in one transaction under its own
    lock, instead of Alembic working the same migrations out again for each (most of a
    migration's client time). The recipe is kept only when no migration read the database and
    none of its SQL names that first bot; else, and for a bot starting elsewhere, Alembic runs.

    Preconditions: the caller holds no open database connection it needs
    afterwards across the fork (workers exit with ``os._exit`` and never
    close inherited sockets, but keep it simple).
    """
    jobs = default_jobs(len(targets)) if jobs is None else max(1, min(jobs, len(targets) or 1))
    replay = replay and dest == "head"
    # The first target of each code leads: the others of its code wait for its recipe.
    leaders: dict[tuple[str, str], Target] = {}
    followers: dict[tuple[str, str], list[Target]] = {}
    for t in targets:
        key = (t.root, t.package)
        if replay and key in leaders:
            followers.setdefault(key, []).append(t)
        else:
            leaders.setdefault(key, t)
    firsts = [t for t in targets if t not in followers.get((t.root, t.package), [])]
    results: dict[str, Outcome] = {}

    def finish(outcome: Outcome) -> None:
        results[outcome.bot] = outcome
        on_done(outcome)

    if jobs == 1 or len(targets) <= 1:
        for target in firsts:
            key = (target.root, target.package)
            outcome = migrate_one(target, dest, lock_wait=lock_wait, record=key in followers)
            recipe, outcome.recipe = outcome.recipe, None
            finish(outcome)
            for follower in followers.get(key, []):
                finish(migrate_one(follower, dest, lock_wait=lock_wait, recipe=recipe))
    else:
        if _context().get_start_method() == "fork":
            _warm(targets)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=_context(), initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            # The first bot of each code first (they run at once); its code's other bots when it is
            # done, with its recipe (a leader held up by another migrator holds up only its code).
            futures = {pool.submit(migrate_one, t, dest, lock_wait=lock_wait,
                                   record=(t.root, t.package) in followers): t for t in firsts}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    target = futures.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as err:  # noqa: BLE001 - a worker that died
                        outcome = Outcome(bot=target.bot, status="failed",
                                          error=f"{target.bot}: worker failed: {one_line(err)}")
                    if target is leaders.get((target.root, target.package)):
                        for follower in followers.pop((target.root, target.package), []):
                            futures[pool.submit(migrate_one, follower, dest, lock_wait=lock_wait,
                                                recipe=outcome.recipe)] = follower
                    outcome.recipe = None  # the parent keeps no statements once they are handed out
                    finish(outcome)
    return [results[t.bot] for t in targets]


def offline_sql(target: Target, current: str | None, dest: str = "head", *, downgrade: bool = False) -> str:
    """The SQL an upgrade from ``current`` would run, without running it."""
    from alembic.runtime.environment import EnvironmentContext

    buf = io.StringIO()
    script = script_directory(target.root, target.package)
    cfg = alembic_config(Path(target.root), target.package, output=buf)
    cfg.attributes["target_metadata"] = metadata_for(target.root, target.package)
    dest_rev = resolve(script, target.package, dest)
    if downgrade:
        fn = lambda rev, ctx: script._downgrade_revs(dest_rev or "base", rev)  # noqa: E731
    else:
        fn = lambda rev, ctx: script._upgrade_revs(dest_rev, rev)  # noqa: E731
    with EnvironmentContext(cfg, script, fn=fn, as_sql=True, starting_rev=current, destination_rev=dest_rev or "base"):
        script.run_env()
    return buf.getvalue()


def revision_of(conn: psycopg.Connection) -> str | None:
    """The revision of the database ``conn`` is in (None: never migrated)."""
    exists = conn.execute(_HAS_VERSION_TABLE).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(_VERSIONS).fetchone()
    return row[0] if row else None


def current_revision(conninfo: str) -> str | None:
    """The bot database's revision (None: never migrated), read with plain psycopg."""
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        return revision_of(conn)


def at_head(targets: list[Target], dest: str = "head") -> tuple[list[Outcome], list[Target]]:
    """The targets already at their code's head ("up to date" outcomes, in their order) and the
    rest (for :func:`migrate_many`). Each database's revision is read as the bot's role over one
    plain connection, a few at once (pool.py), so a ``migrate --all`` with nothing pending forks
    no migrator. A target whose revision cannot be read, or whose code has several heads, is
    left to the migrator (which reports why); so is every target when ``dest`` is not head.
    The reads need no Alembic: while they wait on the server, this thread imports Alembic and
    reads each code's head (most of the time of a run with nothing pending)."""
    from . import pool

    if dest != "head" or not targets:
        return [], list(targets)
    heads: dict[tuple[str, str], str | None] = {}
    broken: set[tuple[str, str]] = set()

    def read_heads() -> None:
        for t in targets:
            key = (t.root, t.package)
            if key not in heads and key not in broken:
                try:
                    heads[key] = head_of(script_directory(t.root, t.package), t.package)
                except Exception:  # noqa: BLE001 - the migrator reports it, bot by bot
                    broken.add(key)

    def read(t: Target) -> tuple[bool, str | None, float]:
        start = time.perf_counter()
        try:  # one query: a database without the version table is not at head, whatever head is
            with psycopg.connect(t.conninfo, connect_timeout=10) as conn:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.Error:  # no version table (the migrator takes it), or no connection
            return False, None, 0.0
        return True, row[0] if row else None, time.perf_counter() - start

    done, rest = [], []
    seen = pool.visit_meanwhile(targets, read, pool.jobs(None, len(targets)), read_heads)
    for t, (read_it, rev, seconds) in zip(targets, seen):
        key = (t.root, t.package)
        if read_it and key not in broken and rev == heads[key]:
            done.append(Outcome(bot=t.bot, status="up to date", from_rev=rev, to_rev=rev, seconds=seconds))
        else:
            rest.append(t)
    return done, rest


def bot_conninfo_from_env(url: str, application_name: str = "botfleet-migrate") -> str:
    """A bot's DATABASE_URL (SQLAlchemy style) as a libpq conninfo."""
    from psycopg.conninfo import make_conninfo

    from .db import parse_url

    return make_conninfo(**{**parse_url(url), "application_name": application_name})


def plan_targets(
    project: Project, names: list[str], *, all_bots: bool, admin_url: str | None, skip_missing: bool | None = None,
    bot_urls: bool = False,
) -> tuple[list[Target], list[Outcome]]:
    """The bots to migrate, and the ones that cannot be (as failed/skipped outcomes).

    Where each bot is reached: a bot on the default server through ``admin_url``'s
    host and port (as itself), or through its own DATABASE_URL from its env file
    when ``admin_url`` is None (from inside the compose network); a bot on a
    ``[servers.NAME]`` through that server's admin URL, or its own DATABASE_URL
    with ``bot_urls``. Unknown names raise InvalidInput before anything runs.
    Bots whose code has no migrations are "skipped" with ``skip_missing``
    (default: with ``all_bots``), else "failed".
    """
    fleet = project.fleet
    unknown = [n for n in names if n not in fleet.bots]
    if unknown:
        raise InvalidInput(f"not in the fleet registry: {', '.join(unknown)} (see provision list)")
    chosen = sorted(fleet.bots) if all_bots else list(dict.fromkeys(names))
    targets: list[Target] = []
    skipped: list[Outcome] = []
    for bot in chosen:
        entry = fleet.bots[bot]
        try:
            found = codes.with_migrations(project.root, entry.code)
        except (codes.NoMigrations, InvalidInput) as err:
            status = "skipped" if (all_bots if skip_missing is None else skip_missing) else "failed"
            skipped.append(Outcome(bot=bot, status=status, error=f"{bot}: {err}"))
            continue
        env = project.env(bot)
        creds = env.credentials(entry.role)
        if creds is None:
            skipped.append(Outcome(bot=bot, status="failed",
                                   error=f"{bot}: no credentials in {env.path}; run provision add-bot {bot} to restore them"))
            continue
        url = admin_url if entry.server == DEFAULT_SERVER else (None if bot_urls else fleet.servers[entry.server].admin_url)
        if url is None:
            conninfo = bot_conninfo_from_env(creds.url)
        else:
            conninfo = as_role(url, entry.role, creds.password, entry.database, application_name="botfleet-migrate")
        targets.append(Target(bot=bot, root=str(project.root), package=found.package,
                              database=entry.database, conninfo=conninfo))
    return targets, skipped
