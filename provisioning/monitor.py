"""Per-bot figures of a shared server, read from the admin connection: what `provision top` and
`provision metrics` show.

Bots share one server, so one bot's load is every bot's problem; the operator needs to see which
bot is doing what. Everything here is read from the server's own statistics views over the one
admin connection, in a handful of queries for the whole fleet, never one connection per bot
database (those views are cluster-wide):

- ``pg_stat_database``: cumulative counters per database (transactions, rows written, blocks read
  and hit, temp files), and ``pg_database_size``;
- ``pg_stat_activity``: each session's state, its statement's and transaction's age, its wait;
- ``pg_locks`` with ``pg_blocking_pids``: the sessions waiting on a lock and who blocks them;
- ``pg_roles``: each bot's connection limit;
- ``pg_stat_statements`` where the extension is installed in the database the admin connection
  is in (botfleet's own): calls and execution time per bot database (an optional figure).

A sample is a snapshot of cumulative counters; :func:`rates` turns two samples of one server
into per-second figures. A statement's text can hold whatever a bot put in its SQL (a token, a
user's message), so it is read only when asked for (``queries=True``); by default a statement is
shown by its age, state and wait event alone.

A leaf: it takes an open connection and returns typed results; nothing here opens a connection,
prints or sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

# The session states pg_stat_activity reports, in the order top shows them; any other state
# (fastpath function call, disabled, idle in transaction (aborted)) is counted as "other".
STATES = ("active", "idle", "idle in transaction")


@dataclass(frozen=True)
class Watched:
    """One bot to look at: its name and the database and role botfleet gave it."""

    bot: str
    database: str
    role: str


@dataclass
class Counters:
    """pg_stat_database's cumulative counters for one database (since its statistics were reset)."""

    commits: int = 0
    rollbacks: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = 0
    rows_returned: int = 0
    rows_fetched: int = 0
    blocks_read: int = 0
    blocks_hit: int = 0
    temp_files: int = 0
    temp_bytes: int = 0
    deadlocks: int = 0

    @property
    def transactions(self) -> int:
        return self.commits + self.rollbacks

    @property
    def rows_written(self) -> int:
        return self.rows_inserted + self.rows_updated + self.rows_deleted

    @property
    def cache_hit_ratio(self) -> float | None:
        """Blocks found in shared buffers over blocks asked for, since the reset (None: none asked)."""
        asked = self.blocks_hit + self.blocks_read
        return self.blocks_hit / asked if asked else None


@dataclass
class Session:
    """One server session, as far as top shows it: never its text unless asked for."""

    pid: int
    bot: str | None  # the bot whose database or role it is in (None: not a bot's)
    role: str | None
    database: str | None
    state: str | None  # None: the admin may not see other roles' sessions (pg_read_all_stats)
    statement_seconds: float | None  # since its current (or last) statement started
    transaction_seconds: float | None  # since its transaction started (None: none open)
    wait_event_type: str | None
    wait_event: str | None
    backend_type: str | None
    query: str | None = None  # only with queries=True


@dataclass
class LockWait:
    """A session waiting on a heavyweight lock (pg_locks, not granted) and the sessions that block it."""

    waiting: Session
    lock: str  # locktype and mode, e.g. "transactionid ShareLock"
    blocked_by: list[Session]


@dataclass
class Statements:
    """pg_stat_statements summed over one bot database."""

    calls: int
    exec_seconds: float
    rows: int


@dataclass
class BotSample:
    """One bot at one moment."""

    bot: str
    database: str
    role: str
    exists: bool  # its database is on the server
    connections: dict[str, int]  # by state (STATES + "other"); sessions of its role or in its database
    connection_limit: int | None  # its role's (-1: none; None: no role)
    counters: Counters | None
    size_bytes: int | None
    longest: Session | None  # the longest running active statement
    oldest_transaction: Session | None  # the session with the oldest open transaction
    lock_waits: list[LockWait] = field(default_factory=list)
    statements: Statements | None = None

    @property
    def connections_total(self) -> int:
        return sum(self.connections.values())


@dataclass
class ServerSample:
    """Every watched bot of one server at one moment (``taken``: a monotonic clock, for rates)."""

    server: str
    taken: float
    max_connections: int
    sessions: int  # client sessions on the whole server
    bots: list[BotSample]
    statements_available: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class Rates:
    """Per-second figures of one bot between two samples ``seconds`` apart."""

    seconds: float
    transactions: float
    rows_written: float
    temp_bytes: float
    growth_bytes: float | None  # database size change per second (None: size unknown)
    statement_calls: float | None = None  # pg_stat_statements, where read in both samples
    statement_seconds: float | None = None  # execution time per second: about how many statements ran at once


# -- reading -----------------------------------------------------------------------------------

_DATABASES = """
SELECT d.datname,
       s.xact_commit, s.xact_rollback, s.tup_inserted, s.tup_updated, s.tup_deleted, s.tup_returned,
       s.tup_fetched, s.blks_read, s.blks_hit, s.temp_files, s.temp_bytes, s.deadlocks,
       CASE WHEN has_database_privilege(d.oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'USAGE')
            THEN pg_database_size(d.oid) END
FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid
WHERE d.datname = ANY(%(databases)s)
"""

_ROLES = "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname = ANY(%(roles)s)"

# Every session but this one; ages from the server's own clock. The text is a separate column
# chosen by the caller (a NULL unless queries were asked for).
_ACTIVITY = """
SELECT a.pid, a.datname, a.usename, a.state, a.backend_type, a.wait_event_type, a.wait_event,
       extract(epoch FROM clock_timestamp() - a.query_start)::float8,
       extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
       {query}
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid()
"""

# The sessions waiting on a lock and who blocks them. pg_blocking_pids takes the lock manager's
# locks briefly, so it is called only for the (few) sessions that wait.
_LOCK_WAITS = """
SELECT l.pid, l.locktype, l.mode, pg_blocking_pids(l.pid)
FROM pg_locks l
WHERE NOT l.granted AND l.pid IS NOT NULL
"""

_SERVER = """
SELECT current_setting('max_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       pg_has_role('pg_read_all_stats', 'USAGE'),
       (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname = 'pg_stat_statements')
"""

_STATEMENTS = """
SELECT d.datname, sum(s.calls)::bigint, sum(s.total_exec_time)::float8 / 1000, sum(s.rows)::bigint
FROM {schema}.pg_stat_statements(false) s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = ANY(%(databases)s)
GROUP BY d.datname
"""


def sample(conn: psycopg.Connection, server: str, watched: Iterable[Watched], *, queries: bool = False) -> ServerSample:
    """One sample of ``watched`` on the server ``conn`` is connected to (an autocommit admin
    connection: each query reads fresh statistics). ``queries``: also read statement texts."""
    bots = list(watched)
    by_db = {w.database: w for w in bots}
    by_role = {w.role: w for w in bots}
    params = {"databases": list(by_db), "roles": list(by_role)}
    taken = time.monotonic()
    max_connections, sessions, reads_all, statements_schema = conn.execute(_SERVER).fetchone()  # type: ignore[misc]
    databases = {row[0]: row for row in conn.execute(_DATABASES, params)}
    limits = dict(conn.execute(_ROLES, params).fetchall())
    text = sql.SQL("a.query") if queries else sql.SQL("NULL::text")
    activity = [_session(row, by_db, by_role) for row in conn.execute(sql.SQL(_ACTIVITY).format(query=text))]
    waits = _lock_waits(conn, {s.pid: s for s in activity})
    notes: list[str] = []
    if not (reads_all or _is_superuser(conn)):
        notes.append("the admin role may not see other roles' sessions: GRANT pg_read_all_stats TO it "
                     "for their states, ages and waits")
    statements, available = _statements(conn, statements_schema, params, notes)
    return ServerSample(
        server=server, taken=taken, max_connections=max_connections, sessions=sessions,
        bots=[_bot(w, databases.get(w.database), limits.get(w.role), activity, waits, statements.get(w.database))
              for w in bots],
        statements_available=available, notes=notes)


def _is_superuser(conn: psycopg.Connection) -> bool:
    return conn.info.parameter_status("is_superuser") == "on"


def _session(row: tuple, by_db: dict[str, Watched], by_role: dict[str, Watched]) -> Session:
    pid, datname, usename, state, backend_type, wait_type, wait, stmt_age, xact_age, query = row
    owner = by_role.get(usename) or by_db.get(datname)
    return Session(pid=pid, bot=owner.bot if owner else None, role=usename, database=datname, state=state,
                   statement_seconds=stmt_age, transaction_seconds=xact_age, wait_event_type=wait_type,
                   wait_event=wait, backend_type=backend_type, query=query)


def _lock_waits(conn: psycopg.Connection, sessions: dict[int, Session]) -> list[LockWait]:
    waits = []
    for pid, locktype, mode, blockers in conn.execute(_LOCK_WAITS):
        waiting = sessions.get(pid)
        if waiting is None:  # gone since pg_stat_activity was read
            continue
        blocked_by = [sessions.get(b) or _unknown_session(b) for b in blockers or ()]
        waits.append(LockWait(waiting=waiting, lock=f"{locktype} {mode}", blocked_by=blocked_by))
    return waits


def _unknown_session(pid: int) -> Session:
    """A blocker that started after pg_stat_activity was read (or a prepared transaction: pid 0)."""
    return Session(pid=pid, bot=None, role=None, database=None, state=None, statement_seconds=None,
                   transaction_seconds=None, wait_event_type=None, wait_event=None, backend_type=None)


def _statements(conn: psycopg.Connection, schema: str | None, params: dict[str, Any],
                notes: list[str]) -> tuple[dict[str, Statements], bool]:
    """pg_stat_statements per bot database, where the extension is installed here and loaded."""
    if schema is None:
        return {}, False
    query = sql.SQL(_STATEMENTS).format(schema=sql.Identifier(schema))
    try:
        rows = conn.execute(query, params).fetchall()
    except psycopg.Error as err:  # not in shared_preload_libraries, or no privilege on its view
        from .errors import one_line

        notes.append(f"pg_stat_statements is installed but cannot be read: {one_line(err)}")
        return {}, False
    return {r[0]: Statements(calls=r[1] or 0, exec_seconds=r[2] or 0.0, rows=r[3] or 0) for r in rows}, True


def _bot(w: Watched, db: tuple | None, limit: int | None, activity: list[Session], waits: list[LockWait],
         statements: Statements | None) -> BotSample:
    mine = [s for s in activity if s.bot == w.bot and s.backend_type == "client backend"]
    connections = dict.fromkeys((*STATES, "other"), 0)
    for s in mine:
        connections[s.state if s.state in STATES else "other"] += 1
    active = [s for s in mine if s.state == "active" and s.statement_seconds is not None]
    open_xacts = [s for s in mine if s.transaction_seconds is not None]
    counters = None
    if db is not None and db[1] is not None:
        counters = Counters(*(int(v or 0) for v in db[1:13]))
    return BotSample(
        bot=w.bot, database=w.database, role=w.role, exists=db is not None, connections=connections,
        connection_limit=limit, counters=counters, size_bytes=db[13] if db is not None else None,
        longest=max(active, key=lambda s: s.statement_seconds or 0.0, default=None),
        oldest_transaction=max(open_xacts, key=lambda s: s.transaction_seconds or 0.0, default=None),
        lock_waits=[lw for lw in waits if lw.waiting.bot == w.bot], statements=statements)


# -- figures -----------------------------------------------------------------------------------

def rates(before: ServerSample, after: ServerSample) -> dict[str, Rates]:
    """Each bot's per-second figures between two samples of one server (bots in both, with
    counters in both). A counter that went down (statistics reset) counts from zero."""
    seconds = after.taken - before.taken
    if seconds <= 0:
        return {}
    old = {b.bot: b for b in before.bots}
    out: dict[str, Rates] = {}
    for b in after.bots:
        a = old.get(b.bot)
        if a is None or a.counters is None or b.counters is None:
            continue

        def per_s(now: int, then: int) -> float:
            return (now - then if now >= then else now) / seconds

        growth = None
        if a.size_bytes is not None and b.size_bytes is not None:
            growth = (b.size_bytes - a.size_bytes) / seconds
        calls = busy = None
        if a.statements is not None and b.statements is not None:
            calls = per_s(b.statements.calls, a.statements.calls)
            busy = max(0.0, b.statements.exec_seconds - a.statements.exec_seconds) / seconds
        out[b.bot] = Rates(seconds=seconds, transactions=per_s(b.counters.transactions, a.counters.transactions),
                           rows_written=per_s(b.counters.rows_written, a.counters.rows_written),
                           temp_bytes=per_s(b.counters.temp_bytes, a.counters.temp_bytes), growth_bytes=growth,
                           statement_calls=calls, statement_seconds=busy)
    return out


def as_dict(s: ServerSample, r: dict[str, Rates] | None = None) -> dict[str, Any]:
    """A server's sample (and rates) for --json: plain data, derived figures spelled out."""
    bots = []
    for b in s.bots:
        row = asdict(b)
        row["connections"]["total"] = b.connections_total
        if b.counters is not None:
            row["counters"].update(transactions=b.counters.transactions, rows_written=b.counters.rows_written,
                                   cache_hit_ratio=b.counters.cache_hit_ratio)
        rate = (r or {}).get(b.bot)
        row["rates"] = asdict(rate) if rate is not None else None
        bots.append(row)
    return {"server": s.server, "max_connections": s.max_connections, "sessions": s.sessions,
            "statements_available": s.statements_available, "notes": s.notes, "bots": bots}


# -- Prometheus text exposition format ---------------------------------------------------------

# (name, type, help, value of a BotSample or None to leave the bot out)
_COUNTERS: list[tuple[str, str, Any]] = [
    ("botfleet_bot_transactions_total", "Transactions of the bot's database (commits and rollbacks).",
     lambda c: c.transactions),
    ("botfleet_bot_rollbacks_total", "Transactions of the bot's database rolled back.", lambda c: c.rollbacks),
    ("botfleet_bot_rows_inserted_total", "Rows inserted in the bot's database.", lambda c: c.rows_inserted),
    ("botfleet_bot_rows_updated_total", "Rows updated in the bot's database.", lambda c: c.rows_updated),
    ("botfleet_bot_rows_deleted_total", "Rows deleted in the bot's database.", lambda c: c.rows_deleted),
    ("botfleet_bot_rows_written_total", "Rows inserted, updated and deleted in the bot's database.",
     lambda c: c.rows_written),
    ("botfleet_bot_blocks_read_total", "Blocks the bot's database read outside shared buffers.",
     lambda c: c.blocks_read),
    ("botfleet_bot_blocks_hit_total", "Blocks the bot's database found in shared buffers.", lambda c: c.blocks_hit),
    ("botfleet_bot_temp_files_total", "Temporary files the bot's queries wrote.", lambda c: c.temp_files),
    ("botfleet_bot_temp_bytes_total", "Bytes of temporary files the bot's queries wrote.", lambda c: c.temp_bytes),
    ("botfleet_bot_deadlocks_total", "Deadlocks detected in the bot's database.", lambda c: c.deadlocks),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float | int) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Exposition:
    """Metric families in order, each with its HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict[str, str], value: float | int) -> None:
        family = self.families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(**labels)} {_number(value)}")

    def text(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self.families.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def exposition(samples: list[ServerSample], unreachable: dict[str, str] | None = None) -> str:
    """Every server's sample in Prometheus's text exposition format (version 0.0.4): counters
    from pg_stat_database as ``_total``, gauges for connections, size and ages; each bot's
    series labelled ``server`` and ``bot``. ``botfleet_up`` is 0 for a server not read
    (``unreachable``: its name and why, which is not exported)."""
    out = _Exposition()
    up = "Whether botfleet read the server's statistics (1) or could not reach it (0)."
    for s in samples:
        out.add("botfleet_up", "gauge", up, {"server": s.server}, 1)
    for name in sorted(unreachable or {}):
        out.add("botfleet_up", "gauge", up, {"server": name}, 0)
    for s in samples:
        out.add("botfleet_server_max_connections", "gauge", "The server's max_connections.",
                {"server": s.server}, s.max_connections)
        out.add("botfleet_server_connections", "gauge", "Client sessions on the whole server.",
                {"server": s.server}, s.sessions)
    for s in samples:
        for b in s.bots:
            _bot_series(out, s.server, b)
    return out.text()


def _bot_series(out: _Exposition, server: str, b: BotSample) -> None:
    labels = {"server": server, "bot": b.bot}
    for state, n in b.connections.items():
        out.add("botfleet_bot_connections", "gauge", "The bot's sessions by state (its role's, or in its database).",
                {**labels, "state": state}, n)
    if b.connection_limit is not None:
        out.add("botfleet_bot_connection_limit", "gauge", "The bot's role's connection limit (-1: none).",
                labels, b.connection_limit)
    if b.counters is not None:
        for name, help_text, value in _COUNTERS:
            out.add(name, "counter", help_text, labels, value(b.counters))
    if b.size_bytes is not None:
        out.add("botfleet_bot_database_size_bytes", "gauge", "The bot's database size.", labels, b.size_bytes)
    out.add("botfleet_bot_longest_statement_seconds", "gauge",
            "Age of the bot's longest running active statement (0: none running).", labels,
            float(b.longest.statement_seconds or 0.0) if b.longest else 0.0)
    out.add("botfleet_bot_oldest_transaction_seconds", "gauge",
            "Age of the bot's oldest open transaction (0: none open).", labels,
            float(b.oldest_transaction.transaction_seconds or 0.0) if b.oldest_transaction else 0.0)
    out.add("botfleet_bot_lock_waiting_sessions", "gauge", "The bot's sessions waiting on a lock.",
            labels, len(b.lock_waits))
    if b.statements is not None:
        out.add("botfleet_bot_statement_calls_total", "counter", "Statements the bot ran (pg_stat_statements).",
                labels, b.statements.calls)
        out.add("botfleet_bot_statement_seconds_total", "counter",
                "Time the bot's statements ran (pg_stat_statements).", labels, b.statements.exec_seconds)
