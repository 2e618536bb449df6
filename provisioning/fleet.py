"""The fleet's verbs: add, remove and list bots. The CLI is a thin layer over these.

Every verb is idempotent: it inspects the server and the project files, then
does only what is missing or wrong, so a rerun after a crash converges.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import databases, passwords, roles
from .db import AdminInfo, advisory_lock, connect, with_database
from .errors import InvalidInput, NotManaged
from .files import atomic_write, read_env_file
from .names import BotNames, validate
from .registry import DEFAULT_SERVER, BotEntry, Registry

TIMEOUT_RE = re.compile(r"\d{1,9}(ms|s|min|h)?")
MAX_POOL = 1000
# The bot database admits its owner's limit plus one for the admin's own
# backup and maintenance sessions (superusers are not counted anyway).
DATABASE_ADMIN_MARGIN = 1

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def marker(bot: str) -> str:
    """The comment botfleet puts on the roles and databases it owns."""
    return f"botfleet bot {bot}"


@dataclass
class Project:
    """The operator's project folder: registry, secrets, bot code, local state."""

    root: Path

    @property
    def registry(self) -> Registry:
        return Registry(self.root)

    def env_file(self, bot: str) -> Path:
        return self.root / "secrets" / f"{bot}.env"

    def backups(self, bot: str) -> Path:
        return self.root / "backups" / bot

    def code_dir(self, code: str) -> Path | None:
        for candidate in (code, code.replace("-", "_")):
            path = self.root / "bots" / candidate
            if path.is_dir():
                return path
        return None


@dataclass
class BotOptions:
    """What the operator asked for; None means "keep the registry's value, else the default"."""

    pool_size: int | None = None
    max_overflow: int | None = None
    replicas: int | None = None
    statement_timeout: str | None = None
    idle_timeout: str | None = None
    code: str | None = None
    db_host: str | None = None
    db_port: int | None = None
    rotate_password: bool = False
    server: str | None = None  # a [servers.NAME]; "" = the default server; None = keep (new bots: default)


@dataclass
class AddResult:
    bot: str
    database: str
    role: str
    connection_limit: int
    env_file: str
    status: str  # created | already provisioned | repaired
    changes: list[str] = field(default_factory=list)
    code: str | None = None
    has_code: bool = False
    password_changed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_options(opts: BotOptions) -> None:
    """Validate numeric and timeout options (InvalidInput, exit 2)."""
    if opts.pool_size is not None and not 1 <= opts.pool_size <= MAX_POOL:
        raise InvalidInput(f"--pool-size must be between 1 and {MAX_POOL}")
    if opts.max_overflow is not None and not 0 <= opts.max_overflow <= MAX_POOL:
        raise InvalidInput(f"--max-overflow must be between 0 and {MAX_POOL}")
    if opts.replicas is not None and not 1 <= opts.replicas <= 100:
        raise InvalidInput("--replicas must be between 1 and 100")
    for flag, value in (("--statement-timeout", opts.statement_timeout), ("--idle-timeout", opts.idle_timeout)):
        if value is not None and TIMEOUT_RE.fullmatch(value) is None:
            raise InvalidInput(f"{flag} must look like 30s, 500ms, 5min or 1h (got {value!r})")
    if opts.db_port is not None and not 1 <= opts.db_port <= 65535:
        raise InvalidInput("--db-port must be between 1 and 65535")
    if opts.db_host is not None and re.fullmatch(r"[A-Za-z0-9._-]{1,253}", opts.db_host) is None:
        raise InvalidInput(f"--db-host {opts.db_host!r} is not a host name")


def plan_entry(project: Project, names: BotNames, existing: BotEntry | None, opts: BotOptions) -> tuple[BotEntry, bool]:
    """The registry entry add-bot converges to, and whether the bot's code exists.

    Raises InvalidInput when ``--code`` names code that is not under bots/.
    """
    code = opts.code or (existing.code if existing else names.bot)
    has_code = project.code_dir(code) is not None
    server = existing.server if existing else ""
    if opts.server is not None:
        wanted = "" if opts.server == DEFAULT_SERVER else opts.server
        if existing is not None and wanted != existing.server:
            raise InvalidInput(
                f"{names.bot} lives on server {existing.server or DEFAULT_SERVER}; botfleet does not move bots between "
                f"servers (provision backup {names.bot}, remove-bot, add-bot --server {opts.server}, restore)")
        server = wanted
    if opts.code is not None and not has_code:
        raise InvalidInput(f"--code {opts.code!r}: no such bot code under {project.root / 'bots'}")
    base = existing or BotEntry(name=names.bot, code=code, database=names.database, role=names.role)
    entry = BotEntry(
        name=names.bot,
        code=code,
        database=names.database,
        role=names.role,
        pool_size=opts.pool_size if opts.pool_size is not None else base.pool_size,
        max_overflow=opts.max_overflow if opts.max_overflow is not None else base.max_overflow,
        replicas=opts.replicas if opts.replicas is not None else base.replicas,
        statement_timeout=opts.statement_timeout or base.statement_timeout,
        idle_in_transaction_session_timeout=opts.idle_timeout or base.idle_in_transaction_session_timeout,
        env_file=str(project.env_file(names.bot).relative_to(project.root)),
        db_host=opts.db_host if opts.db_host is not None else base.db_host,
        db_port=opts.db_port if opts.db_port is not None else base.db_port,
        server=server,
    )
    return entry, has_code


def database_url(entry: BotEntry, host: str, port: int, password: str) -> str:
    return f"postgresql+asyncpg://{entry.role}:{password}@{host}:{port}/{entry.database}"


def render_env(entry: BotEntry, url: str) -> str:
    return (
        f"# generated by botfleet for bot {entry.name}: its own credentials only. Never commit.\n"
        f"DATABASE_URL={url}\n"
        f"DB_POOL_SIZE={entry.pool_size}\n"
        f"DB_MAX_OVERFLOW={entry.max_overflow}\n"
        "DB_POOL_TIMEOUT=30\n"
        "DB_POOL_RECYCLE=3600\n"
    )


def stored_password(path: Path, role: str) -> str | None:
    """The password in a bot's env file, if it is there and belongs to ``role``."""
    if not path.exists():
        return None
    url = read_env_file(path).get("DATABASE_URL", "")
    try:
        params = conninfo_to_dict(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    except psycopg.ProgrammingError:
        return None
    if params.get("user") != role:
        return None
    return params.get("password") or None


def role_spec(entry: BotEntry) -> roles.RoleSpec:
    """The role a registry entry converges to (add-bot creates it, doctor checks it)."""
    return roles.RoleSpec(
        name=entry.role,
        connection_limit=entry.connection_limit,
        settings={
            "statement_timeout": entry.statement_timeout,
            "idle_in_transaction_session_timeout": entry.idle_in_transaction_session_timeout,
        },
        comment=marker(entry.name),
    )


def database_spec(entry: BotEntry) -> databases.DatabaseSpec:
    """The database a registry entry converges to (add-bot creates it, doctor checks it)."""
    return databases.DatabaseSpec(
        name=entry.database, owner=entry.role,
        connection_limit=entry.connection_limit + DATABASE_ADMIN_MARGIN, comment=marker(entry.name),
    )


def _check_managed(kind: str, name: str, comment: str | None, bot: str, known: bool) -> None:
    if comment != marker(bot) and not known:
        raise NotManaged(
            f"{kind} {name!r} already exists and was not created by botfleet; "
            "refusing to take it over (drop or rename it, or choose another bot name)"
        )


def add_bot(
    conn: psycopg.Connection,
    admin: AdminInfo,
    admin_url: str,
    project: Project,
    name: str,
    opts: BotOptions,
    progress: Progress = _quiet,
    *,
    rerender: bool = True,
) -> AddResult:
    """Create or converge one bot: role, database, lock-down, env file, registry entry.

    Preconditions: ``conn`` is an autocommit admin connection, ``admin`` its
    privileges. Raises InvalidBotName/InvalidInput before touching anything,
    NotManaged when the names belong to something botfleet did not create.
    """
    names = validate(name, admin_role=admin.role)
    check_options(opts)
    registry = project.registry
    current = registry.load()
    existing = current.bots.get(name)
    entry, has_code = plan_entry(project, names, existing, opts)
    if entry.server and entry.server not in current.servers:
        raise InvalidInput(f"no server {entry.server!r} in fleet.toml ([servers.NAME] tables)")
    # --- compose stack (provisioning/compose.py): a bot that would not fit is refused here, before any change.
    from .compose import check_add, rerender_if_present

    check_add(project.root, current, entry)
    # ---
    host, port = current.endpoint(entry)
    env_path = project.env_file(name)
    changes: list[str] = []

    with advisory_lock(conn, name):
        role_state = roles.inspect(conn, names.role, read_verifier=admin.superuser)
        db_state = databases.inspect(conn, names.database)
        known = existing is not None
        if role_state:
            _check_managed("role", names.role, role_state.comment, name, known)
        if db_state:
            _check_managed("database", names.database, db_state.comment, name, known)

        # The password: keep the one the bot already has, unless asked to rotate
        # or it cannot be recovered. The env file is written before the server
        # changes, so a crash in between is repaired by the next run.
        password = stored_password(env_path, names.role)
        set_password = new_password = False
        if opts.rotate_password or password is None or role_state is None:
            if role_state is not None:
                changes.append("password rotated" if opts.rotate_password else "password reset (its env file was missing)")
            password = passwords.generate()
            set_password = new_password = True
        elif role_state.verifier is not None and not passwords.verifier_matches(password, role_state.verifier):
            changes.append("password on the server reset to the one in the env file")
            set_password = True
        elif role_state.verifier is None and not admin.superuser:
            # Without superuser we cannot read the verifier: re-send it (same
            # password, new salt) so the server surely matches the env file.
            set_password = True

        url = database_url(entry, host, port, password)
        env_text = render_env(entry, url)
        if not env_path.exists() or env_path.read_text() != env_text:
            progress(f"writing {env_path}")
            env_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(env_path, env_text, mode=0o600)

        spec = role_spec(entry)
        verifier = passwords.scram_verifier(conn, password, names.role) if set_password else None
        if role_state is None:
            progress(f"creating role {names.role}")
            roles.create(conn, spec, verifier)  # type: ignore[arg-type]
        else:
            changes += roles.converge(conn, spec, role_state, verifier)
        if not admin.superuser:
            _grant_admin_membership(conn, admin, names.role)

        db_spec = database_spec(entry)
        if db_state is None:
            progress(f"creating database {names.database}")
            databases.create(conn, db_spec)
            if role_state is not None:
                changes.append("created the missing database")
        else:
            changes += databases.converge(conn, db_spec, db_state)
        with connect(with_database(admin_url, names.database)) as bot_conn:
            schema_changes = databases.lock_down_schema(bot_conn)
        if db_state is not None:
            changes += schema_changes

        with registry.editing() as fleet:
            fleet.bots[name] = entry

    # --- compose stack: keep a rendered stack in step with the registry (a warning, never a failure).
    warning = rerender_if_present(project.root) if rerender else None
    if warning:
        progress(warning)
    # ---
    if role_state is None and db_state is None:
        status = "created"
    elif changes:
        status = "repaired"
    else:
        status = "already provisioned"
    return AddResult(
        bot=name, database=names.database, role=names.role, connection_limit=entry.connection_limit,
        env_file=str(env_path), status=status, changes=changes, code=entry.code, has_code=has_code,
        password_changed=new_password,
    )


def _grant_admin_membership(conn: psycopg.Connection, admin: AdminInfo, role: str) -> None:
    """A CREATEROLE admin (not superuser) must act as the bot role: to create the
    database OWNER it (SET), then to revoke, comment on and drop it as its
    owner (INHERIT). PostgreSQL 16 no longer gives a role's creator either."""
    from psycopg import sql

    query = ("SELECT pg_has_role(current_user, %(r)s, 'SET') AND pg_has_role(current_user, %(r)s, 'USAGE')"
             if admin.major >= 16 else "SELECT pg_has_role(current_user, %(r)s, 'USAGE')")
    member = conn.execute(query, {"r": role}).fetchone()
    if member and member[0]:
        return
    stmt = "GRANT {} TO {} WITH SET TRUE, INHERIT TRUE" if admin.major >= 16 else "GRANT {} TO {}"
    conn.execute(sql.SQL(stmt).format(sql.Identifier(role), sql.Identifier(admin.role)))


@dataclass
class RemoveResult:
    bot: str
    status: str  # removed | not provisioned
    backup: str | None = None
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def remove_bot(
    conn: psycopg.Connection,
    admin: AdminInfo,
    admin_url: str,
    project: Project,
    name: str,
    *,
    backup: bool = True,
    progress: Progress = _quiet,
    rerender: bool = True,
) -> RemoveResult:
    """Back up, then drop one bot's database and role, its env file and registry entry.

    Refuses (NotManaged) to drop objects botfleet did not create. With
    ``backup`` a failed pg_dump stops everything before anything is dropped.
    Removing a bot that is already gone is a no-op.
    """
    from . import backup as backups

    names = validate(name, admin_role=admin.role)
    registry = project.registry
    known = name in registry.load().bots
    env_path = project.env_file(name)
    result = RemoveResult(bot=name, status="removed")
    with advisory_lock(conn, name):
        role_state = roles.inspect(conn, names.role, read_verifier=admin.superuser)
        db_state = databases.inspect(conn, names.database)
        if role_state:
            _check_managed("role", names.role, role_state.comment, name, known)
        if db_state:
            _check_managed("database", names.database, db_state.comment, name, known)
        if not (known or role_state or db_state or env_path.exists()):
            return RemoveResult(bot=name, status="not provisioned")
        if db_state and backup:
            progress(f"backing up {names.database} with pg_dump")
            path = backups.dump(admin_url, names.database, project.backups(name), name, server_major=admin.major)
            result.backup = str(path)
            progress(f"backup written: {path} ({path.stat().st_size} bytes)")
        if db_state:
            progress(f"ending sessions and dropping database {names.database}")
            databases.drop(conn, names.database)
            result.dropped.append(f"database {names.database}")
        if role_state:
            progress(f"dropping role {names.role}")
            roles.drop(conn, names.role)
            result.dropped.append(f"role {names.role}")
        if env_path.exists():
            env_path.unlink()
            result.dropped.append(f"env file {env_path}")
        with registry.editing() as fleet:
            if fleet.bots.pop(name, None) is not None:
                result.dropped.append("registry entry")
    # --- compose stack (provisioning/compose.py): drop the bot's service from a rendered stack.
    from .compose import rerender_if_present

    warning = rerender_if_present(project.root) if rerender else None
    if warning:
        progress(warning)
    # ---
    return result


_LIVE_DATABASES = """
SELECT d.datname,
       CASE WHEN has_database_privilege(d.oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'USAGE')
            THEN pg_database_size(d.oid) END,
       (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid),
       d.datconnlimit,
       shobj_description(d.oid, 'pg_database')
FROM pg_database d WHERE NOT d.datistemplate
"""
_LIVE_ROLES = "SELECT rolname, rolconnlimit, shobj_description(oid, 'pg_authid') FROM pg_roles"


def list_bots(conn: psycopg.Connection, project: Project, server: str = DEFAULT_SERVER) -> list[dict[str, Any]]:
    """Every registry bot placed on ``server`` (``conn``'s) joined with live facts from it,
    then every botfleet-marked database there that the registry does not place there
    (flagged ``unknown``)."""
    full = project.registry.load()
    on_server = full.on(server)
    dbs = {r[0]: r for r in conn.execute(_LIVE_DATABASES).fetchall()}
    role_rows = {r[0]: r for r in conn.execute(_LIVE_ROLES).fetchall()}
    rows: list[dict[str, Any]] = []
    for name in sorted(on_server):
        entry = on_server[name]
        db = dbs.get(entry.database)
        role = role_rows.get(entry.role)
        rows.append({
            "bot": name, "server": server, "code": entry.code, "database": entry.database, "role": entry.role,
            "status": "ok" if db and role else ("missing" if not db and not role else "incomplete"),
            "size_bytes": db[1] if db else None,
            "connections": db[2] if db else 0,
            "connection_limit": role[1] if role else None,
            "registry_connection_limit": entry.connection_limit,
            "pool": f"{entry.pool_size}+{entry.max_overflow}" + (f" x{entry.replicas}" if entry.replicas > 1 else ""),
        })
    registered = {e.database for e in on_server.values()}
    for datname, row in sorted(dbs.items()):
        comment = row[4] or ""
        if datname not in registered and comment.startswith("botfleet bot "):
            bot = comment.removeprefix("botfleet bot ")
            role = role_rows.get(f"{bot.replace('-', '_')}_user")
            rows.append({
                "bot": bot, "server": server, "code": None, "database": datname, "role": role[0] if role else None,
                "status": "unknown (not in the registry)", "size_bytes": row[1], "connections": row[2],
                "connection_limit": role[1] if role else None, "registry_connection_limit": None, "pool": None,
            })
    return rows
