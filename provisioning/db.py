"""Admin connections to the shared server: open, describe, translate errors, lock.

psycopg is imported here and only here at module level, so ``provision --help``
never pays for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import (
    AuthenticationFailed,
    InsufficientPrivilege,
    InvalidInput,
    LockTimeout,
    ProvisionError,
    ServerUnreachable,
)

# Advisory-lock namespace: "bf" in the high bytes, so botfleet's locks never
# collide with an application's own two-key advisory locks by accident.
LOCK_NAMESPACE = 0x62660001


def parse_url(url: str) -> dict[str, str]:
    """Split a libpq URL or key=value string, accepting SQLAlchemy-style schemes (a new dict
    each call: the caller may change it)."""
    return dict(_parse_url(url))


@functools.lru_cache(maxsize=64)  # a fleet-wide command builds each bot's conninfo from the one admin URL
def _parse_url(url: str) -> tuple[tuple[str, str], ...]:
    for prefix in ("postgresql+psycopg://", "postgresql+asyncpg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix):]
    try:
        return tuple((k, str(v)) for k, v in conninfo_to_dict(url).items())
    except psycopg.ProgrammingError:
        raise InvalidInput("the admin URL is malformed (expected postgresql://user[:password]@host[:port]/dbname)") from None


def describe(url: str) -> str:
    """A printable description of a server URL: user@host:port/dbname, never the password."""
    params = parse_url(url)
    host = params.get("host") or "localhost"
    if host.startswith("/"):
        host = f"[socket {host}]"
    port = params.get("port") or "5432"
    user = params.get("user") or "(default user)"
    return f"{user}@{host}:{port}/{params.get('dbname') or user}"


# libpq connection keywords -> the environment variables libpq tools read them from.
PG_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "passfile": "PGPASSFILE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME", "options": "PGOPTIONS", "target_session_attrs": "PGTARGETSESSIONATTRS",
}


def libpq_env(url: str, dbname: str | None = None) -> dict[str, str]:
    """The process environment plus ``url`` as PG* variables, for pg_dump or psql:
    a password in a child's arguments would be visible to every user. With ``dbname`` (the
    admin's URL into another database) the session is pinned (PGOPTIONS, :func:`with_database`)."""
    env = dict(os.environ)
    params = parse_url(url if dbname is None else with_database(url, dbname))
    for key, value in params.items():
        if key not in PG_ENV:
            raise InvalidInput(f"the admin URL parameter {key!r} cannot be passed to libpq tools")
        env[PG_ENV[key]] = value
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    return env


# What a session botfleet opens as the admin (or as any role but the bot) into a database a bot
# OWNS pins at connection time. A database's owner may `ALTER DATABASE ... SET` any USERSET
# parameter, and those defaults apply to EVERY session in that database, the admin's included
# (CVE-2018-1058's class). Startup options (libpq `options`, PGOPTIONS for the tools) win over
# database and role defaults, so these are immune:
# - search_path: a bot's `evil, pg_catalog` would resolve the admin's unqualified functions,
#   operators and tables to the bot's own, run with the admin's rights. pg_catalog first, and
#   pg_temp named last (else the temp schema is searched first); botfleet's statements name
#   anything outside pg_catalog with its schema.
# - role: a database default `role = bot` turns an admin (superuser: member of every role) into
#   the bot for the whole session; `none` keeps the login role.
# - default_transaction_read_only: `on` would fail every repair (a denial, pinned because cheap).
# - local_preload_libraries: an owner may name a library from $libdir/plugins that loads into
#   the admin's session (or fails it at login).
# - standard_conforming_strings: `off` changes how string literals are read.
# - row_security: `off` makes reading a table with a row security policy fail instead of
#   running the bot's policy expression as the admin (superusers bypass policies anyway).
# Not pinned: statement_timeout, lock_timeout and the like only delay or fail a command; the
# admin's own settings (set in its session) win anyway. session_authorization may be set per
# database but is not applied at login (checked on PostgreSQL 15); session_preload_libraries
# needs a superuser. A bot's OWN sessions (its app, its migrations, restore's psql as the bot)
# keep its settings: a bot may shoot itself in the foot, not the admin.
PINNED_SETTINGS = (
    ("search_path", "pg_catalog,pg_temp"),
    ("role", "none"),
    ("default_transaction_read_only", "off"),
    ("local_preload_libraries", ""),
    ("standard_conforming_strings", "on"),
    ("row_security", "off"),
)
PINNED_OPTIONS = " ".join(f"-c {name}={value}" for name, value in PINNED_SETTINGS)


def pinned(params: dict[str, str]) -> dict[str, str]:
    """``params`` with :data:`PINNED_SETTINGS` after any ``options`` the URL had (the later
    ``-c`` wins); a ``role`` the admin URL's own options choose (an admin that logs in as one
    role and acts as another) is kept: that is the operator's, not a bot's."""
    options = params.get("options", "").strip()
    if PINNED_OPTIONS in options:
        return dict(params)
    own_role = any(word in options for word in ("-c role=", "-crole=", "--role="))
    pins = " ".join(f"-c {name}={value}" for name, value in PINNED_SETTINGS if not (name == "role" and own_role))
    return {**params, "options": f"{options} {pins}".strip()}


def with_database(url: str, dbname: str, *, pin: bool = True) -> str:
    """The same server and credentials, another database; an admin session there is pinned
    (:data:`PINNED_SETTINGS`) unless ``pin`` is False, for a database no bot owns that needs a
    usual search_path (a scratch database where migrations create tables)."""
    params = parse_url(url)
    params["dbname"] = dbname
    return make_conninfo(**(pinned(params) if pin else params))


def as_role(url: str, role: str, password: str, dbname: str, *, application_name: str | None = None) -> str:
    """A libpq conninfo for ``role`` with its own password on the admin URL's server
    (same host, port and TLS settings): how the provisioner acts *as a bot*.
    The admin's own passfile is dropped: the bot's password is explicit."""
    return make_conninfo(**role_params(url, role, password, dbname, application_name=application_name))


def role_params(url: str, role: str, password: str, dbname: str, *, application_name: str | None = None
                ) -> dict[str, str]:
    """:func:`as_role` as libpq keywords (what ``parse_url(as_role(...))`` gives, without
    composing and parsing the string again)."""
    params = parse_url(url)
    params.pop("passfile", None)
    params.update(user=role, password=password, dbname=dbname)
    if application_name:
        params["application_name"] = application_name
    return params


_REASONS = (
    ("connection refused", "connection refused (is the server running and listening there?)"),
    ("timeout expired", "connection timed out"),
    ("could not translate host name", "unknown host name"),
    ("no such file or directory", "no server socket there (is the server running?)"),
    ("too many connections", "the server has no free connection slots"),
    ("does not allow connections", "the server refuses new connections"),
    ("is not permitted to log in", "the admin role may not log in"),
    ("no pg_hba.conf entry", "pg_hba.conf has no entry for this host, user and database"),
    ("ssl", "SSL negotiation failed"),
)


def _translate(err: psycopg.OperationalError, url: str) -> ProvisionError:
    """One line a user can act on; libpq's text never includes the password."""
    where = describe(url)
    low = str(err).lower()
    if "password authentication failed" in low or "no password supplied" in low or "authentication failed" in low:
        return AuthenticationFailed(f"authentication failed for {where}: check the admin user and password")
    if "does not exist" in low and ("role" in low or "database" in low):
        what = "role" if "role" in low else "database"
        return AuthenticationFailed(f"cannot log in to {where}: that {what} does not exist")
    for needle, reason in _REASONS:
        if needle in low:
            return ServerUnreachable(f"cannot reach PostgreSQL at {where}: {reason}")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return ServerUnreachable(f"cannot reach PostgreSQL at {where}: {first}")


def connect(url: str, *, autocommit: bool = True, connect_timeout: int = 10) -> psycopg.Connection:
    """Open an admin connection; failures become one-line ProvisionErrors.

    Every one is pinned (:data:`PINNED_SETTINGS`), in a bot's database and elsewhere (the
    admin URL's database, botfleet's own): nothing botfleet runs as the admin needs another
    search_path (what it keeps outside pg_catalog is named with its schema).

    Autocommit by default: CREATE/DROP DATABASE refuse to run in a transaction;
    callers that want atomic steps open ``conn.transaction()`` themselves.
    """
    params = pinned(parse_url(url))
    params.setdefault("connect_timeout", str(connect_timeout))
    params.setdefault("application_name", "botfleet-provision")
    try:
        return psycopg.connect(make_conninfo(**params), autocommit=autocommit)
    except psycopg.OperationalError as err:
        raise _translate(err, url) from None


@dataclass(frozen=True)
class AdminInfo:
    role: str
    superuser: bool
    createdb: bool
    createrole: bool
    server_version: int  # e.g. 150020

    @property
    def major(self) -> int:
        return self.server_version // 10000


def admin_info(conn: psycopg.Connection) -> AdminInfo:
    """Who we are on the server; raises InsufficientPrivilege when we cannot provision."""
    row = conn.execute(
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    info = AdminInfo(row[0], row[1], row[2], row[3], conn.info.server_version)
    if not (info.superuser or (info.createdb and info.createrole)):
        raise InsufficientPrivilege(
            f"role {info.role!r} cannot provision bots: it needs SUPERUSER, or CREATEDB and CREATEROLE"
        )
    return info


def lock_key(name: str) -> int:
    """A stable signed 32-bit key for a bot name."""
    value = zlib.crc32(name.encode())
    return value - (1 << 32) if value >= (1 << 31) else value


def _lock_holder(conn: psycopg.Connection, key: int) -> str:
    """Who holds botfleet's advisory lock ``key``, in words (never a query text)."""
    row = conn.execute(
        "SELECT a.usename, a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid LIMIT 1",
        (LOCK_NAMESPACE & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
    if row is None:
        return "another session (gone by now)"
    user, app, pid = row
    if (app or "").startswith("botfleet"):
        return f"another provision run (pid {pid} on the server, role {user})"
    return f"a session that is not botfleet's (role {user}, application {app or '-'}, pid {pid} on the server)"


@contextlib.contextmanager
def advisory_lock(conn: psycopg.Connection, name: str, *, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold botfleet's session-level advisory lock for one bot for the block.

    Two provisioners working on the same bot serialise here; the second waits
    up to ``timeout_s`` and then fails with a clear message.
    """
    key = lock_key(name)
    ms = int(timeout_s * 1000)
    try:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{ms}ms")))
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, key))
    except psycopg.errors.LockNotAvailable:
        holder = _lock_holder(conn, key)
        raise LockTimeout(f"bot {name!r} is being changed by {holder}; gave up after {timeout_s:g}s") from None
    finally:
        conn.execute("RESET lock_timeout")
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, key))


# --- botfleet's own database on each server: where its admin session (and its advisory locks) live.
# The maintenance database `postgres` is open to every role by default, so a bot could take
# botfleet's locks there and block it; PUBLIC may not connect to this one.
STATE_DATABASE = "botfleet"
STATE_COMMENT = "botfleet: the provisioner's own sessions and locks; no bot may connect"
MAINTENANCE_DATABASES = ("postgres", "template1")


def ensure_state_database(conn: psycopg.Connection) -> None:
    """Create botfleet's own database, closed to PUBLIC, when the server has none.

    It is created refusing connections and opened once PUBLIC's rights are gone and its marker
    is on. A caller that finds it still closed with no other marker (a concurrent creator between
    those steps, or one killed there) finishes it the same way: the steps are idempotent, so the
    race's loser never fails on a database "not currently accepting connections", and a crash
    never leaves the fleet without one. A closed database of that name that someone else marked
    is left alone (the caller's connection to it then fails and says why)."""
    ident = sql.Identifier(STATE_DATABASE)
    row = conn.execute("SELECT datallowconn, shobj_description(oid, 'pg_database') FROM pg_database "
                       "WHERE datname = %s", (STATE_DATABASE,)).fetchone()
    if row is not None and (row[0] or row[1] not in (None, STATE_COMMENT)):
        return
    if row is None:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ALLOW_CONNECTIONS false").format(ident))
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            pass  # a concurrent caller made it (or is making it: the catalog's unique index): finish it with them
    with conn.transaction():
        # One finisher at a time (concurrent GRANTs on one database fail: "tuple concurrently
        # updated"); the lock lasts this transaction, and a finisher after the first finds it open.
        conn.execute("SET LOCAL lock_timeout = '30s'")
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(STATE_DATABASE)))
        opened = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (STATE_DATABASE,)).fetchone()
        if opened is None or opened[0]:
            return
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(STATE_COMMENT)))
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))


def open_maintenance_databases(conn: psycopg.Connection) -> list[str]:
    """The maintenance databases every role (so every bot) may connect to."""
    rows = conn.execute(
        "SELECT d.datname FROM pg_database d WHERE d.datname = ANY(%s) AND EXISTS ("
        " SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a"
        " WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT') ORDER BY 1", (list(MAINTENANCE_DATABASES),)).fetchall()
    return [r[0] for r in rows]


def close_maintenance_databases(conn: psycopg.Connection) -> list[str]:
    """REVOKE CONNECT ON the maintenance databases FROM PUBLIC, on a server botfleet runs (its
    embedded one, the stack's): bots reach their own database only. Returns what it closed."""
    if not open_maintenance_databases(conn):
        return []
    with conn.transaction():
        # One at a time (concurrent first commands on a new server would otherwise fail on
        # "tuple concurrently updated"); the next one finds them closed.
        conn.execute("SET LOCAL lock_timeout = '30s'")
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, lock_key("maintenance databases")))
        closed = open_maintenance_databases(conn)
        for name in closed:
            conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
    return closed
