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
    public_can_connect: bool
    comment: str | None
    allow_connections: bool = True


_INSPECT = """
SELECT pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datconnlimit,
       d.datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(d.datacl) a WHERE a.grantee = 0),
       shobj_description(d.oid, 'pg_database'), d.datallowconn
FROM pg_database d WHERE d.datname = %(name)s
"""


def inspect(conn: psycopg.Connection, name: str) -> DatabaseState | None:
    row = conn.execute(_INSPECT, {"name": name}).fetchone()
    if row is None:
        return None
    return DatabaseState(owner=row[0], encoding=row[1], connection_limit=row[2], public_can_connect=row[3], comment=row[4],
                         allow_connections=row[5])


def create(conn: psycopg.Connection, spec: DatabaseSpec) -> None:
    """CREATE DATABASE (needs an autocommit connection), then lock it down."""
    conn.execute(
        sql.SQL("CREATE DATABASE {} WITH OWNER {} ENCODING 'UTF8' TEMPLATE template0 CONNECTION LIMIT {}").format(
            sql.Identifier(spec.name), sql.Identifier(spec.owner), sql.Literal(spec.connection_limit)
        )
    )
    with conn.transaction():
        _lock_down(conn, spec)


def _lock_down(conn: psycopg.Connection, spec: DatabaseSpec) -> None:
    ident = sql.Identifier(spec.name)
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(spec.comment)))


def _differences(spec: DatabaseSpec, state: DatabaseState) -> dict[str, str]:
    """How an existing database differs from its spec, key -> words: the one comparison
    behind both :func:`drift` and :func:`converge`."""
    out: dict[str, str] = {}
    if state.owner != spec.owner:
        out["owner"] = f"database owner {state.owner} -> {spec.owner}"
    if state.connection_limit != spec.connection_limit:
        out["limit"] = f"database connection limit {state.connection_limit} -> {spec.connection_limit}"
    if not state.allow_connections:
        out["allow"] = "database accepts connections again"
    if state.public_can_connect:
        out["public"] = "revoke PUBLIC access to the database"
    if state.comment != spec.comment:
        out["marker"] = "database marker comment"
    return out


def drift(spec: DatabaseSpec, state: DatabaseState) -> list[str]:
    """What :func:`converge` would change on this database, in words; reads nothing."""
    return list(_differences(spec, state).values())


def converge(conn: psycopg.Connection, spec: DatabaseSpec, state: DatabaseState) -> list[str]:
    """Repair owner, connection limit, PUBLIC access and the marker comment; returns what was
    repaired (a restored marker comment is not reported)."""
    d = _differences(spec, state)
    ident = sql.Identifier(spec.name)
    with conn.transaction():
        if "owner" in d:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(spec.owner)))
        if "limit" in d:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(spec.connection_limit)))
        if "allow" in d:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))
        if "public" in d or "marker" in d:
            _lock_down(conn, spec)
    d.pop("marker", None)
    if "public" in d:
        d["public"] = "revoked PUBLIC access to the database"
    return list(d.values())


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
