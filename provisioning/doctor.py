"""`provision doctor`: audit the fleet's isolation against the registry, and repair what is safe.

Every finding carries the statement or command that repairs it. ``--fix`` runs
the safe ones: REVOKEs, ALTER ROLE/DATABASE back to the registry, ALTER ...
OWNER TO the bot for objects inside its database, chmod of env files. It never
drops anything and never changes a password: stray databases and roles, missing
bots and env files that disagree with the registry are reported with the
command to run.

The repairs reuse add-bot's own inspect/converge functions (roles, databases)
and the object inventory of ``objects``.
"""

from __future__ import annotations

import fnmatch
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
from psycopg import sql

from . import databases, objects, roles
from .db import AdminInfo, advisory_lock, connect, parse_url, with_database
from .files import read_env_file
from .fleet import Project, database_spec, role_spec, stored_password
from .passwords import verifier_matches
from .registry import DEFAULT_SERVER, BotEntry, Fleet

Progress = Callable[[str], None]
MARKER_PREFIX = "botfleet bot "


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Finding:
    check: str  # access, attributes, membership, ownership, limits, marker, env-file, password, missing, stray
    bot: str | None
    message: str
    fix: str  # the SQL statement or command that repairs it
    fixable: bool  # `doctor --fix` runs the repair
    status: str = "found"  # found | fixed | not fixed
    error: str | None = None
    repair: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    server: str = DEFAULT_SERVER

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("check", "bot", "message", "fix", "fixable", "status", "error", "server")}


@dataclass
class Context:
    conn: psycopg.Connection
    admin: AdminInfo
    admin_url: str
    project: Project
    fleet: Fleet
    bot_roles: set[str]

    def q(self, stmt: sql.Composable) -> str:
        return stmt.as_string(self.conn)

    def in_database(self, dbname: str, stmt: sql.Composable) -> Callable[[], None]:
        def run() -> None:
            with connect(with_database(self.admin_url, dbname)) as db_conn:
                db_conn.execute(stmt)
        return run


_SERVER_DATABASES = "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE NOT datistemplate"
_SERVER_ROLES = "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles"
_DATABASE_ACL = """
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
       string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type)
FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
WHERE d.datname = %(db)s AND a.grantee <> d.datdba
GROUP BY 1 ORDER BY 1
"""
_MEMBERSHIPS = """
SELECT g.rolname, gr.rolname FROM pg_auth_members am
JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
LEFT JOIN pg_roles gr ON gr.oid = am.grantor
WHERE m.rolname = %(role)s ORDER BY 1
"""
_EVENT_TRIGGERS = "SELECT evtname, pg_get_userbyid(evtowner) FROM pg_event_trigger ORDER BY 1"


def audit(
    conn: psycopg.Connection,
    admin: AdminInfo,
    admin_url: str,
    project: Project,
    *,
    ignore: tuple[str, ...] = (),
    progress: Progress = _quiet,
    server: str = DEFAULT_SERVER,
    files: bool = True,
) -> list[Finding]:
    """Every finding, registry bot by registry bot, then strays. Reads only.

    ``conn`` is the fleet's server ``server``: its bots are audited, and the
    botfleet objects on it that the registry does not place there are strays.
    ``files``: also check the project's secrets folder (once per run).
    ``ignore``: glob patterns of bot names that belong to another fleet on the same
    server; their databases, roles and env files are not reported as strays.
    """
    full = project.registry.load()
    fleet = Fleet(full.server, full.on(server), full.servers)
    server_dbs = dict(conn.execute(_SERVER_DATABASES).fetchall())
    server_roles = dict(conn.execute(_SERVER_ROLES).fetchall())
    bot_roles = {e.role for e in fleet.bots.values()}
    bot_roles |= {r for r, c in server_roles.items() if (c or "").startswith(MARKER_PREFIX)}
    ctx = Context(conn, admin, admin_url, project, fleet, bot_roles)
    findings: list[Finding] = []
    names = sorted(fleet.bots)
    for i, name in enumerate(names, 1):
        progress(f"checking {name} ({i}/{len(names)})")
        findings += _check_bot(ctx, fleet.bots[name])
    findings += _strays(ctx, server_dbs, server_roles, ignore)
    if files:
        findings += _files(ctx, full, ignore)
    if server != DEFAULT_SERVER:
        for f in findings:
            f.server = server
    return findings


def _check_bot(ctx: Context, entry: BotEntry) -> list[Finding]:
    out: list[Finding] = []
    role_state = roles.inspect(ctx.conn, entry.role, read_verifier=ctx.admin.superuser)
    db_state = databases.inspect(ctx.conn, entry.database)
    if role_state is None:
        out.append(Finding("missing", entry.name, f"role {entry.role} does not exist on the server",
                           f"provision add-bot {entry.name}  (creates it with a new password)", False))
    else:
        out += _check_role(ctx, entry, role_state)
    if db_state is None:
        latest = sorted(ctx.project.backups(entry.name).glob(f"{entry.name}-*.dump"))
        then = f", then: provision restore {entry.name} {latest[-1]}" if latest else ""
        out.append(Finding("missing", entry.name, f"database {entry.database} does not exist on the server",
                           f"provision add-bot {entry.name}  (creates it empty){then}", False))
    else:
        out += _check_database(ctx, entry, db_state)
        if db_state.allow_connections:  # else: the re-check after --fix looks inside
            out += _check_inside(ctx, entry)
    out += _check_env_file(ctx, entry, role_state)
    return out


def _converge_role(ctx: Context, entry: BotEntry) -> Callable[[], None]:
    def run() -> None:
        state = roles.inspect(ctx.conn, entry.role, read_verifier=False)
        if state is not None:
            roles.converge(ctx.conn, role_spec(entry), state, None)
    return run


def _converge_database(ctx: Context, entry: BotEntry) -> Callable[[], None]:
    def run() -> None:
        state = databases.inspect(ctx.conn, entry.database)
        if state is not None:
            databases.converge(ctx.conn, database_spec(entry), state)
    return run


def _check_role(ctx: Context, entry: BotEntry, state: roles.RoleState) -> list[Finding]:
    out: list[Finding] = []
    spec = role_spec(entry)
    ident = sql.Identifier(entry.role)
    repair = _converge_role(ctx, entry)
    wrong = [f for f, want in roles.REQUIRED_FLAGS.items() if state.flags[f] != want]
    if wrong:
        has = " ".join("NOLOGIN" if roles.REQUIRED_FLAGS[f] else roles.FLAG_SQL[f].removeprefix("NO") for f in wrong)
        stmt = sql.SQL("ALTER ROLE {} WITH {}").format(ident, sql.SQL(" ").join(sql.SQL(roles.FLAG_SQL[f]) for f in wrong))
        out.append(Finding("attributes", entry.name, f"role {entry.role} has {has}", ctx.q(stmt), True, repair=repair))
    if state.connection_limit != spec.connection_limit:
        stmt = sql.SQL("ALTER ROLE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(spec.connection_limit))
        out.append(Finding("limits", entry.name, f"role {entry.role} connection limit is {state.connection_limit}, "
                           f"the registry says {spec.connection_limit}", ctx.q(stmt), True, repair=repair))
    for key, want in spec.settings.items():
        have = state.settings.get(key)
        if have != want:
            stmt = sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(key), sql.Literal(want))
            out.append(Finding("limits", entry.name, f"role {entry.role} {key} is {have or 'unset'}, "
                               f"the registry says {want}", ctx.q(stmt), True, repair=repair))
    if state.comment != spec.comment:
        stmt = sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(spec.comment))
        out.append(Finding("marker", entry.name, f"role {entry.role} lacks botfleet's marker comment",
                           ctx.q(stmt), True, repair=repair))
    for granted, grantor in ctx.conn.execute(_MEMBERSHIPS, {"role": entry.role}).fetchall():
        stmt = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), ident)
        if ctx.admin.major >= 16 and grantor:
            stmt = sql.SQL("{} GRANTED BY {}").format(stmt, sql.Identifier(grantor))
        other = "another bot's role" if granted in ctx.bot_roles else "a role outside the bot"
        out.append(Finding("membership", entry.name, f"role {entry.role} is a member of {granted} ({other}): "
                           "it has that role's privileges", ctx.q(stmt), True, repair=_run(ctx.conn, stmt)))
    return out


def _run(conn: psycopg.Connection, stmt: sql.Composable) -> Callable[[], None]:
    return lambda: conn.execute(stmt)


def _check_database(ctx: Context, entry: BotEntry, state: databases.DatabaseState) -> list[Finding]:
    out: list[Finding] = []
    spec = database_spec(entry)
    ident = sql.Identifier(entry.database)
    repair = _converge_database(ctx, entry)
    if state.owner != spec.owner:
        stmt = sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(spec.owner))
        out.append(Finding("ownership", entry.name, f"database {entry.database} is owned by {state.owner}, "
                           f"not by {spec.owner}", ctx.q(stmt), True, repair=repair))
    if state.connection_limit != spec.connection_limit:
        stmt = sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(spec.connection_limit))
        out.append(Finding("limits", entry.name, f"database {entry.database} connection limit is "
                           f"{state.connection_limit}, the registry says {spec.connection_limit}",
                           ctx.q(stmt), True, repair=repair))
    if not state.allow_connections:
        stmt = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident)
        out.append(Finding("access", entry.name, f"database {entry.database} refuses all connections",
                           ctx.q(stmt), True, repair=repair))
    if state.comment != spec.comment:
        stmt = sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(spec.comment))
        out.append(Finding("marker", entry.name, f"database {entry.database} lacks botfleet's marker comment",
                           ctx.q(stmt), True, repair=repair))
    for grantee, privileges in ctx.conn.execute(_DATABASE_ACL, {"db": entry.database}).fetchall():
        if grantee == "PUBLIC":
            stmt = sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident)
            who = "PUBLIC (every role)"
        elif grantee in ctx.bot_roles:
            stmt = sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(ident, sql.Identifier(grantee))
            who = f"another bot's role {grantee}"
        else:
            continue  # a role outside the fleet that the operator granted on purpose
        out.append(Finding("access", entry.name, f"{who} has {privileges} on database {entry.database}",
                           ctx.q(stmt), True, repair=_run(ctx.conn, stmt)))
    return out


def _check_inside(ctx: Context, entry: BotEntry) -> list[Finding]:
    out: list[Finding] = []
    try:
        with connect(with_database(ctx.admin_url, entry.database)) as db_conn:
            public_open = databases.public_schema_open(db_conn)
            foreign = objects.not_owned_by(objects.inventory(db_conn), entry.role)
            triggers = db_conn.execute(_EVENT_TRIGGERS).fetchall()
    except Exception as err:  # noqa: BLE001 - reported as a finding, the audit goes on
        return [Finding("access", entry.name, f"cannot look inside {entry.database}: {_one_line(err)}", "", False)]
    if public_open:
        def lock_down() -> None:
            with connect(with_database(ctx.admin_url, entry.database)) as db_conn:
                databases.lock_down_schema(db_conn)
        out.append(Finding("access", entry.name, f"PUBLIC has rights on schema public in {entry.database}",
                           f"REVOKE ALL ON SCHEMA public FROM PUBLIC  (in {entry.database})", True, repair=lock_down))
    for obj in foreign:
        stmt = obj.reassign(entry.role)
        out.append(Finding("ownership", entry.name, f"{obj} in {entry.database} is owned by {obj.owner}, "
                           f"not by {entry.role}", f"{ctx.q(stmt)}  (in {entry.database})", True,
                           repair=ctx.in_database(entry.database, stmt)))
    for trigger, owner in triggers:
        stmt = sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(trigger))
        out.append(Finding("ownership", entry.name, f"event trigger {trigger} in {entry.database} (owner {owner}) runs on "
                           "the bot's DDL, and a bot cannot restore it from a backup",
                           f"{ctx.q(stmt)}  (in {entry.database}; botfleet never drops it for you)", False))
    return out


def _check_env_file(ctx: Context, entry: BotEntry, role_state: roles.RoleState | None) -> list[Finding]:
    path = ctx.project.env_file(entry.name)
    if not path.exists():
        return [Finding("env-file", entry.name, f"{path} is missing",
                        f"provision add-bot {entry.name}  (writes it with a new password)", False)]
    out: list[Finding] = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o600:
        out.append(Finding("env-file", entry.name, f"{path} has mode {mode:04o}, not 0600",
                           f"chmod 600 {path}", True, repair=lambda: path.chmod(0o600)))
    password = stored_password(path, entry.role)
    rewrite = f"provision add-bot {entry.name}  (rewrites it from the registry, keeping the password)"
    if password is None:
        out.append(Finding("env-file", entry.name, f"{path} has no DATABASE_URL for role {entry.role}",
                           f"provision add-bot {entry.name}  (writes it with a new password)", False))
        return out
    values = read_env_file(path)
    url = parse_url(values.get("DATABASE_URL", ""))
    host, port = ctx.fleet.endpoint(entry)
    want = {
        "host": host, "port": str(port),
        "dbname": entry.database, "DB_POOL_SIZE": str(entry.pool_size), "DB_MAX_OVERFLOW": str(entry.max_overflow),
    }
    have = {"host": url.get("host"), "port": url.get("port") or "5432", "dbname": url.get("dbname"),
            "DB_POOL_SIZE": values.get("DB_POOL_SIZE"), "DB_MAX_OVERFLOW": values.get("DB_MAX_OVERFLOW")}
    diffs = [f"{k} {have[k]} (registry: {v})" for k, v in want.items() if have[k] != v]
    if diffs:
        out.append(Finding("env-file", entry.name, f"{path} does not match the registry: " + ", ".join(diffs),
                           rewrite, False))
    if role_state is not None and role_state.verifier is not None and not verifier_matches(password, role_state.verifier):
        out.append(Finding("password", entry.name, f"the password in {path} is not the role's password on the server",
                           f"provision add-bot {entry.name}  (sets the server's password to the env file's)", False))
    return out


def _ignored(bot: str, ignore: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(bot, pattern) for pattern in ignore)


def stray_bots(conn: psycopg.Connection, fleet: Fleet, ignore: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """botfleet-marked databases and roles on the server whose bot the registry does not
    know: bot -> ["database x_db", "role x_user"]. Reads only."""
    return _stray_objects(dict(conn.execute(_SERVER_DATABASES).fetchall()),
                          dict(conn.execute(_SERVER_ROLES).fetchall()), fleet, ignore)


def _stray_objects(server_dbs: dict, server_roles: dict, fleet: Fleet, ignore: tuple[str, ...]) -> dict[str, list[str]]:
    known = {e.database for e in fleet.bots.values()} | {e.role for e in fleet.bots.values()}
    strays: dict[str, list[str]] = {}
    for kind, found in (("database", server_dbs), ("role", server_roles)):
        for obj, comment in sorted(found.items()):
            if (comment or "").startswith(MARKER_PREFIX) and obj not in known:
                bot = comment.removeprefix(MARKER_PREFIX)
                if not _ignored(bot, ignore):
                    strays.setdefault(bot, []).append(f"{kind} {obj}")
    return dict(sorted(strays.items()))


def _strays(ctx: Context, server_dbs: dict, server_roles: dict, ignore: tuple[str, ...]) -> list[Finding]:
    """botfleet-marked databases and roles whose bot the registry does not know, one finding per bot."""
    return [
        Finding("stray", bot, f"{' and '.join(objs)} (botfleet bot {bot}) not in the registry",
                f"provision add-bot {bot}  (adopt it)  or  provision remove-bot {bot} --yes  (backs it up, then drops it)",
                False)
        for bot, objs in _stray_objects(server_dbs, server_roles, ctx.fleet, ignore).items()
    ]


def _files(ctx: Context, full: Fleet, ignore: tuple[str, ...]) -> list[Finding]:
    out: list[Finding] = []
    secrets = ctx.project.root / "secrets"
    if not secrets.is_dir():
        return out
    mode = stat.S_IMODE(secrets.stat().st_mode)
    if mode & 0o077:
        out.append(Finding("env-file", None, f"{secrets} has mode {mode:04o}, not 0700", f"chmod 700 {secrets}",
                           True, repair=lambda: secrets.chmod(0o700)))
    for path in sorted(secrets.glob("*.env")):
        if path.stem not in full.bots and not _ignored(path.stem, ignore):
            out.append(Finding("stray", path.stem, f"{path} belongs to no bot in the registry",
                               f"rm {path}  (once nothing uses these credentials)", False))
    return out


def fix(
    conn: psycopg.Connection, findings: list[Finding], progress: Progress = _quiet
) -> list[Finding]:
    """Run the repair of every fixable finding, bot by bot under that bot's advisory
    lock; a repair that fails is marked "not fixed" with the server's reason and the
    others go on. Returns the findings it tried."""
    tried: list[Finding] = []
    by_bot: dict[str | None, list[Finding]] = {}
    for finding in findings:
        if finding.fixable and finding.repair is not None:
            by_bot.setdefault(finding.bot, []).append(finding)
    for bot, items in by_bot.items():
        with advisory_lock(conn, bot) if bot else _nothing():
            for finding in items:
                progress(f"fixing {bot or 'fleet'}: {finding.message}")
                try:
                    finding.repair()  # type: ignore[misc]
                    finding.status = "fixed"
                except (psycopg.Error, OSError) as err:
                    finding.status, finding.error = "not fixed", _one_line(err)
                tried.append(finding)
    return tried


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _one_line(err: BaseException) -> str:
    diag = getattr(err, "diag", None)
    if diag is not None and getattr(diag, "message_primary", None):
        return diag.message_primary
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@dataclass
class Report:
    found: list[Finding]  # the first audit
    tried: list[Finding]  # repairs attempted (--fix)
    remaining: list[Finding]  # the last audit

    @property
    def ok(self) -> bool:
        return not self.remaining


def run(
    conn: psycopg.Connection,
    admin: AdminInfo,
    admin_url: str,
    project: Project,
    *,
    repair: bool = False,
    ignore: tuple[str, ...] = (),
    progress: Progress = _quiet,
    server: str = DEFAULT_SERVER,
    files: bool = True,
) -> Report:
    """Audit; with ``repair``, fix and audit again (a repair can reveal more, e.g. a
    database that accepts connections again can be looked inside), a few rounds at most."""
    found = audit(conn, admin, admin_url, project, ignore=ignore, progress=progress, server=server, files=files)
    if not repair:
        return Report(found, [], found)
    tried: dict[tuple, Finding] = {}
    current = found
    for _ in range(3):
        attempt = fix(conn, current, progress)
        tried.update(((f.bot, f.message), f) for f in attempt)
        current = audit(conn, admin, admin_url, project, ignore=ignore, server=server, files=files)
        if not any(f.status == "fixed" for f in attempt) or not any(f.fixable for f in current):
            break
    return Report(found, list(tried.values()), current)

