"""`provision doctor`: audit the fleet's isolation against the registry, and repair what is safe.

Every finding carries the statement or command that repairs it. ``--fix`` runs
the safe ones: REVOKEs, ALTER ROLE/DATABASE back to the registry, ALTER ...
OWNER TO the bot for objects inside its database, chmod of env files. It never
drops anything and never changes a password: stray databases and roles, missing
bots and env files that disagree with the registry are reported with the
command to run.

What differs from fleet.toml (role, database, schema, env file, password) comes
from the one reconciliation add-bot and plan use (``reconcile``); the checks
here are doctor's own audit: memberships, other bots' grants, objects inside a
bot database that the bot does not own, event triggers, strays, file modes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
from psycopg import sql

from . import objects, reconcile, settings
from .db import advisory_lock, connect, open_maintenance_databases, with_database
from .errors import one_line
from .project import Project
from .reconcile import MARKER_PREFIX
from .registry import DEFAULT_SERVER, BotEntry, Fleet
from .servers import Server

Progress = Callable[[str], None]


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


_SERVER_DATABASES = "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE NOT datistemplate"
_SERVER_ROLES = "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles"
_DATABASE_ACL = """
SELECT pg_get_userbyid(a.grantee), string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type)
FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
WHERE d.datname = %(db)s AND a.grantee <> d.datdba AND a.grantee <> 0
GROUP BY 1 ORDER BY 1
"""
_MEMBERSHIPS = """
SELECT g.rolname, gr.rolname FROM pg_auth_members am
JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
LEFT JOIN pg_roles gr ON gr.oid = am.grantor
WHERE m.rolname = %(role)s ORDER BY 1
"""
_EVENT_TRIGGERS = "SELECT evtname, pg_get_userbyid(evtowner) FROM pg_event_trigger ORDER BY 1"


@dataclass
class _Inside:
    """What doctor reads inside a bot database, over the reconcile's one connection."""

    foreign: list[objects.DbObject]
    triggers: list[tuple[str, str]]


def _read_inside(role: str) -> Callable[[psycopg.Connection], _Inside]:
    def read(conn: psycopg.Connection) -> _Inside:
        return _Inside(objects.not_owned_by(objects.inventory(conn), role), conn.execute(_EVENT_TRIGGERS).fetchall())
    return read


def audit(
    server: Server,
    project: Project,
    *,
    ignore: tuple[str, ...] = (),
    progress: Progress = _quiet,
    files: bool = True,
) -> list[Finding]:
    """Every finding, registry bot by registry bot, then strays. Reads only.

    ``server`` is one of the fleet's servers, open: its bots are audited, and the
    botfleet objects on it that the registry does not place there are strays.
    ``files``: also check the project's secrets folder (once per run).
    ``ignore``: glob patterns of bot names that belong to another fleet on the same
    server; their databases, roles and env files are not reported as strays.
    """
    assert server.conn is not None
    fleet = project.fleet.only(server.name)
    server_dbs = dict(server.conn.execute(_SERVER_DATABASES).fetchall())
    server_roles = dict(server.conn.execute(_SERVER_ROLES).fetchall())
    bot_roles = {e.role for e in fleet.bots.values()}
    bot_roles |= {r for r, c in server_roles.items() if (c or "").startswith(MARKER_PREFIX)}
    findings: list[Finding] = []
    names = sorted(fleet.bots)
    for i, name in enumerate(names, 1):
        progress(f"checking {name} ({i}/{len(names)})")
        findings += _check_bot(server, project, fleet.bots[name], bot_roles)
    findings += _strays(fleet, server_dbs, server_roles, ignore)
    if files:
        findings += _files(project, ignore)
    for f in findings:
        f.server = server.name
    return findings


def _check_bot(server: Server, project: Project, entry: BotEntry, bot_roles: set[str]) -> list[Finding]:
    """The reconcile's changes as findings, then the audit-only checks of doctor's own."""
    observed = reconcile.observe(server, project, entry, read_inside=_read_inside(entry.role))
    out = [Finding(c.check, entry.name, c.finding, c.fix, c.safe,
                   repair=reconcile.repair(server, entry, c.target) if c.safe else None)
           for c in reconcile.changes(server, project, entry, observed) if c.finding]
    if observed.role is not None:
        out += _memberships(server, entry, bot_roles)
    if observed.database is not None:
        out += _grants(server, entry, bot_roles)
    if isinstance(observed.extra, _Inside):
        out += _inside(server, entry, observed.extra)
    needed = settings.missing(project, entry.name, settings.of(observed.env))
    if needed:
        out.append(Finding("config", entry.name, f"{entry.name} lacks {', '.join(needed)}, which its code requires: "
                           "it would crash-loop on start", settings.set_command(entry.name, needed), False))
    path = observed.env.path
    if observed.env.exists:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != 0o600:
            out.append(Finding("env-file", entry.name, f"{path} has mode {mode:04o}, not 0600",
                               f"chmod 600 {path}", True, repair=lambda: path.chmod(0o600)))
    return out


def _run(conn: psycopg.Connection, stmt: sql.Composable) -> Callable[[], None]:
    return lambda: conn.execute(stmt)


def _memberships(server: Server, entry: BotEntry, bot_roles: set[str]) -> list[Finding]:
    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    out = []
    for granted, grantor in conn.execute(_MEMBERSHIPS, {"role": entry.role}).fetchall():
        stmt = sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), sql.Identifier(entry.role))
        if admin.major >= 16 and grantor:
            stmt = sql.SQL("{} GRANTED BY {}").format(stmt, sql.Identifier(grantor))
        other = "another bot's role" if granted in bot_roles else "a role outside the bot"
        out.append(Finding("membership", entry.name, f"role {entry.role} is a member of {granted} ({other}): "
                           "it has that role's privileges", stmt.as_string(conn), True, repair=_run(conn, stmt)))
    return out


def _grants(server: Server, entry: BotEntry, bot_roles: set[str]) -> list[Finding]:
    """Other bots' roles granted rights on this bot's database (PUBLIC is the reconcile's)."""
    conn = server.conn
    assert conn is not None
    out = []
    for grantee, privileges in conn.execute(_DATABASE_ACL, {"db": entry.database}).fetchall():
        if grantee not in bot_roles:
            continue  # a role outside the fleet that the operator granted on purpose
        stmt = sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(entry.database), sql.Identifier(grantee))
        out.append(Finding("access", entry.name, f"another bot's role {grantee} has {privileges} on database "
                           f"{entry.database}", stmt.as_string(conn), True, repair=_run(conn, stmt)))
    return out


def _inside(server: Server, entry: BotEntry, inside: _Inside) -> list[Finding]:
    conn = server.conn
    assert conn is not None
    out = []
    for obj in inside.foreign:
        stmt = obj.reassign(entry.role)

        def run(stmt: sql.Composable = stmt) -> None:
            with connect(with_database(server.url, entry.database)) as db_conn:
                db_conn.execute(stmt)
        out.append(Finding("ownership", entry.name, f"{obj} in {entry.database} is owned by {obj.owner}, "
                           f"not by {entry.role}", f"{stmt.as_string(conn)}  (in {entry.database})", True, repair=run))
    for trigger, owner in inside.triggers:
        stmt = sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(trigger))
        out.append(Finding("ownership", entry.name, f"event trigger {trigger} in {entry.database} (owner {owner}) runs on "
                           "the bot's DDL, and a bot cannot restore it from a backup",
                           f"{stmt.as_string(conn)}  (in {entry.database}; botfleet never drops it for you)", False))
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
                except (psycopg.Error, OSError) as err:
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
    found = audit(server, project, ignore=ignore, progress=progress, files=files)
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
