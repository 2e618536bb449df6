"""Bot login roles: inspect, create, converge, drop.

Every statement is composed with psycopg.sql; values in DDL go through
sql.Literal because utility statements cannot take bind parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

# The attributes a bot role must have, as pg_roles columns -> required value.
REQUIRED_FLAGS = {
    "rolcanlogin": True,
    "rolsuper": False,
    "rolcreatedb": False,
    "rolcreaterole": False,
    "rolreplication": False,
    "rolbypassrls": False,
}
FLAG_SQL = {
    "rolcanlogin": "LOGIN",
    "rolsuper": "NOSUPERUSER",
    "rolcreatedb": "NOCREATEDB",
    "rolcreaterole": "NOCREATEROLE",
    "rolreplication": "NOREPLICATION",
    "rolbypassrls": "NOBYPASSRLS",
}


@dataclass(frozen=True)
class RoleSpec:
    name: str
    connection_limit: int
    settings: dict[str, str]  # role-level GUC defaults, e.g. statement_timeout
    comment: str
    # Settings botfleet manages on the role: one of these that ``settings`` leaves out must not
    # be set on it (RESET), so a guard dropped from fleet.toml (or one the bot set on itself) goes.
    managed: tuple[str, ...] = ()
    login: bool | None = True  # False: suspended (NOLOGIN), e.g. an enforced storage quota; None: left as it is


def wanted_flags(spec: RoleSpec) -> dict[str, bool]:
    """The attributes the role must have: REQUIRED_FLAGS, with LOGIN as the spec says (not
    compared at all when the spec leaves it as it is)."""
    wanted = dict(REQUIRED_FLAGS)
    if spec.login is None:
        del wanted["rolcanlogin"]
    else:
        wanted["rolcanlogin"] = spec.login
    return wanted


def flag_sql(flag: str, want: bool) -> str:
    """The ALTER ROLE keyword that gives ``flag`` the value ``want``."""
    word = FLAG_SQL[flag].removeprefix("NO")
    return word if want else f"NO{word}"


@dataclass
class RoleState:
    flags: dict[str, bool]
    connection_limit: int
    settings: dict[str, str]
    comment: str | None
    verifier: str | None  # only readable by a superuser (see verifier_read)
    members: list[str] = field(default_factory=list)
    # settings made for the role in one database (ALTER ROLE ... IN DATABASE ... SET): database -> settings
    database_settings: dict[str, list[str]] = field(default_factory=dict)
    verifier_read: bool = False  # verifier was read: None then means the role has no password
    valid_until: str | None = None  # the password's expiry (VALID UNTIL), when it has one; botfleet never sets it


_INSPECT = """
SELECT r.rolcanlogin, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolreplication,
       r.rolbypassrls, r.rolconnlimit,
       (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid AND s.setdatabase = 0),
       shobj_description(r.oid, 'pg_authid'), {verifier},
       (SELECT coalesce(jsonb_object_agg(d.datname, to_jsonb(s.setconfig)), '{{}}'::jsonb)
        FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE s.setrole = r.oid),
       CASE WHEN r.rolvaliduntil <> 'infinity' THEN r.rolvaliduntil::text END
FROM pg_roles r WHERE r.rolname = %(name)s
"""
# pg_authid (the password verifiers) is readable by superusers only; the
# planner checks that even inside a CASE, so the query is chosen up front.
_VERIFIER = sql.SQL("(SELECT a.rolpassword FROM pg_authid a WHERE a.oid = r.oid)")


def inspect(conn: psycopg.Connection, name: str, *, read_verifier: bool = True) -> RoleState | None:
    """The role's current state, or None when it does not exist.

    ``read_verifier`` needs superuser; without it ``verifier`` is None.
    """
    query = sql.SQL(_INSPECT).format(verifier=_VERIFIER if read_verifier else sql.SQL("NULL"))
    row = conn.execute(query, {"name": name}).fetchone()
    return None if row is None else _state(row, read_verifier)


def inspect_many(conn: psycopg.Connection, names: list[str], *, read_verifier: bool = True) -> dict[str, RoleState]:
    """:func:`inspect` of each of ``names`` in one query (a fleet-wide read): the ones that exist."""
    query = sql.SQL(_INSPECT.replace("r.rolname = %(name)s", "r.rolname = ANY(%(names)s)")
                    .replace("SELECT r.rolcanlogin", "SELECT r.rolname, r.rolcanlogin")).format(
        verifier=_VERIFIER if read_verifier else sql.SQL("NULL"))
    return {row[0]: _state(row[1:], read_verifier) for row in conn.execute(query, {"names": list(names)}).fetchall()}


def _state(row, read_verifier: bool) -> RoleState:
    flags = dict(zip(REQUIRED_FLAGS, row[0:6]))
    settings = dict(item.split("=", 1) for item in (row[7] or []))
    return RoleState(flags=flags, connection_limit=row[6], settings=settings, comment=row[8], verifier=row[9],
                     database_settings=dict(row[10]), verifier_read=read_verifier, valid_until=row[11])


def _options(flags: dict[str, bool], connection_limit: int | None, verifier: str | None,
             no_expiry: bool = False) -> sql.Composed:
    parts = [sql.SQL(flag_sql(f, want)) for f, want in flags.items()]
    if no_expiry:
        parts.append(sql.SQL("VALID UNTIL {}").format(sql.Literal("infinity")))
    if connection_limit is not None:
        parts.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(connection_limit)))
    if verifier is not None:
        parts.append(sql.SQL("PASSWORD {}").format(sql.Literal(verifier)))
    return sql.SQL(" ").join(parts)


def create(conn: psycopg.Connection, spec: RoleSpec, verifier: str) -> None:
    """Create the role with every required attribute, its settings and its marker comment."""
    with conn.transaction():
        options = _options({"rolcanlogin": True, **wanted_flags(spec)}, spec.connection_limit, verifier)
        conn.execute(sql.SQL("CREATE ROLE {} WITH {}").format(sql.Identifier(spec.name), options))
        for key, value in spec.settings.items():
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(sql.Identifier(spec.name), sql.Identifier(key), sql.Literal(value)))
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(spec.name), sql.Literal(spec.comment)))


@dataclass(frozen=True)
class RoleDiff:
    """How an existing role differs from its spec (the password aside): the one
    comparison behind :func:`converge` and every report of it (words are the caller's)."""

    wrong_flags: list[str]  # pg_roles columns whose value is wrong
    connection_limit: int | None  # the spec's limit, when the role's differs
    settings: dict[str, str]  # key -> wanted value, for the ones that differ
    comment: bool  # the marker comment differs
    database_settings: dict[str, list[str]] = field(default_factory=dict)  # to reset: the role's own defaults rule
    valid_until: str | None = None  # the password expires then: lifted (a bot's password does not expire)
    unset: list[str] = field(default_factory=list)  # managed settings the role has but must not: RESET


def diff(spec: RoleSpec, state: RoleState) -> RoleDiff:
    # Only what is wrong is altered: a non-superuser admin may not even
    # mention SUPERUSER, REPLICATION or BYPASSRLS.
    wrong = [f for f, want in wanted_flags(spec).items() if state.flags[f] != want]
    limit = spec.connection_limit if state.connection_limit != spec.connection_limit else None
    settings = {k: v for k, v in spec.settings.items() if state.settings.get(k) != v}
    unset = [k for k in spec.managed if k not in spec.settings and k in state.settings]
    return RoleDiff(wrong, limit, settings, state.comment != spec.comment, dict(state.database_settings),
                    state.valid_until, unset)


def converge(conn: psycopg.Connection, spec: RoleSpec, state: RoleState, verifier: str | None) -> RoleDiff:
    """Bring an existing role to ``spec``; returns what differed. ``verifier`` is set only
    when the password must change (rotation or drift)."""
    d = diff(spec, state)
    ident = sql.Identifier(spec.name)
    with conn.transaction():
        if d.wrong_flags or d.connection_limit is not None or verifier is not None or d.valid_until:
            flags = {f: wanted_flags(spec)[f] for f in d.wrong_flags}
            options = _options(flags, d.connection_limit, verifier, no_expiry=bool(d.valid_until))
            conn.execute(sql.SQL("ALTER ROLE {} WITH {}").format(ident, options))
        for key, value in d.settings.items():
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(key), sql.Literal(value)))
        for key in d.unset:
            conn.execute(sql.SQL("ALTER ROLE {} RESET {}").format(ident, sql.Identifier(key)))
        if d.comment:
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(spec.comment)))
        for database in d.database_settings:
            conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(ident, sql.Identifier(database)))
    return d


_SETTABLE = """
SELECT name, context,
       CASE WHEN context = 'superuser' AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
            THEN {may_set} ELSE true END
FROM pg_settings WHERE name = ANY(%(names)s)
"""


def setting_problems(conn: psycopg.Connection, names: list[str]) -> dict[str, str]:
    """Why the admin cannot set each of ``names`` on a role (those it can are left out): the
    server has no such setting (an older PostgreSQL), or it is PGC_SUSET ("superuser" in
    pg_settings) and the admin is not a superuser and was not granted SET on it (PostgreSQL 15+)."""
    if not names:
        return {}
    may_set = sql.SQL("has_parameter_privilege(name, 'SET')" if conn.info.server_version >= 150000 else "false")
    rows = conn.execute(sql.SQL(_SETTABLE).format(may_set=may_set), {"names": names}).fetchall()
    found = {name: may for name, _context, may in rows}
    major = conn.info.server_version // 10000
    problems = {}
    for name in names:
        if name not in found:
            problems[name] = f"PostgreSQL {major} has no {name} setting (skipped)"
        elif not found[name]:
            problems[name] = (f"only a superuser may set {name} (PGC_SUSET) and the admin role "
                              f"{conn.info.user} is not one (skipped: ask a superuser to run this command, or "
                              f"GRANT SET ON PARAMETER {name} TO {conn.info.user} on PostgreSQL 15+)")
    return problems


def drop(conn: psycopg.Connection, name: str) -> bool:
    """Drop the role if it exists; returns whether it existed."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
        return False
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
    return True


def converge_service(conn: psycopg.Connection, name: str, password: str, *, connection_limit: int,
                     replication: bool = False) -> list[str]:
    """A service's own login role (the stack's exporter, the archive): LOGIN INHERIT, no
    SUPERUSER/CREATEDB/CREATEROLE/BYPASSRLS, REPLICATION only when asked, ``connection_limit``,
    no password expiry, and ``password`` (set as a SCRAM verifier; a superuser reads the stored
    one and sets it only when it differs, any other admin sets it again). Creates it or corrects
    its drift (idempotent); returns what it changed, in words (empty: nothing)."""
    from .passwords import scram_verifier, verifier_matches

    ident = sql.Identifier(name)
    attributes = sql.SQL("LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE {} NOBYPASSRLS CONNECTION LIMIT {}").format(
        sql.SQL("REPLICATION" if replication else "NOREPLICATION"), sql.Literal(connection_limit))
    row = conn.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin, rolconnlimit, "
        "rolinherit, coalesce(rolvaliduntil <> 'infinity', false) FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    verifier = scram_verifier(conn, password, name)
    if row is None:
        conn.execute(sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(ident, attributes, sql.Literal(verifier)))
        return ["created"]
    changed = []
    if tuple(row) != (False, False, False, replication, False, True, connection_limit, True, False):
        conn.execute(sql.SQL("ALTER ROLE {} {} VALID UNTIL 'infinity'").format(ident, attributes))
        changed.append("attributes")
    superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)).fetchone() if superuser else None
    if stored is None or not verifier_matches(password, stored[0]):
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
        changed.append("password")
    return changed
