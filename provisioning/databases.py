"""Bot databases: inspect, create, converge, drop."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class DatabaseSpec:
    name: str
    owner: str
    connection_limit: int
    comment: str


@dataclass
class DatabaseState:
    owner: str
    encoding: str
    connection_limit: int
    public_privileges: str | None  # what PUBLIC (every role) may do on it, e.g. "CONNECT, TEMPORARY"
    comment: str | None
    allow_connections: bool = True
    # Defaults set on the database for every session in it (ALTER DATABASE ... SET), e.g.
    # ["search_path=evil, pg_catalog"]: botfleet sets none, so each is the bot's own (the owner may
    # set them). botfleet's admin sessions are immune (db.PINNED_SETTINGS); other tools' are not.
    settings: tuple[str, ...] = ()

    @property
    def public_can_connect(self) -> bool:
        return self.public_privileges is not None


_INSPECT = """
SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datconnlimit,
       (SELECT string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type)
        FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a WHERE a.grantee = 0),
       shobj_description(d.oid, 'pg_database'), d.datallowconn,
       (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setdatabase = d.oid AND s.setrole = 0)
FROM pg_database d WHERE d.datname = %(name)s
"""


def inspect(conn: psycopg.Connection, name: str) -> DatabaseState | None:
    row = conn.execute(_INSPECT, {"name": name}).fetchone()
    return None if row is None else _state(row)


def inspect_many(conn: psycopg.Connection, names: list[str]) -> dict[str, DatabaseState]:
    """:func:`inspect` of each of ``names`` in one query (a fleet-wide read): the ones that exist."""
    query = (_INSPECT.replace("d.datname = %(name)s", "d.datname = ANY(%(names)s)")
             .replace("SELECT pg_get_userbyid", "SELECT d.datname, pg_get_userbyid"))
    return {row[0]: _state(row[1:]) for row in conn.execute(query, {"names": list(names)}).fetchall()}


def _state(row) -> DatabaseState:
    return DatabaseState(owner=row[0], encoding=row[1], connection_limit=row[2], public_privileges=row[3],
                         comment=row[4], allow_connections=row[5], settings=tuple(row[6] or ()))


def create(conn: psycopg.Connection, spec: DatabaseSpec) -> None:
    """CREATE DATABASE (needs an autocommit connection), then lock it down.

    It is created refusing every connection and opened only once PUBLIC's rights are revoked
    and the marker is on it: a crash in between leaves a database no one can open, which
    :func:`half_made` recognises and the next run finishes."""
    conn.execute(
        sql.SQL("CREATE DATABASE {} WITH OWNER {} ENCODING 'UTF8' TEMPLATE template0 CONNECTION LIMIT {} "
                "ALLOW_CONNECTIONS false").format(
            sql.Identifier(spec.name), sql.Identifier(spec.owner), sql.Literal(spec.connection_limit)
        )
    )
    with conn.transaction():
        _lock_down(conn, spec)
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(spec.name)))


def half_made(spec: DatabaseSpec, state: DatabaseState) -> bool:
    """A database :func:`create` began and a crash interrupted: the bot's role owns it, it has
    no comment yet, and it still refuses every connection (so nothing could have used it)."""
    return state.owner == spec.owner and state.comment is None and not state.allow_connections


def _lock_down(conn: psycopg.Connection, spec: DatabaseSpec) -> None:
    ident = sql.Identifier(spec.name)
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(spec.comment)))


@dataclass(frozen=True)
class DatabaseDiff:
    """How an existing database differs from its spec: the one comparison behind
    :func:`converge` and every report of it (words are the caller's)."""

    owner: bool
    connection_limit: bool
    allow_connections: bool  # it refuses connections and must accept them again
    public: bool  # PUBLIC has rights on it
    comment: bool  # the marker comment differs
    settings: tuple[str, ...] = ()  # database-level defaults to reset (RESET ALL)


def diff(spec: DatabaseSpec, state: DatabaseState) -> DatabaseDiff:
    return DatabaseDiff(owner=state.owner != spec.owner, connection_limit=state.connection_limit != spec.connection_limit,
                        allow_connections=not state.allow_connections, public=state.public_can_connect,
                        comment=state.comment != spec.comment, settings=state.settings)


def converge(conn: psycopg.Connection, spec: DatabaseSpec, state: DatabaseState) -> DatabaseDiff:
    """Repair owner, connection limit, ALLOW_CONNECTIONS, PUBLIC access, the marker comment and
    database-level defaults (reset); returns what differed."""
    d = diff(spec, state)
    ident = sql.Identifier(spec.name)
    with conn.transaction():
        if d.owner:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(spec.owner)))
        if d.connection_limit:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(spec.connection_limit)))
        if d.allow_connections:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))
        if d.public or d.comment:
            _lock_down(conn, spec)
        if d.settings:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET ALL").format(ident))
    return d


_PUBLIC_ON_SCHEMA = (
    "SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a"
    " WHERE n.nspname = 'public' AND a.grantee = 0)"
)


def public_schema_open(conn: psycopg.Connection) -> bool:
    """Whether PUBLIC has any right on schema public (``conn`` is in the bot's database)."""
    row = conn.execute(_PUBLIC_ON_SCHEMA).fetchone()
    return bool(row and row[0])


def lock_down_schema(conn: psycopg.Connection) -> list[str]:
    """Inside the bot's database: PUBLIC gets no rights on schema public.

    ``conn`` must be connected to the bot database itself (schema ACLs are per database).
    """
    if public_schema_open(conn):
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        return ["revoked PUBLIC rights on schema public"]
    return []


def drop(conn: psycopg.Connection, name: str) -> bool:
    """Drop the database, ending its sessions (PostgreSQL 13+); returns whether it existed."""
    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
        return False
    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    return True
