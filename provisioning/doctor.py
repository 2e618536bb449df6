"""`provision doctor`: audit the fleet's isolation against the registry, and repair what is safe.

Every finding carries the statement or command that repairs it. ``--fix`` runs
the safe ones: REVOKEs, ALTER ROLE/DATABASE back to the registry, ALTER ...
OWNER TO the bot for objects inside its database, chmod of env files. It never
drops anything and never changes a password: stray databases and roles, missing
bots and env files that disagree with the registry are reported with the
command to run.

What differs from fleet.toml (role, database, schema, env file, password) comes
from the one reconciliation add-bot and plan use (``reconcile``); the checks
here are doctor's own audit: memberships in both directions (the roles a bot's
role is a member of, and the roles that are members of it), every grant of the
bot's database and of the objects inside it to another role, default privileges,
objects inside a bot database that the bot does not own, event triggers, a login
as each bot with its env file's password, strays, file modes, and what a killed
run leaves behind (temporary files, backups without a checksum, scratch databases).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import files as project_files
from . import objects, passwords, pool, reconcile, settings
from .backup import STAMP_RE, checksum_path
from .db import (
    LOCK_NAMESPACE, advisory_lock, connect, lock_key, open_maintenance_databases, pinned, role_params, with_database,
)
from .errors import ProvisionError, one_line
from .project import Project
from .reconcile import MARKER_PREFIX
from .registry import DEFAULT_SERVER, BotEntry, Fleet
from .servers import Server

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Finding:
    check: str  # access, attributes, membership, ownership, limits, marker, env-file, password, login, missing,
    # stray, leftover, archive
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


_SERVER_DATABASES = "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE NOT datistemplate"
_SERVER_ROLES = "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles"
# The catalog reads of the audit, each one query for all the bots on a server (first column:
# the bot's database or role the row is about).
_DATABASE_ACL = """
SELECT d.datname, r.rolname, r.rolsuper OR (r.rolcreatedb AND r.rolcreaterole),
       string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type)
FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a JOIN pg_roles r ON r.oid = a.grantee
WHERE d.datname = ANY(%(dbs)s) AND a.grantee <> d.datdba AND a.grantee <> 0
GROUP BY 1, 2, 3 ORDER BY 1, 2
"""
_MEMBERSHIPS = """
SELECT m.rolname, g.rolname, gr.rolname FROM pg_auth_members am
JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
LEFT JOIN pg_roles gr ON gr.oid = am.grantor
WHERE m.rolname = ANY(%(roles)s) ORDER BY 1, 2
"""
# The other direction: roles that are members OF the bot's role (they act as the bot), and
# whether each is one botfleet accepts as an admin (see _members).
_MEMBERS = """
SELECT g.rolname, m.rolname, gr.rolname, m.rolsuper OR (m.rolcreatedb AND m.rolcreaterole) FROM pg_auth_members am
JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
LEFT JOIN pg_roles gr ON gr.oid = am.grantor
WHERE g.rolname = ANY(%(roles)s) ORDER BY 1, 2, 3
"""


@dataclass
class _Catalog:
    """What the audit reads from the server's catalogs for every bot at once, by role or database."""

    memberships: dict[str, list[tuple]] = field(default_factory=dict)  # role -> (granted, grantor)
    members: dict[str, list[tuple]] = field(default_factory=dict)  # role -> (member, grantor, admin-like)
    acl: dict[str, list[tuple]] = field(default_factory=dict)  # database -> (grantee, admin-like, privileges)

    @classmethod
    def read(cls, conn: psycopg.Connection, entries: list[BotEntry]) -> "_Catalog":
        out = cls()
        if not entries:
            return out
        role_names, dbs = [e.role for e in entries], [e.database for e in entries]
        for target, query, params in ((out.memberships, _MEMBERSHIPS, {"roles": role_names}),
                                      (out.members, _MEMBERS, {"roles": role_names}),
                                      (out.acl, _DATABASE_ACL, {"dbs": dbs})):
            for row in conn.execute(query, params).fetchall():
                target.setdefault(row[0], []).append(tuple(row[1:]))
        return out
# How long doctor waits for a login as a bot.
LOGIN_TIMEOUT_S = 5
# A temporary file of an atomic write untouched this long has no writer left (see files.stale_temp_files).
STALE_TEMP_S = 60.0
@dataclass
class _Inside:
    """What doctor reads inside a bot database, over the reconcile's one connection."""

    foreign: list[objects.DbObject]
    triggers: list[tuple[str, str]]
    grants: list[objects.Grant] = field(default_factory=list)
    defaults: list[objects.DefaultGrant] = field(default_factory=list)


def _read_inside(role: str) -> Callable[[psycopg.Connection], _Inside]:
    def read(conn: psycopg.Connection) -> _Inside:
        contents = objects.Contents.read(conn)  # one round trip (two when it holds routines)
        return _Inside(objects.not_owned_by(contents.inventory(), role), contents.event_triggers,
                       contents.foreign_grants(role), contents.foreign_default_grants(role))
    return read


def audit(
    server: Server,
    project: Project,
    *,
    ignore: tuple[str, ...] = (),
    progress: Progress = _quiet,
    files: bool = True,
    notes: list[str] | None = None,
) -> list[Finding]:
    """Every finding, registry bot by registry bot, then strays. Reads only.

    ``server`` is one of the fleet's servers, open: its bots are audited, and the
    botfleet objects on it that the registry does not place there are strays.
    ``files``: also check the project's secrets folder (once per run).
    ``ignore``: glob patterns of bot names that belong to another fleet on the same
    server; their databases, roles and env files are not reported as strays.
    ``notes``: what could not be checked is added here (it is no finding).
    """
    assert server.conn is not None
    fleet = project.fleet.only(server.name)
    server_dbs = dict(server.conn.execute(_SERVER_DATABASES).fetchall())
    server_roles = dict(server.conn.execute(_SERVER_ROLES).fetchall())
    bot_roles = {e.role for e in fleet.bots.values()}
    registry_roles = set(bot_roles)
    bot_roles |= {r for r, c in server_roles.items() if (c or "").startswith(MARKER_PREFIX)}
    findings: list[Finding] = []
    names = sorted(fleet.bots)
    entries = [fleet.bots[name] for name in names]
    # Inside each bot database, and each login as a bot, through a small bounded pool of
    # connections at once (pool.py); the rest, on the admin connection, bot by bot in order.
    # The login as each bot comes first, in the same threads: when it succeeds, the reads inside
    # its database go over that session (one connection per bot database, not two).
    progress(f"looking inside {len(names)} bot database(s)")
    logins: dict[str, tuple[str | None, str | None]] = {}
    early: dict[str, _Catalog] = {}

    def meanwhile(_observed: list[reconcile.Observed]) -> None:
        """This thread's work while the pool waits on the server: the catalogs of the whole
        fleet on the admin connection (the pool's threads have connections of their own), and
        each code's script directory (the revision check of every bot reads it)."""
        from .migrate import parse_script_directories

        early["catalog"] = _Catalog.read(server.conn, entries)  # type: ignore[arg-type]
        parse_script_directories(project.root, {e.code for e in entries})
    seen = reconcile.observe_many(server, project, entries, read_inside=lambda e: _read_inside(e.role),
                                  session=_login_session(server.url, logins), meanwhile=meanwhile)
    catalog = early["catalog"] if "catalog" in early else _Catalog.read(server.conn, entries)
    checked = []
    for i, (entry, observed) in enumerate(zip(entries, seen), 1):
        progress(f"checking {entry.name} ({i}/{len(names)})")
        checked.append(_check_bot(server, project, entry, observed, bot_roles, registry_roles, catalog, logins))
    results = pool.visit([c.login for c in checked], lambda login: login() if login else None,
                         pool.jobs(server.conn, sum(1 for c in checked if c.login)))
    for c, login in zip(checked, results):
        findings += c.finish(login)
        if notes is not None:
            notes += c.notes
    findings += _strays(fleet, server_dbs, server_roles, ignore)
    findings += _scratch_databases(server, project)
    if files:
        findings += _files(project, ignore)
        findings += _leftover_files(project)
    findings += _archive(server, project)
    for f in findings:
        f.server = server.name
    return findings


@dataclass
class _Checked:
    """One bot's findings, all but those of its login as the bot (``login``, run later in the
    pool, with the others'), which go where ``_credentials`` put them: after ``before``."""

    before: list[Finding]
    after: list[Finding]
    notes: list[str]
    login: Callable[[], tuple[str | None, str | None]] | None
    on_login: Callable[[tuple[str | None, str | None]], list[Finding]]

    def finish(self, login: tuple[str | None, str | None] | None) -> list[Finding]:
        return [*self.before, *(self.on_login(login) if login is not None else []), *self.after]


def _check_bot(server: Server, project: Project, entry: BotEntry, observed: reconcile.Observed, bot_roles: set[str],
               registry_roles: set[str], catalog: _Catalog,
               logins: dict[str, tuple[str | None, str | None]] | None = None) -> _Checked:
    """The reconcile's changes as findings, then the audit-only checks of doctor's own."""
    notes: list[str] = []
    out = [Finding(c.check, entry.name, c.finding, c.fix, c.safe,
                   repair=reconcile.repair(server, entry, c.target, project.fleet) if c.safe else None)
           for c in reconcile.changes(server, project, entry, observed) if c.finding]
    if observed.role is not None:  # guards the admin cannot set here are a note, not a finding
        context = observed.context or reconcile.role_context(server.conn, entry)  # type: ignore[arg-type]
        notes += context.notes(entry, project.fleet)
    out += _quota(server, project, entry, observed)
    if observed.role is not None:
        out += _memberships(server, entry, bot_roles, catalog.memberships.get(entry.role, []))
        out += _members(server, entry, bot_roles, registry_roles, catalog.members.get(entry.role, []))
    if observed.database is not None:
        out += _grants(server, entry, bot_roles, catalog.acl.get(entry.database, []))
    if isinstance(observed.extra, _Inside):
        out += _inside(server, entry, observed.extra)
    login, on_login = _credentials(server, entry, observed, known=any(f.check == "password" for f in out),
                                   notes=notes, made=logins)
    after = _revision(project, entry, observed)
    needed = settings.missing(project, entry.name, settings.of(observed.env))
    if needed:
        after.append(Finding("config", entry.name, f"{entry.name} lacks {', '.join(needed)}, which its code requires: "
                             "it would crash-loop on start", settings.set_command(entry.name, needed), False))
    path = observed.env.path
    if observed.env.exists:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != 0o600:
            after.append(Finding("env-file", entry.name, f"{path} has mode {mode:04o}, not 0600",
                                 f"chmod 600 {path}", True, repair=lambda: path.chmod(0o600)))
    return _Checked(out, after, notes, login, on_login)


def _quota(server: Server, project: Project, entry: BotEntry, observed: reconcile.Observed) -> list[Finding]:
    """The bot's database over its storage quota (max_size), or suspended by an enforced quota it
    is no longer over: the operator's decision (``provision quota enforce``), never --fix's."""
    from . import quota

    limit = project.fleet.max_size(entry)
    if observed.database is None or server.conn is None:
        return []
    suspended = (observed.context.suspended if observed.context is not None
                 else quota.is_suspended(server.conn, entry.role))
    if limit is None and not suspended:
        return []
    size = quota.database_sizes(server.conn, [entry.database]).get(entry.database)
    state = quota.with_growth(quota.QuotaState(entry.name, server.name, entry.database, size, limit, bool(suspended)),
                              quota.baselines(server.conn, [entry.role]).get(entry.role))
    grown = f", {quota.growth_words(state)}" if state.growth_bytes is not None else ""
    free = (f"free space as the admin (provision psql {entry.name} --admin: DROP or TRUNCATE, VACUUM FULL) or raise "
            f"its quota (provision add-bot {entry.name} --max-size SIZE)")
    if state.over and suspended:
        return [Finding("quota", entry.name, f"database {entry.database} is {quota.human(size)}, over its quota of "
                        f"{quota.human(limit)} ({state.percent}%{grown}): the bot is suspended (its role may not log in)",
                        f"{free}, then: provision quota enforce {entry.name}  (lifts it)", False)]
    if state.over:
        return [Finding("quota", entry.name, f"database {entry.database} is {quota.human(size)}, over its quota of "
                        f"{quota.human(limit)} ({state.percent}%{grown}): nothing stops it growing",
                        f"provision quota enforce {entry.name}  (suspends it)  or  {free}", False)]
    if suspended:
        return [Finding("quota", entry.name, f"{entry.name} is suspended by an enforced quota (its role may not log "
                        "in) but is no longer over it", f"provision quota enforce {entry.name}  (lifts it)", False)]
    return []


def _revision(project: Project, entry: BotEntry, observed: reconcile.Observed) -> list[Finding]:
    """A database at a revision its bot's code's migrations do not know: another code migrated
    it (the bot's code was changed in fleet.toml) or it is ahead of this checkout. Every migration
    of it would fail, and in the stack the bot stays down; nothing here can repair it."""
    from .migrate import start_over, unknown_to_code

    why = unknown_to_code(project.root, entry.code, observed.revision)
    if why is None:
        return []
    return [Finding("revision", entry.name, why,
                    f"set its code back in fleet.toml, or {start_over(entry.name, entry.code)}", False)]


def _run(conn: psycopg.Connection, stmt: sql.Composable) -> Callable[[], None]:
    return lambda: conn.execute(stmt)


def _memberships(server: Server, entry: BotEntry, bot_roles: set[str], rows: list[tuple]) -> list[Finding]:
    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    out = []
    for granted, grantor in rows:
        stmt = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), sql.Identifier(entry.role))
        if admin.major >= 16 and grantor:
            stmt = sql.SQL("{} GRANTED BY {}").format(stmt, sql.Identifier(grantor))
        other = "another bot's role" if granted in bot_roles else "a role outside the bot"
        out.append(Finding("membership", entry.name, f"role {entry.role} is a member of {granted} ({other}): "
                           "it has that role's privileges", stmt.as_string(conn), True, repair=_run(conn, stmt)))
    return out


def _members(server: Server, entry: BotEntry, bot_roles: set[str], registry_roles: set[str],
             rows: list[tuple]) -> list[Finding]:
    """Roles that are members of the bot's role: each can act as the bot (read and change its
    rows, alter its tables). Left out: admins (botfleet grants a non-superuser admin membership
    in each bot role it creates, and such a role can take any bot's role anyway) and the fleet's
    own bots on this server (that bot's own audit reports its membership, once)."""
    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    out = []
    for member, grantor, admin_like in rows:
        if member == admin.role or admin_like or member in registry_roles:
            continue
        stmt = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(entry.role), sql.Identifier(member))
        if admin.major >= 16 and grantor:
            stmt = sql.SQL("{} GRANTED BY {}").format(stmt, sql.Identifier(grantor))
        other = "another bot's role" if member in bot_roles else "a role outside the fleet"
        out.append(Finding("membership", entry.name, f"role {member} ({other}) is a member of {entry.role}: it can act "
                           f"as the bot and read and change everything in {entry.database}", stmt.as_string(conn), True,
                           repair=_run(conn, stmt)))
    return out


def _grants(server: Server, entry: BotEntry, bot_roles: set[str], rows: list[tuple]) -> list[Finding]:
    """Roles other than the owner granted rights on this bot's database (PUBLIC is the
    reconcile's). botfleet grants none; admins (superusers pass every check anyway) are left out."""
    conn = server.conn
    assert conn is not None
    out = []
    for grantee, admin_like, privileges in rows:
        if admin_like:
            continue
        who = f"another bot's role {grantee}" if grantee in bot_roles else f"role {grantee} (not a bot of this fleet)"
        stmt = sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(entry.database), sql.Identifier(grantee))
        out.append(Finding("access", entry.name, f"{who} has {privileges} on database {entry.database}",
                           stmt.as_string(conn), True, repair=_run(conn, stmt)))
    return out


def _in_database(server: Server, database: str, stmt: sql.Composable) -> Callable[[], None]:
    """A repair that runs ``stmt`` inside ``database`` (ACLs and owners there are per database)."""
    def run() -> None:
        with connect(with_database(server.url, database)) as db_conn:
            db_conn.execute(stmt)
    return run


def _inside(server: Server, entry: BotEntry, inside: _Inside) -> list[Finding]:
    conn = server.conn
    assert conn is not None
    out = []
    for obj in inside.foreign:
        stmt = obj.reassign(entry.role)
        out.append(Finding("ownership", entry.name, f"{obj} in {entry.database} is owned by {obj.owner}, "
                           f"not by {entry.role}", f"{stmt.as_string(conn)}  (in {entry.database})", True,
                           repair=_in_database(server, entry.database, stmt)))
    # After the owners: once an object is the bot's, REVOKE acts as its owner.
    for grant in [*inside.grants, *inside.defaults]:
        stmt = grant.revoke()
        out.append(Finding("access", entry.name, f"{grant} in {entry.database}: botfleet never grants it",
                           f"{stmt.as_string(conn)}  (in {entry.database})", True,
                           repair=_in_database(server, entry.database, stmt)))
    for trigger, owner in inside.triggers:
        stmt = sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(trigger))
        out.append(Finding("ownership", entry.name, f"event trigger {trigger} in {entry.database} (owner {owner}) runs on "
                           "the bot's DDL, and a bot cannot restore it from a backup",
                           f"{stmt.as_string(conn)}  (in {entry.database}; botfleet never drops it for you)", False))
    return out


def _credentials(server: Server, entry: BotEntry, observed: reconcile.Observed, *, known: bool, notes: list[str],
                 made: dict[str, tuple[str | None, str | None]] | None = None
                 ) -> tuple[Callable[[], tuple[str | None, str | None]] | None,
                            Callable[[tuple[str | None, str | None]], list[Finding]]]:
    """Whether the bot can log in with its env file's password: a real login as the bot into its
    database (an expiring password, VALID UNTIL, is the reconcile's: add-bot lifts it too).
    Returns the login to make (None: none is needed) and what turns its result into findings
    (a note, when the server was not reached, goes to ``notes``).

    ``known``: a password finding is already there (the reconcile compared the verifier): no login.
    ``made``: the logins already made (:func:`_login_session`), by bot: one due is not made again."""
    password = observed.env.password(entry.role) if observed.env.exists else None
    role, database = observed.role, observed.database

    def findings(result: tuple[str | None, str | None]) -> list[Finding]:
        failure, where = result
        if failure is None:
            return []
        if where is None:  # the server was not reached over TCP: no word on the password
            notes.append(f"{entry.name}: could not log in as {entry.role} to check its password: {failure}")
            return []
        return [Finding("login", entry.name, f"{entry.role} cannot log in to {entry.database} at {where} with the "
                        f"password in {observed.env.path}: {failure}",
                        f"provision add-bot {entry.name}  (sets the server's password to the env file's)", False)]

    if role is None or database is None or password is None:
        return None, findings  # reported as missing by the reconcile
    if known or role.valid_until or not role.flags.get("rolcanlogin") or not database.allow_connections:
        return None, findings  # the reconcile's findings say why it cannot log in
    if made is not None and entry.name in made:
        result = made[entry.name]
        return (lambda: result), findings
    return (lambda: _login(server.url, entry, password, role.verifier)), findings


def _login_due(entry: BotEntry, observed: reconcile.Observed) -> str | None:
    """The env file's password when :func:`_credentials` will want a login as the bot (the same
    conditions, worked out from ``observed`` alone, before the findings), else None."""
    role, database = observed.role, observed.database
    password = observed.env.password(entry.role) if observed.env.exists else None
    if role is None or database is None or password is None:
        return None
    if role.valid_until or not role.flags.get("rolcanlogin") or not database.allow_connections:
        return None
    # The reconcile's password finding (reconcile._env_changes): then no login is made.
    if role.verifier_read and role.verifier is None:
        return None
    # A password that does not match the verifier is the reconcile's finding; the login, made
    # first, is how that is known without hashing it here (reconcile.observe_many).
    return password


def _login_session(admin_url: str, made: dict[str, tuple[str | None, str | None]]
                   ) -> Callable[[BotEntry, reconcile.Observed], psycopg.Connection | None]:
    """observe_many's ``session``: the login as the bot that :func:`_credentials` will want,
    made now (its result in ``made``); when it succeeds, its connection, for the reads inside the
    bot's database (they are of catalogs every role may read)."""
    def session(entry: BotEntry, observed: reconcile.Observed) -> psycopg.Connection | None:
        password = _login_due(entry, observed)
        if password is None:
            return None
        result, conn = _connect_as_bot(admin_url, entry, password, observed.role.verifier if observed.role else None)
        made[entry.name] = result  # one key per thread: no lock needed
        return conn
    return session


def _login(admin_url: str, entry: BotEntry, password: str, verifier: str | None = None
           ) -> tuple[str | None, str | None]:
    """Log in as the bot, as its bot would: over TCP, on the host and port of the admin URL (the
    env file's host may be a compose service name), or 127.0.0.1 when the admin comes through a
    local socket (local logins are often trusted: a wrong password would pass there).

    Returns (None, None) when it logs in, or when the bot's connections are all in use
    ("too many connections": the password was not even checked, that is no credentials problem);
    else the cause (never the password) and where the server said it: None when it did not answer."""
    result, conn = _connect_as_bot(admin_url, entry, password, verifier)
    if conn is not None:
        conn.close()
    return result


def _connect_as_bot(admin_url: str, entry: BotEntry, password: str, verifier: str | None = None
                    ) -> tuple[tuple[str | None, str | None], psycopg.Connection | None]:
    """:func:`_login`'s result, and the bot's open connection when it logged in (else None).

    ``verifier``: the role's SCRAM verifier, when the admin could read it. With libpq 18 the login
    then uses the SCRAM keys the env file's password gives (passwords.scram_keys: its one PBKDF2,
    which also answers whether it matches the verifier) instead of the password, for which libpq
    would hash it again, slower: a third of doctor's client time at 1,000 bots. The server checks
    the keys exactly as it checks a password's proof. A login with the keys that fails (a pg_hba
    line asking for a cleartext password, say) is made again with the password, whose failure is
    then the one reported."""
    # Pinned too (db.PINNED_SETTINGS): doctor's reads run in this session, and with the bot's own
    # search_path its look-alikes of pg_get_userbyid and the like would write doctor's report.
    params = pinned(role_params(admin_url, entry.role, password, entry.database, application_name="botfleet-doctor"))
    if not params.get("host") or params["host"].startswith("/"):
        params["host"] = "127.0.0.1"
    params["connect_timeout"] = str(LOGIN_TIMEOUT_S)
    where = f"{params['host']}:{params.get('port') or 5432}"
    keys = passwords.scram_keys(password, verifier) if verifier and passwords.keys_supported() else None
    if keys is not None:
        with_keys = {k: v for k, v in params.items() if k != "password"}
        with_keys.update(scram_client_key=keys[0], scram_server_key=keys[1])
        try:
            return (None, None), psycopg.connect(make_conninfo(**with_keys), autocommit=True)
        except psycopg.OperationalError:
            pass  # said again, with the password
    try:
        return (None, None), psycopg.connect(make_conninfo(**params), autocommit=True)
    except psycopg.OperationalError as err:
        text = str(err).replace(password, "<password>")
    low = text.lower()
    if "too many connections" in low or "too many clients" in low or "connection slots are reserved" in low:
        return (None, None), None
    if "FATAL:" not in text:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "no answer")
        return (f"{first.rsplit('failed: ', 1)[-1]} ({where})", None), None
    return (text.rsplit("FATAL:", 1)[1].strip().splitlines()[0], where), None


def _leftover_files(project: Project) -> list[Finding]:
    """What killed runs leave in the project: atomic writes' temporary files (an env file's may
    hold a password), backups without their checksum, checksums without their backup."""
    out: list[Finding] = []
    folders = [project.root, project.root / "secrets", project.state_dir, project.root / "deploy"]
    folders += [p for p in sorted((project.root / "secrets").glob("*.settings")) if p.is_dir() and not p.is_symlink()]
    for folder in folders:
        for path in project_files.stale_temp_files(folder, STALE_TEMP_S):
            secret = " (it may hold a password)" if folder.name == "secrets" or folder.suffix == ".settings" else ""
            out.append(Finding("leftover", None, f"{path}: the temporary file of a write that was killed before it "
                               f"replaced {project_files.temp_target(path)}{secret}", f"rm {path}", True,
                               repair=lambda path=path: project_files.remove_stale_temp_file(path, STALE_TEMP_S)))
    backups = project.root / "backups"
    bot_dirs = sorted(p for p in backups.iterdir() if p.is_dir() and not p.is_symlink()) if backups.is_dir() else []
    for folder in bot_dirs:
        dump_name = re.compile(re.escape(folder.name) + "-" + STAMP_RE + r"\.dump")
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            if dump_name.fullmatch(path.name) and not checksum_path(path).exists():
                # User data, maybe the only copy of a removed bot: reported, never deleted.
                out.append(Finding("leftover", None, f"backup {path} has no checksum beside it: it may be a dump that "
                                   "was killed while it was written", f"cd {folder} && pg_restore --file=/dev/null "
                                   f"{path.name} && sha256sum {path.name} > {checksum_path(path).name}  (keeps it when "
                                   f"it reads through; else rm {path})", False))
            elif path.name.endswith(".dump.sha256"):
                dump = path.with_name(path.name.removesuffix(".sha256"))
                if path.stat().st_size == 0:
                    what = f"{path} is empty: the checksum of {dump.name} was never written (a full disk or a kill)"
                elif not dump.exists():
                    what = f"{path} is the checksum of a backup that is gone"
                else:
                    continue
                out.append(Finding("leftover", None, what, f"rm {path}", True,
                                   repair=lambda path=path: path.unlink(missing_ok=True)))
    return out


def _scratch_in_use(conn: psycopg.Connection, name: str, *, keep: bool = False) -> bool:
    """Whether a live run holds the scratch database's advisory lock (revisions.scratch_database
    holds it for the database's whole life); with ``keep``, a free lock stays taken."""
    key = (LOCK_NAMESPACE, lock_key(name))
    if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]:  # type: ignore[index]
        return True
    if not keep:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)
    return False


def _scratch_databases(server: Server, project: Project) -> list[Finding]:
    """Scratch databases of this project (provision check, revision --autogenerate) whose run
    died: named as botfleet names them, and nobody holds their lock."""
    from .revisions import scratch_prefix

    conn = server.conn
    assert conn is not None
    prefix = scratch_prefix(project.root)
    names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
                                        (prefix,)).fetchall()]
    out = []
    for name in names:
        if not re.fullmatch(re.escape(prefix) + "[0-9a-f]{8}", name) or _scratch_in_use(conn, name):
            continue
        stmt = sql.SQL("DROP DATABASE {}").format(sql.Identifier(name))

        def drop(name: str = name, stmt: sql.Composable = stmt) -> None:
            if _scratch_in_use(conn, name, keep=True):
                raise ProvisionError(f"{name} is in use by a running provision check")
            try:  # no FORCE: a session still in it makes the drop fail, not end that session
                conn.execute(stmt)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NAMESPACE, lock_key(name)))
        out.append(Finding("leftover", None, f"database {name} is a scratch database a killed provision check (or "
                           "revision --autogenerate) left on the server", stmt.as_string(conn), True, repair=drop))
    return out


def _archive(server: Server, project: Project) -> list[Finding]:
    """The server's continuous archive, when it has one: its WAL receiver streams, and a base
    backup is younger than the retention window (else recovery reaches back less far)."""
    from .archive import RECEIVER, Archive, stream
    from .registry import RETENTION_RE

    archive = Archive(project, server.name)
    assert server.conn is not None
    if not archive.configured:
        # No archive of this host's: the server's own view of one (the stack's archive service).
        seen = stream(server.conn)
        problem = seen.problem() if seen is not None else None
        if problem is None:
            return []
        return [Finding("archive", None, f"server {server.name}: {problem}",
                        "docker compose ps archive; docker compose logs archive (the stack's archive service)", False)]
    out = []
    settings = project.fleet.backup
    streaming = server.conn.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                                    (RECEIVER,)).fetchone()
    if streaming is None:
        why = ("synchronous archiving is on: every commit waits for it" if settings.synchronous
               else "WAL written now is not archived")
        out.append(Finding("archive", None, f"the archive's WAL receiver does not stream from server {server.name} ({why})",
                           "provision server start (embedded) or provision backup --server", False))
    health = archive.health(synchronous=settings.synchronous)
    match = RETENTION_RE.fullmatch(settings.retention.strip()) if settings.retention else None
    days = int(match.group(1)) * {"day": 1, "week": 7, "month": 30}[match.group(2)] if match else 7
    if health.last_backup_age_seconds is None or health.last_backup_age_seconds > days * 86400:
        age = "none" if health.last_backup is None else f"the newest ended {health.last_backup}"
        out.append(Finding("archive", None, f"no base backup of server {server.name} within the last {days} days ({age})",
                           "provision backup --server (a daily cron line: see the README)", False))
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


def _strays(fleet: Fleet, server_dbs: dict, server_roles: dict, ignore: tuple[str, ...]) -> list[Finding]:
    """botfleet-marked databases and roles whose bot the registry does not know, one finding per bot."""
    return [
        Finding("stray", bot, f"{' and '.join(objs)} (botfleet bot {bot}) not in the registry",
                f"provision add-bot {bot}  (adopt it)  or  provision remove-bot {bot} --yes  (backs it up, then drops it)",
                False)
        for bot, objs in _stray_objects(server_dbs, server_roles, fleet, ignore).items()
    ]


def _files(project: Project, ignore: tuple[str, ...]) -> list[Finding]:
    out: list[Finding] = []
    secrets = project.root / "secrets"
    if not secrets.is_dir():
        return out
    mode = stat.S_IMODE(secrets.stat().st_mode)
    if mode & 0o077:
        out.append(Finding("env-file", None, f"{secrets} has mode {mode:04o}, not 0700", f"chmod 700 {secrets}",
                           True, repair=lambda: secrets.chmod(0o700)))
    for path in sorted(secrets.glob("*.env")):
        if path.stem not in project.fleet.bots and not _ignored(path.stem, ignore):
            out.append(Finding("stray", path.stem, f"{path} belongs to no bot in the registry",
                               f"rm {path}  (once nothing uses these credentials)", False))
    return out


def fix(conn: psycopg.Connection, findings: list[Finding], progress: Progress = _quiet) -> list[Finding]:
    """Run the repair of every fixable finding, bot by bot under that bot's advisory
    lock; a repair that fails is marked "not fixed" with the server's reason and the
    others go on. Returns the findings it tried."""
    tried: list[Finding] = []
    by_bot: dict[str | None, list[Finding]] = {}
    for finding in findings:
        if finding.fixable and finding.repair is not None:
            by_bot.setdefault(finding.bot, []).append(finding)
    for bot, items in by_bot.items():
        with advisory_lock(conn, bot) if bot else contextlib.nullcontext():
            for finding in items:
                progress(f"fixing {bot or 'fleet'}: {finding.message}")
                try:
                    finding.repair()  # type: ignore[misc]
                    finding.status = "fixed"
                except (psycopg.Error, OSError, ProvisionError) as err:
                    finding.status, finding.error = "not fixed", one_line(err)
                tried.append(finding)
    return tried


@dataclass
class Report:
    found: list[Finding]  # the first audit
    tried: list[Finding]  # repairs attempted (--fix)
    remaining: list[Finding]  # the last audit
    # What the operator of a server botfleet does not run should do (they do not fail the audit).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.remaining


def run(
    server: Server,
    project: Project,
    *,
    repair: bool = False,
    ignore: tuple[str, ...] = (),
    progress: Progress = _quiet,
    files: bool = True,
) -> Report:
    """Audit; with ``repair``, fix and audit again (a repair can reveal more, e.g. a
    database that accepts connections again can be looked inside), a few rounds at most."""
    assert server.conn is not None
    notes = [f"{'' if server.name == DEFAULT_SERVER else f'server {server.name}: '}every role, so every bot, may "
             f"connect to the maintenance database {name}: REVOKE CONNECT ON DATABASE {name} FROM PUBLIC"
             for name in open_maintenance_databases(server.conn)]
    found = audit(server, project, ignore=ignore, progress=progress, files=files, notes=notes)
    if not repair:
        return Report(found, [], found, notes)
    tried: dict[tuple, Finding] = {}
    current = found
    for _ in range(3):
        attempt = fix(server.conn, current, progress)
        tried.update(((f.bot, f.message), f) for f in attempt)
        current = audit(server, project, ignore=ignore, files=files)
        if not any(f.status == "fixed" for f in attempt) or not any(f.fixable for f in current):
            break
    return Report(found, list(tried.values()), current, notes)
