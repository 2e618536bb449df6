"""A bot's storage quota (``max_size``): its database's size against it, and the enforcement
the operator opts into (``provision quota enforce``).

What holds in PostgreSQL's privilege model: a bot OWNS its database and everything in it, so
whatever an owner may change is no enforcement (database settings, grants on its own tables,
``default_transaction_read_only``, which is PGC_USERSET: ``SET ... = off`` or ``BEGIN READ
WRITE`` undoes it; the database's own CONNECTION LIMIT and ALLOW_CONNECTIONS, which its
owner may alter). What a bot cannot change about itself is its role's attributes: only a
superuser or a CREATEROLE admin may ``ALTER ROLE ... LOGIN``. So an enforced quota SUSPENDS the
bot: its role becomes NOLOGIN and its sessions are ended; nothing it can run brings it back.

The enforcement is recorded in a table of botfleet's own database on that server (see
db.STATE_DATABASE, which no bot may connect to), so the reconcile (add-bot, apply, doctor
--fix, the stack's provisioning service) keeps the role NOLOGIN instead of "repairing" it,
until ``provision quota enforce`` finds the bot under its quota again (or without one) and
lifts it: LOGIN again and the record removed, in one transaction.

A database's size is ``pg_database_size``: its files. Deleting rows frees no space until
VACUUM FULL (or TRUNCATE, DROP TABLE) gives it back; plain VACUUM only makes it reusable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from .db import STATE_DATABASE, advisory_lock
from .errors import ProvisionError

# The record of enforced quotas, in botfleet's own database on each server.
TABLE = "botfleet_quota_suspensions"
# Each bot's database size at each `quota enforce` (kept SAMPLE_DAYS days): its growth.
SAMPLES = "botfleet_quota_samples"
SAMPLE_DAYS = 8
GROWTH_WINDOW = "24 hours"  # growth is shown since the newest sample at least this old (else the oldest)
TERMINATE_WAIT_MS = 5000  # how long pg_terminate_backend waits for each session to end (PostgreSQL 14+)

_CREATE = """
CREATE TABLE IF NOT EXISTS {table} (
    role name PRIMARY KEY,
    bot text NOT NULL,
    size_bytes bigint NOT NULL,
    max_size_bytes bigint NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
)
"""

_CREATE_SAMPLES = """
CREATE TABLE IF NOT EXISTS {table} (
    role name NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    size_bytes bigint NOT NULL,
    PRIMARY KEY (role, at)
)
"""


class QuotaUnrecordable(ProvisionError):
    """The admin session is not in botfleet's own database: an enforcement cannot be recorded."""


def _in_state_database(conn: psycopg.Connection) -> bool:
    return conn.info.dbname == STATE_DATABASE


def _record(conn: psycopg.Connection, table: str = TABLE) -> bool | None:
    """Whether there is a record to read: False when there is none (nothing was ever enforced on
    this server, or the admin session is not in botfleet's own database: a table of that name
    elsewhere could be anyone's); None when it is there but this admin may not read it."""
    if not _in_state_database(conn):
        return False
    row = conn.execute("SELECT c.oid IS NOT NULL, c.oid IS NOT NULL AND has_table_privilege(c.oid, 'SELECT') "
                       "FROM (SELECT to_regclass(%s) AS oid) c", (f"public.{table}",)).fetchone()
    assert row is not None
    return (True if row[1] else None) if row[0] else False


def _ensure_table(conn: psycopg.Connection, table: str = TABLE, create: str = _CREATE) -> None:
    if not _in_state_database(conn):
        raise QuotaUnrecordable(f"the admin session is not in botfleet's database {STATE_DATABASE} on this server, "
                                "where an enforced quota is recorded (GRANT CONNECT ON DATABASE "
                                f"{STATE_DATABASE} TO the admin role)")
    try:
        conn.execute(sql.SQL(create).format(table=sql.Identifier("public", table)))
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        pass  # a concurrent run made it
    # Every admin that may open botfleet's database reads it (no bot may open it); only its
    # owner writes it.
    conn.execute(sql.SQL("GRANT SELECT ON {} TO PUBLIC").format(sql.Identifier("public", table)))


@dataclass(frozen=True)
class Suspension:
    role: str
    bot: str
    size_bytes: int  # the database's size when the quota was enforced
    max_size_bytes: int
    since: str  # UTC, ISO 8601


def suspensions(conn: psycopg.Connection) -> dict[str, Suspension]:
    """Every enforced quota on this server, by role."""
    if not _record(conn):
        return {}
    rows = conn.execute(sql.SQL("SELECT role, bot, size_bytes, max_size_bytes, "
                                "to_char(since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM {}")
                        .format(sql.Identifier("public", TABLE))).fetchall()
    return {r[0]: Suspension(*r) for r in rows}


def is_suspended(conn: psycopg.Connection, role: str) -> bool | None:
    """Whether an enforced quota suspends ``role`` on this server (the reconcile keeps it NOLOGIN);
    None: the record is there but this admin may not read it (the reconcile then leaves the
    role's LOGIN attribute as it is)."""
    readable = _record(conn)
    if not readable:
        return readable
    row = conn.execute(sql.SQL("SELECT 1 FROM {} WHERE role = %s").format(sql.Identifier("public", TABLE)),
                       (role,)).fetchone()
    return row is not None


def suspended_many(conn: psycopg.Connection, role_names: list[str]) -> dict[str, bool | None]:
    """:func:`is_suspended` of each of ``role_names``, in one or two queries for the fleet."""
    readable = _record(conn)
    if not readable:
        return {role: readable for role in role_names}
    rows = conn.execute(sql.SQL("SELECT role FROM {} WHERE role = ANY(%s)").format(sql.Identifier("public", TABLE)),
                        (list(role_names),)).fetchall()
    found = {r[0] for r in rows}
    return {role: role in found for role in role_names}


def suspend(conn: psycopg.Connection, bot: str, role: str, size: int, max_size: int) -> int:
    """Enforce the quota: record it and make the role NOLOGIN (one transaction), then end the
    role's sessions. Returns how many sessions were ended. Idempotent."""
    _ensure_table(conn)
    with conn.transaction():
        conn.execute(sql.SQL("INSERT INTO {} (role, bot, size_bytes, max_size_bytes) VALUES (%s, %s, %s, %s) "
                             "ON CONFLICT (role) DO NOTHING").format(sql.Identifier("public", TABLE)),
                     (role, bot, size, max_size))
        conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN").format(sql.Identifier(role)))
    return end_sessions(conn, role)


def end_sessions(conn: psycopg.Connection, role: str) -> int:
    """Terminate every session of ``role`` (waiting for each to end on PostgreSQL 14+)."""
    wait = sql.SQL(", {}").format(sql.Literal(TERMINATE_WAIT_MS)) if conn.info.server_version >= 140000 else sql.SQL("")
    rows = conn.execute(sql.SQL("SELECT pg_terminate_backend(pid{}) FROM pg_stat_activity "
                                "WHERE usename = %s AND pid <> pg_backend_pid()").format(wait), (role,)).fetchall()
    return sum(1 for r in rows if r[0])


def lift(conn: psycopg.Connection, role: str, *, login: bool = True) -> bool:
    """Lift an enforced quota: the role may log in again and the record goes (one transaction).
    ``login`` False: only the record goes (the role is gone). Returns whether one was enforced."""
    if not _record(conn):
        return False
    with conn.transaction():
        row = conn.execute(sql.SQL("DELETE FROM {} WHERE role = %s RETURNING 1").format(sql.Identifier("public", TABLE)),
                           (role,)).fetchone()
        if row is not None and login:
            conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN").format(sql.Identifier(role)))
    return row is not None


def forget(conn: psycopg.Connection, role: str) -> None:
    """A dropped role's enforced quota and size samples go with it (remove-bot)."""
    lift(conn, role, login=False)
    if _record(conn, SAMPLES):
        conn.execute(sql.SQL("DELETE FROM {} WHERE role = %s").format(sql.Identifier("public", SAMPLES)), (role,))


_SIZES = """
SELECT d.datname, CASE WHEN has_database_privilege(d.oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'USAGE')
                       THEN pg_database_size(d.oid) END
FROM pg_database d WHERE d.datname = ANY(%s)
"""


def database_sizes(conn: psycopg.Connection, databases: list[str]) -> dict[str, int | None]:
    """Each database's size in bytes (None: the admin may not see it); missing ones left out."""
    return dict(conn.execute(_SIZES, (databases,)).fetchall()) if databases else {}


@dataclass
class QuotaState:
    """One bot's size against its quota on its server, and what ``enforce`` did."""

    bot: str
    server: str
    database: str
    size_bytes: int | None
    max_size_bytes: int | None  # None: no quota
    suspended: bool  # an enforced quota holds the bot (NOLOGIN)
    action: str = ""  # "" | "suspended" | "lifted"
    sessions_ended: int = 0
    # Growth since an earlier `quota enforce` sampled it (the newest sample a day old, else the
    # oldest): bytes, and when that sample was taken (UTC, ISO 8601). None: no sample yet.
    growth_bytes: int | None = None
    growth_since: str | None = None

    @property
    def over(self) -> bool:
        return self.max_size_bytes is not None and self.size_bytes is not None and self.size_bytes > self.max_size_bytes

    @property
    def percent(self) -> float | None:
        if self.max_size_bytes is None or self.size_bytes is None:
            return None
        return round(100.0 * self.size_bytes / self.max_size_bytes, 1)

    @property
    def state(self) -> str:
        """In a few words: suspended, over quota, ok, no quota, no database."""
        if self.suspended:
            return "suspended (over quota)" if self.over else "suspended (under quota: enforce lifts it)"
        if self.max_size_bytes is None:
            return "no quota"
        if self.size_bytes is None:
            return "no database"
        return "over quota" if self.over else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "over": self.over, "percent": self.percent, "state": self.state}


def converge(conn: psycopg.Connection, state: QuotaState, role: str) -> QuotaState:
    """``provision quota enforce`` for one bot (the caller holds its advisory lock): suspend a bot
    over its quota, lift a suspended one that is not (under it again, or without a quota)."""
    if state.over and not state.suspended:
        assert state.size_bytes is not None and state.max_size_bytes is not None
        state.sessions_ended = suspend(conn, state.bot, role, state.size_bytes, state.max_size_bytes)
        state.suspended, state.action = True, "suspended"
    elif state.suspended and not state.over and state.size_bytes is not None:
        lift(conn, role)
        state.suspended, state.action = False, "lifted"
    return state


def on_server(conn: psycopg.Connection, server: str, bots: list[tuple[str, str, str, int | None]], *,
              enforce: bool = False) -> list[QuotaState]:
    """Each bot's (name, role, database, quota in bytes) size against its quota on one server;
    with ``enforce``, each converged (:func:`converge`) under the bot's advisory lock. A bot
    whose database is not there is listed without a size (and never suspended)."""
    sizes = database_sizes(conn, [database for _, _, database, _ in bots])
    held = suspensions(conn)
    before = baselines(conn, [role for _, role, _, _ in bots])
    out = []
    for name, role, database, max_size in bots:
        state = QuotaState(name, server, database, sizes.get(database), max_size, role in held)
        with_growth(state, before.get(role))
        if enforce and (state.over or state.suspended):
            with advisory_lock(conn, name):
                state.suspended = is_suspended(conn, role)  # a concurrent run may have acted
                state.size_bytes = database_sizes(conn, [database]).get(database)
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    converge(conn, state, role)
        out.append(state)
    if enforce and _in_state_database(conn):
        record_sizes(conn, {role: sizes[database] for _, role, database, _ in bots if sizes.get(database) is not None})
    return out


def with_growth(state: QuotaState, baseline: tuple[str, int] | None) -> QuotaState:
    """``state`` with its growth since ``baseline`` (see :func:`baselines`), when it has both."""
    if baseline is not None and state.size_bytes is not None:
        state.growth_since, then = baseline
        state.growth_bytes = state.size_bytes - then
    return state


def record_sizes(conn: psycopg.Connection, sizes: dict[str, int]) -> None:
    """One size sample per role now (``quota enforce``), samples older than SAMPLE_DAYS pruned."""
    if not sizes:
        return
    _ensure_table(conn, SAMPLES, _CREATE_SAMPLES)
    table = sql.Identifier("public", SAMPLES)
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {} WHERE at < now() - make_interval(days => %s)").format(table),
                     (SAMPLE_DAYS,))
        for role, size in sizes.items():
            conn.execute(sql.SQL("INSERT INTO {} (role, size_bytes) VALUES (%s, %s) ON CONFLICT DO NOTHING")
                         .format(table), (role, size))


def baselines(conn: psycopg.Connection, roles: list[str]) -> dict[str, tuple[str, int]]:
    """Each role's growth baseline: (when, size) of its newest sample at least GROWTH_WINDOW old,
    else of its oldest one; roles without a sample are left out."""
    if not roles or not _record(conn, SAMPLES):
        return {}
    rows = conn.execute(sql.SQL(
        "SELECT DISTINCT ON (role) role, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), size_bytes "
        "FROM {} WHERE role = ANY(%s) "
        "ORDER BY role, (at <= now() - %s::interval) DESC, "
        "CASE WHEN at <= now() - %s::interval THEN at END DESC, at").format(sql.Identifier("public", SAMPLES)),
        (roles, GROWTH_WINDOW, GROWTH_WINDOW)).fetchall()
    return {role: (at, size) for role, at, size in rows}


def growth_words(state: QuotaState) -> str | None:
    """The growth for a message or a table: "+6.2 MB since 2026-11-26 03:00 UTC"; None: unknown."""
    if state.growth_bytes is None or state.growth_since is None:
        return None
    sign = "-" if state.growth_bytes < 0 else "+"
    return f"{sign}{human(abs(state.growth_bytes))} since {state.growth_since[:16].replace('T', ' ')} UTC"


def human(n: int | None) -> str:
    """A size in bytes for a message: 7.4 MB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
