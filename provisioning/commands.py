"""botfleet's library front door: one function per verb, as Alembic's ``command`` module is for Alembic.

Each function takes the project (``Project``: the folder and its fleet.toml,
loaded once) and the way to its servers (``Servers``), does the whole
operation, and returns a typed result that says what changed. Nothing here
prints: progress goes to the ``progress`` callback, results back to the caller.
The CLI (``provisioning.cli``) is parse -> call -> print over these; a script or
the stack's provisioning service calls them the same way::

    from provisioning import commands
    from provisioning.project import Project
    from provisioning.servers import Servers

    project = Project("/srv/fleet")
    result = commands.add_bot(project, Servers(project), "hello-bot")

Errors are ``provisioning.errors.ProvisionError`` subclasses, each one line
(``InvalidInput``: exit code 2, nothing was changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from . import budget as budgets
from . import codes, compose, declarative, reconcile
from . import quota as quotas
from .backup import BackupResult, DumpFile, backup_bot, dump
from .doctor import Report
from .errors import AuthenticationFailed, InvalidInput, ProvisionError, one_line
from .migrate import DEFAULT_LOCK_WAIT, MigrationFailed, Outcome, Target, is_unknown
from .names import CODE_RE, BotNames, canonical_code, derive, validate
from .project import Project
from .registry import DEFAULT_SERVER, BotEntry, StackSettings, check_options
from .restore import RestoreResult
from .servers import Server, Servers, place

Progress = Callable[[str], None]
Migrated = Callable[[Outcome, int], None]  # called with each bot's outcome and the number of bots


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- add-bot


# add-bot's --db-host / --db-port value that undoes an override: back to the bot's server's endpoint.
RESET = "default"


@dataclass
class BotOptions:
    """What the operator asked for; None means "keep the registry's value, else the default"."""

    pool_size: int | None = None
    max_overflow: int | None = None
    replicas: int | None = None
    statement_timeout: str | None = None
    idle_timeout: str | None = None
    code: str | None = None
    # The host and port in the bot's env file (how the host reaches its server, e.g. to run the
    # bot on the host); RESET ("default") goes back to its server's endpoint. Not where it runs.
    db_host: str | None = None
    db_port: int | str | None = None  # a port, a port as text, or RESET
    rotate_password: bool = False
    server: str | None = None  # DEFAULT_SERVER or a [servers.NAME]; None = keep (new bots: placed)
    publish: str | None = None  # "" = not published
    memory: str | None = None
    cpus: str | None = None
    # Guards and the storage quota; RESET ("default") goes back to fleet.toml's [defaults].
    temp_file_limit: str | None = None
    work_mem: str | None = None
    lock_timeout: str | None = None
    idle_session_timeout: str | None = None
    max_size: str | None = None

    def guards(self) -> dict[str, str | None]:
        """The guards and quota given, as fleet.toml keeps them ("" for RESET), None = keep."""
        given = {"temp_file_limit": self.temp_file_limit, "work_mem": self.work_mem,
                 "lock_timeout": self.lock_timeout, "idle_session_timeout": self.idle_session_timeout,
                 "max_size": self.max_size}
        return {k: "" if v == RESET else v for k, v in given.items()}

    def host(self) -> str | None:
        """``db_host`` as fleet.toml keeps it: "" for RESET (its server's), None to keep."""
        return "" if self.db_host == RESET else self.db_host

    def port(self) -> int | None:
        """``db_port`` as fleet.toml keeps it: 0 for RESET (its server's), None to keep.
        InvalidInput for anything else that is not a port from 1 to 65535."""
        if self.db_port is None:
            return None
        if self.db_port == RESET:
            return 0
        text = str(self.db_port)
        port = int(text) if text.isascii() and text.isdigit() else -1
        if not 1 <= port <= 65535:
            raise InvalidInput(f"--db-port must be between 1 and 65535, or {RESET!r} for its server's port "
                               f"(got {text[:20]!r})")
        return port

    def validate(self) -> None:
        """Validate the values given (InvalidInput, exit 2), in add-bot's flag names."""
        check_options({"pool_size": self.pool_size, "max_overflow": self.max_overflow, "replicas": self.replicas,
                       "statement_timeout": self.statement_timeout,
                       "idle_in_transaction_session_timeout": self.idle_timeout,
                       "db_host": self.host(), "db_port": self.port(), "publish": self.publish,
                       "memory": self.memory, "cpus": self.cpus, **self.guards()}, flags=True)
        if self.code is not None and CODE_RE.fullmatch(self.code) is None:
            raise InvalidInput(f"--code {self.code!r} is not a bot code name (a-z, 0-9, '-' or '_', starting with a letter)")


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
    server: str = DEFAULT_SERVER
    migration: Outcome | None = None
    notes: list[str] = field(default_factory=list)  # guards the admin could not set (see reconcile.RoleContext)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["migration"] = self.migration.as_dict() if self.migration else None
        return data


def desired_entry(project: Project, names: BotNames, existing: BotEntry | None, opts: BotOptions) -> BotEntry:
    """The registry entry add-bot converges to. Raises InvalidInput when ``--code`` names code
    that is not under bots/, or a bot would move between servers."""
    code = canonical_code(opts.code) if opts.code else (existing.code if existing else names.bot)
    server = existing.server if existing else DEFAULT_SERVER
    if opts.server is not None:
        if existing is not None and opts.server != existing.server:
            raise InvalidInput(
                f"{names.bot} lives on server {existing.server}; botfleet does not move bots between "
                f"servers (provision backup {names.bot}, remove-bot, add-bot --server {opts.server}, restore)")
        server = opts.server
    if opts.code is not None and project.code_dir(code) is None:
        raise InvalidInput(f"--code {opts.code!r}: no such bot code under {project.root / 'bots'}")
    base = existing or BotEntry(name=names.bot, code=code)
    return BotEntry(
        name=names.bot,
        code=code,
        pool_size=opts.pool_size if opts.pool_size is not None else base.pool_size,
        max_overflow=opts.max_overflow if opts.max_overflow is not None else base.max_overflow,
        replicas=opts.replicas if opts.replicas is not None else base.replicas,
        statement_timeout=opts.statement_timeout or base.statement_timeout,
        idle_in_transaction_session_timeout=opts.idle_timeout or base.idle_in_transaction_session_timeout,
        db_host=opts.host() if opts.db_host is not None else base.db_host,
        db_port=opts.port() if opts.db_port is not None else base.db_port,
        server=server,
        publish=_published(opts.publish) if opts.publish is not None else base.publish,
        memory=opts.memory.upper() if opts.memory is not None else base.memory,
        cpus=opts.cpus if opts.cpus is not None else base.cpus,
        **{k: v if v is not None else getattr(base, k) for k, v in opts.guards().items()},
    )


def _published(value: str) -> str:
    """``PORT`` or ``ADDRESS:PORT`` as fleet.toml keeps it: always ADDRESS:PORT (loopback unless given)."""
    from .registry import publish_address

    found = publish_address(value) if value else None
    return f"{found[0]}:{found[1]}" if found else ""


def provision_on(server: Server, project: Project, name: str, opts: BotOptions, *, rerender: bool = True,
                 credentials_only: bool = False, progress: Progress = _quiet) -> AddResult:
    """Create or converge one bot on ``server`` (open): the entry, the budget check, the
    reconcile, the registry, the stack. add-bot, rotate-password and apply share it.
    ``credentials_only``: touch no file (the stack's service; see reconcile.converge)."""
    assert server.admin is not None
    names = validate(name, admin_role=server.admin.role)
    opts.validate()
    fleet = project.fleet
    existing = fleet.bots.get(name)
    entry = desired_entry(project, names, existing, opts)
    if entry.server != DEFAULT_SERVER and entry.server not in fleet.servers:
        raise InvalidInput(f"no server {entry.server!r} in fleet.toml ([servers.NAME] tables)")
    if existing is not None:
        _refuse_code_change(server, project, existing, entry)
    compose.require_room(project.root, fleet, entry)  # a bot that would not fit is refused before any change
    done = reconcile.converge(server, project, entry, known=existing is not None, rotate=opts.rotate_password,
                              credentials_only=credentials_only, progress=progress)
    if not credentials_only:
        with project.editing() as registry:
            registry.bots[name] = entry
    warning = compose.rerender_if_present(project) if rerender and not credentials_only else None
    if warning:
        progress(warning)
    for note in done.notes:
        progress(f"note: {note}")
    return AddResult(
        bot=name, database=entry.database, role=entry.role, connection_limit=entry.connection_limit,
        env_file=str(project.env_path(name)), status=done.status, changes=done.changes, code=entry.code,
        has_code=project.code_dir(entry.code) is not None, password_changed=done.password_changed, server=entry.server,
        notes=done.notes,
    )


def _refuse_code_change(server: Server, project: Project, existing: BotEntry, entry: BotEntry) -> None:
    """Refuse (InvalidInput, nothing changed) giving a bot another code while its database holds a
    revision the new code's migrations do not know: its tables are the old code's and every
    migration of it would fail. A database never migrated (no alembic_version) may change code."""
    from .migrate import start_over, unknown_to_code

    if existing.code.replace("-", "_") == entry.code.replace("-", "_"):
        return
    observed = reconcile.observe(server, project, entry)
    if observed.inside_error:
        raise ProvisionError(f"{entry.name}: cannot read its database's migration revision ({observed.inside_error}); "
                             f"its code stays {existing.code} (nothing was changed)")
    why = unknown_to_code(project.root, entry.code, observed.revision)
    if why:
        raise InvalidInput(f"{entry.name} cannot change code from {existing.code} to {entry.code}: {why}; "
                           f"{start_over(entry.name, entry.code)} (nothing was changed)")


def add_bot(project: Project, servers: Servers, name: str, opts: BotOptions | None = None, *, migrate: bool = True,
            progress: Progress = _quiet) -> AddResult:
    """Create (or converge) one bot: an isolated database and login role, its 0600 env file,
    its registry entry; then its migrations to head, as its own role (``migrate``).

    A new bot goes to ``opts.server``, or (in a fleet with several servers) to the one
    with the most headroom; an existing bot stays where it is. Running it again repairs
    drift and keeps the password unless ``opts.rotate_password``.
    """
    opts = opts or BotOptions()
    names = validate(name)  # bad input fails before any server is started or touched
    opts.validate()
    fleet = project.fleet
    entry = desired_entry(project, names, fleet.bots.get(name), opts)
    if opts.server is None and name not in fleet.bots and fleet.servers:
        opts = dataclasses.replace(opts, server=place(fleet, entry))
        progress(f"placing {name} on server {opts.server} (the most headroom)")
    with servers.opened(opts.server or entry.server) as server:
        _require_server_room(server, project, dataclasses.replace(entry, server=server.name))
        result = provision_on(server, project, name, opts, progress=progress)
    if migrate and result.has_code:
        result.migration = _migrate_new_bot(project, server.url, name, progress)
    return result


_SERVER_LIMITS = ("SELECT current_setting('max_connections')::int, "
                  "current_setting('superuser_reserved_connections')::int")


def _require_server_room(server: Server, project: Project, entry: BotEntry) -> None:
    """add-bot's connection budget on the default server when no stack is rendered (with one, the
    stack's budget holds: compose.require_room): the server's own max_connections less its
    superuser_reserved_connections must hold the fleet's connection limits there, this bot's
    included. Refused (BudgetExceeded, exit 2) before any change; a rerun of a bot that asks for
    no more connections than it has is never refused, so drift can always be repaired."""
    if entry.server != DEFAULT_SERVER or compose.stack_present(project.root):
        return
    assert server.conn is not None
    max_connections, reserved = server.conn.execute(_SERVER_LIMITS).fetchone()
    fleet = project.fleet
    after = budgets.server_room(fleet, entry.server, max_connections, reserved, extra=entry)
    known = entry.name in fleet.bots
    if after.fits or (known and after.total <= budgets.server_room(fleet, entry.server, max_connections, reserved).total):
        return
    budgets.require_room(after, f"resizing {entry.name}" if known else f"adding {entry.name}")


def _migrate_new_bot(project: Project, url: str, name: str, progress: Progress) -> Outcome | None:
    """Bring a just-provisioned bot to head, as its own role (None: its code has no migrations)."""
    from .migrate import migrate_one, plan_targets

    targets, early = plan_targets(project, [name], all_bots=False, admin_url=url, skip_missing=True)
    if not targets:
        for outcome in early:
            progress(f"migrations skipped: {outcome.error}")
        return None
    progress(f"migrating {name} to head")
    return migrate_one(targets[0])


# --------------------------------------------------------------------------- remove-bot, list


def remove_bot(project: Project, servers: Servers, name: str, *, backup: bool = True, server: str | None = None,
               forget: bool = False, progress: Progress = _quiet) -> reconcile.Removed:
    """Back up (pg_dump -Fc into backups/NAME/), then drop a bot's database, role, env file and
    registry entry. ``server``: where a bot that fleet.toml no longer names lives.

    A bot fleet.toml no longer names is removed only from a server that has its database or
    role: when the server chosen (``server``, else the default one) has neither, nothing is
    removed, its env file (the only copy of its password) is kept, and the refusal
    (InvalidInput) names the server that has them (``--server NAME``).

    A bot fleet.toml names whose server has neither its database nor its role (the wrong server
    reached: ADMIN_DATABASE_URL unset, so a new embedded server; or the bot dropped by hand) keeps
    its env file and entry too, unless ``forget``: the refusal says where its URL points."""
    validate(name)
    entry = project.fleet.bots.get(name)
    where = entry.server if entry is not None else (server or DEFAULT_SERVER)
    if entry is not None and server is not None and server != where:
        raise InvalidInput(f"{name} lives on server {where}, not {server}")
    with servers.opened(where) as srv:
        assert srv.admin is not None
        validate(name, admin_role=srv.admin.role)
        if entry is None and not _has_bot(srv, name):
            _refuse_unplaced(project, servers, name, where)
        elif entry is not None and not forget and project.env_path(name).exists() and not _has_bot(srv, name):
            _refuse_elsewhere(project, srv, name)
        result = reconcile.remove(srv, project, name, backup=backup, progress=progress)
    warning = compose.rerender_if_present(project)
    if warning:
        progress(warning)
    return result


def _has_bot(server: Server, name: str) -> bool:
    """Whether ``server`` (open) holds the bot's database or its role."""
    from . import databases, roles

    assert server.conn is not None
    names = derive(name)
    return (roles.inspect(server.conn, names.role, read_verifier=False) is not None
            or databases.inspect(server.conn, names.database) is not None)


def _refuse_unplaced(project: Project, servers: Servers, name: str, where: str) -> None:
    """For a bot fleet.toml does not name and server ``where`` does not hold: refuse (InvalidInput,
    nothing changed), naming the fleet's server that holds it, or, when none does, keeping its env
    file (a server fleet.toml does not name may hold it). Returns when there is nothing anywhere
    (no env file either): removing it is then a no-op."""
    found, unreached = [], []
    for other in servers.fleet_wide():
        if other == where:
            continue
        try:
            with servers.opened(other) as srv:
                if _has_bot(srv, name):
                    found.append(other)
        except ProvisionError:
            unreached.append(other)
    env_path = project.env_path(name)
    kept = f"; its credentials {env_path} are kept" if env_path.exists() else ""
    if found:
        raise InvalidInput(f"{name} is not in fleet.toml and server {where} has no database or role of it; server "
                           f"{found[0]} has: provision remove-bot {name} --server {found[0]} (nothing was changed{kept})")
    if not env_path.exists():
        return
    where_url = _points_at(env_path)
    points = f" ({where_url})" if where_url else ""
    looked = [where] + [n for n in servers.fleet_wide() if n != where and n not in unreached]
    missed = f"; server {', '.join(unreached)} not reached" if unreached else ""
    raise InvalidInput(
        f"{name} is not in fleet.toml and no database or role of it is on {'server' if len(looked) == 1 else 'servers'} "
        f"{', '.join(looked)}{missed}; "
        f"its credentials {env_path}{points} are kept, the only copy of its password: if a server fleet.toml "
        f"does not name holds it, add it as [servers.NAME] and run provision remove-bot {name} --server NAME; "
        "if the bot is gone, delete the file yourself (nothing was changed)")


def _points_at(env_path: Path) -> str:
    """Where a bot's env file's DATABASE_URL points (host:port/database), for a refusal; '' without one."""
    from .envfile import EnvFile

    creds = EnvFile.read(env_path).credentials()
    return f"its DATABASE_URL points at {creds.host}:{creds.port}/{creds.database}" if creds else ""


def _refuse_elsewhere(project: Project, server: Server, name: str) -> None:
    """For a registry bot its server (open) does not hold: refuse, keeping its credentials (the
    only copy of its password, for a bot that lives on a server this command did not reach)."""
    env_path = project.env_path(name)
    where_url = _points_at(env_path)
    points = f"; {where_url}" if where_url else ""
    raise InvalidInput(
        f"{name}: the server reached ({server.banner().removeprefix('server: ')}) has no database or role of it"
        f"{points}; nothing was changed and its credentials {env_path} are kept: if it lives on another server, "
        f"set ADMIN_DATABASE_URL to it; if the bot is gone, provision remove-bot {name} --forget")


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


def _list_server(server: Server, project: Project) -> list[dict[str, Any]]:
    """Every registry bot placed on ``server`` joined with live facts from it, then every
    botfleet-marked database there that the registry does not place there (``unknown``)."""
    assert server.conn is not None
    on_server = project.fleet.on(server.name)
    dbs = {r[0]: r for r in server.conn.execute(_LIVE_DATABASES).fetchall()}
    role_rows = {r[0]: r for r in server.conn.execute(_LIVE_ROLES).fetchall()}
    suspended = quotas.suspensions(server.conn)
    grown = quotas.baselines(server.conn, [e.role for e in on_server.values()])
    rows: list[dict[str, Any]] = []
    for name in sorted(on_server):
        entry = on_server[name]
        db = dbs.get(entry.database)
        role = role_rows.get(entry.role)
        rows.append({
            "bot": name, "server": server.name, "code": entry.code, "database": entry.database, "role": entry.role,
            "status": "ok" if db and role else ("missing" if not db and not role else "incomplete"),
            "size_bytes": db[1] if db else None,
            "connections": db[2] if db else 0,
            "connection_limit": role[1] if role else None,
            "registry_connection_limit": entry.connection_limit,
            "pool": f"{entry.pool_size}+{entry.max_overflow}" + (f" x{entry.replicas}" if entry.replicas > 1 else ""),
            **_quota_columns(quotas.with_growth(quotas.QuotaState(
                name, server.name, entry.database, db[1] if db else None, project.fleet.max_size(entry),
                entry.role in suspended), grown.get(entry.role))),
        })
    registered = {e.database for e in on_server.values()}
    for datname, row in sorted(dbs.items()):
        comment = row[4] or ""
        if datname not in registered and comment.startswith(reconcile.MARKER_PREFIX):
            bot = comment.removeprefix(reconcile.MARKER_PREFIX)
            role = role_rows.get(derive(bot).role)
            rows.append({
                "bot": bot, "server": server.name, "code": None, "database": datname, "role": role[0] if role else None,
                "status": "unknown (not in the registry)", "size_bytes": row[1], "connections": row[2],
                "connection_limit": role[1] if role else None, "registry_connection_limit": None, "pool": None,
                "max_size_bytes": None, "quota_percent": None, "quota_state": None, "growth_bytes": None,
                "growth_since": None,
            })
    return rows


def _quota_columns(state: quotas.QuotaState) -> dict[str, Any]:
    """A list row's quota: the quota in bytes (None: none), the share of it used, its state, and
    the database's growth since an earlier `quota enforce` sampled it."""
    return {"max_size_bytes": state.max_size_bytes, "quota_percent": state.percent, "quota_state": state.state,
            "growth_bytes": state.growth_bytes, "growth_since": state.growth_since}


def list_bots(project: Project, servers: Servers, streams: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every bot in the registry with live facts from its server (exists, size, connections in use
    / limit), and botfleet databases on those servers that the registry does not know.
    ``streams``: filled with each server's archive as the server sees it (archive.stream)."""
    rows: list[dict[str, Any]] = []
    with servers.visit(servers.fleet_wide()) as opened:
        for server in opened:
            rows += _list_server(server, project)
            if streams is not None and server.conn is not None:
                from .archive import stream

                streams[server.name] = stream(server.conn)
    return sorted(rows, key=lambda r: (r["bot"], r["server"]))


def chosen_bots(project: Project, names: list[str], *, all_bots: bool) -> list[str]:
    """The named bots (each valid and in the registry) or, with ``all_bots``, every registry
    bot. Bad input raises InvalidInput (exit 2) before any server is touched."""
    if bool(names) == all_bots:
        raise InvalidInput("name the bots, or pass --all (not both)")
    for name in names:
        validate(name)
    unknown = [n for n in names if n not in project.fleet.bots]
    if unknown:
        raise InvalidInput(f"not in the fleet registry: {', '.join(unknown)} (see provision list)")
    return sorted(project.fleet.bots) if all_bots else list(dict.fromkeys(names))


# --------------------------------------------------------------------------- rotate-password, backup, restore


@dataclass
class Rotation:
    rotated: list[AddResult]
    failed: list[tuple[str, str]]  # (bot, error)

    @property
    def recreate(self) -> str | None:
        """The command that restarts the bots' containers with their new env files."""
        bots = [r.bot for r in self.rotated]
        return "docker compose up -d --force-recreate " + " ".join(bots) if bots else None

    def as_dict(self) -> dict[str, Any]:
        return {"rotated": [r.as_dict() for r in self.rotated],
                "failed": [{"bot": b, "error": e} for b, e in self.failed], "recreate": self.recreate}


def rotate_password(project: Project, servers: Servers, bots: list[str], *, progress: Progress = _quiet) -> Rotation:
    """New generated passwords: each env file rewritten atomically (0600) first, then only a
    SCRAM verifier sent. One bot's failure never stops the others. A bot whose role is
    missing on its server is refused (add-bot creates it)."""
    from . import roles

    result = Rotation([], [])
    order = {bot: i for i, bot in enumerate(bots, 1)}
    with servers.visit(servers.of(bots)) as opened:
        for server in opened:
            assert server.conn is not None
            for bot in (b for b in bots if project.fleet.bots[b].server == server.name):
                progress(f"[{order[bot]}/{len(bots)}] {bot}")
                try:
                    role = project.fleet.bots[bot].role
                    if roles.inspect(server.conn, role, read_verifier=False) is None:
                        raise ProvisionError(f"{bot}: role {role} does not exist on this server; "
                                             f"run: provision add-bot {bot}")
                    progress(f"{bot}: new password, env file first, then the server")
                    result.rotated.append(provision_on(server, project, bot, BotOptions(rotate_password=True),
                                                     progress=progress))
                except ProvisionError as err:
                    result.failed.append((bot, str(err)))
    return result


def backup(project: Project, servers: Servers, bots: list[str], *, keep: int | None = None,
           progress: Progress = _quiet) -> list[BackupResult]:
    """pg_dump -Fc of each bot's database into backups/NAME/ (0600, a .sha256 beside it);
    ``keep``: then only each bot's N newest. One bot's failure never stops the others."""
    if keep is not None and keep < 1:
        raise InvalidInput("--keep must be at least 1")
    reached: dict[str, tuple[str, int]] = {}  # server -> (admin URL, major), opened on first use
    results = []
    for i, bot in enumerate(bots, 1):
        entry = project.fleet.bots[bot]
        if entry.server not in reached:
            with servers.opened(entry.server) as server:  # pg_dump opens its own connections
                reached[entry.server] = (server.url, server.major)
        url, major = reached[entry.server]
        progress(f"[{i}/{len(bots)}] {bot}: pg_dump of {entry.database}")
        result = backup_bot(url, entry.database, project.backups(bot), bot, server_major=major, keep=keep)
        results.append(result)
        progress(f"[{i}/{len(bots)}] {bot}: " + (f"{result.size_bytes} bytes in {result.seconds:.1f}s"
                                                 + (f", pruned {len(result.pruned)} older" if result.pruned else "")
                                                 if result.ok else "failed"))
    return results


def restore(project: Project, servers: Servers, name: str, file: Path, *,
            confirm: Callable[[str], bool] = lambda _question: False, require_checksum: bool = True,
            from_bot: str | None = None, progress: Progress = _quiet) -> RestoreResult:
    """Restore a pg_dump archive into a bot's database, as the bot's own role, in one
    transaction; a database that is not empty is replaced only when ``confirm`` says yes,
    after a backup of what it held. A dump of another bot's database is refused unless
    ``from_bot`` names that bot."""
    from .restore import restore as restore_into

    chosen_bots(project, [name], all_bots=False)  # bad input fails before any server is started
    if from_bot is not None:
        validate(from_bot)
    if not file.is_file():
        raise InvalidInput(f"no such backup file: {file}")
    with servers.opened(project.fleet.bots[name].server) as server:
        return restore_into(server, project, name, file, confirm=confirm, require_checksum=require_checksum,
                            from_bot=from_bot, progress=progress)


def backup_stream(project: Project, servers: Servers, name: str, out: IO[bytes], *,
                  progress: Progress = _quiet) -> BackupResult:
    """``provision backup NAME --output -``: one bot's pg_dump -Fc onto ``out`` (stdout), nothing
    else on it; written only once pg_dump succeeded (raises BackupFailed, exit 1, otherwise)."""
    from .backup import dump_to

    chosen_bots(project, [name], all_bots=False)
    entry = project.fleet.bots[name]
    with servers.opened(entry.server) as server:  # pg_dump opens its own connection
        url, major = server.url, server.major
    progress(f"{name}: pg_dump of {entry.database} to stdout")
    result = dump_to(url, entry.database, out, name, server_major=major)
    progress(f"{name}: {result.size_bytes} bytes in {result.seconds:.1f}s, sha256 {result.sha256}")
    return result


STDIN_LABEL = "stdin"


def restore_stream(project: Project, servers: Servers, name: str, stream: IO[bytes], *,
                   confirm: Callable[[str], bool] = lambda _question: False, require_checksum: bool = True,
                   from_bot: str | None = None, progress: Progress = _quiet) -> RestoreResult:
    """``provision restore NAME -``: a dump read from ``stream`` (stdin) and restored exactly as
    a file is (the archive, --from-bot and owner checks, the safety backup of a non-empty
    database, one transaction). A stream has no .sha256 beside it, so ``require_checksum``
    refuses it before anything is read. It is spooled to a 0600 file in a private temporary
    folder (pg_restore reads an archive twice), removed afterwards."""
    import shutil
    import tempfile

    from .restore import restore as restore_into

    chosen_bots(project, [name], all_bots=False)  # bad input fails before stdin is read
    if from_bot is not None:
        validate(from_bot)
    if require_checksum:
        raise InvalidInput("a dump read from stdin has no .sha256 beside it: pass --no-checksum "
                           "(pg_restore still checks that it is a readable archive); nothing was read")
    with tempfile.TemporaryDirectory(prefix="botfleet-restore-") as folder:  # mode 0700
        spooled = Path(folder) / f"{name}.dump"
        with open(spooled, "xb") as fh:
            shutil.copyfileobj(stream, fh, 1 << 20)
        if spooled.stat().st_size == 0:
            raise InvalidInput("stdin held no dump (0 bytes); nothing was restored")
        progress(f"read {spooled.stat().st_size} bytes from stdin")
        with servers.opened(project.fleet.bots[name].server) as server:
            return restore_into(server, project, name, spooled, confirm=confirm, require_checksum=False,
                                from_bot=from_bot, progress=progress, label=STDIN_LABEL)


def backups(project: Project, name: str | None = None) -> list[DumpFile]:
    """The dumps in backups/ (``name``: that bot's only, in the registry or not: a removed bot's
    backups stay there), each with its size, age and checksum state. Reads only; a folder
    without fleet.toml is refused (no fleet here)."""
    from .backup import list_dumps

    project.require_fleet()
    project.check_private()  # backups/ must be the project's own folder
    if name is not None:
        validate(name)
        bots = [name]
    else:
        root = project.root / "backups"
        bots = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return list_dumps(project.root / "backups", bots)


# --------------------------------------------------------------------------- doctor, plan, apply


def doctor(project: Project, servers: Servers, *, fix: bool = False, ignore: tuple[str, ...] = (),
           progress: Progress = _quiet) -> Report:
    """Audit the fleet's isolation against the registry on every server; with ``fix``, repair
    what is safe and audit again."""
    from . import doctor as audit

    reports = []
    with servers.visit(servers.fleet_wide()) as opened:
        for i, server in enumerate(opened):
            reports.append(audit.run(server, project, repair=fix, ignore=ignore, progress=progress, files=i == 0))
    return Report([f for r in reports for f in r.found], [f for r in reports for f in r.tried],
                  [f for r in reports for f in r.remaining], [n for r in reports for n in r.notes])


def plan(project: Project, servers: Servers, *, prune: bool = False, ignore: tuple[str, ...] = (),
         migrations: bool = True, progress: Progress = _quiet) -> declarative.FleetPlan:
    """What ``apply`` would change so the servers and the files match fleet.toml. Reads only."""
    with servers.visit(servers.fleet_wide()) as opened:
        return declarative.plan(opened, project, prune=prune, ignore=ignore, migrations=migrations, progress=progress)


@dataclass
class Applied:
    plan: declarative.FleetPlan
    results: list[declarative.StepResult]
    # The stack's service: a bot whose migration failed keeps itself down (its container checks
    # its schema before it starts), so that failure does not hold the other bots back.
    migrations_gate_bots: bool = False

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results if not (self.migrations_gate_bots and r.action == "migrate"))

    def as_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.as_dict(), "results": [r.as_dict() for r in self.results]}


def apply(project: Project, servers: Servers, *, prune: bool = False, ignore: tuple[str, ...] = (),
          migrations: bool = True, jobs: int | None = None, credentials_only: bool = False, owns_server: bool = False,
          confirm_removals: Callable[[declarative.FleetPlan], bool] = lambda _plan: False,
          on_migrated: Migrated | None = None, progress: Progress = _quiet) -> Applied:
    """Make the servers and the files match fleet.toml: exactly the steps ``plan`` lists.

    Refuses (InvalidInput) a plan with problems, before any change; removals (only with
    ``prune``) need ``confirm_removals(plan)``. One bot's failure does not stop the others.
    Migrations run after the admin connections are closed (in forked workers).

    ``credentials_only`` is the compose stack's provisioning service: the default server
    only (the stack's postgres), each password from the bot's credentials file, no file
    written (fleet.toml and the secrets are read-only there), nothing pruned. ``owns_server``:
    botfleet runs the default server (the stack's postgres): its maintenance databases are closed
    to the bots."""
    from .declarative import CREATE, MIGRATE, REMOVE, UPDATE, StepResult, apply_files, migration_results
    from .migrate import plan_targets

    if jobs is not None and not 1 <= jobs <= 64:
        raise InvalidInput("--jobs must be between 1 and 64")
    results: list[StepResult] = []
    default_url = None
    if credentials_only and prune:
        raise InvalidInput("the stack's provisioning never prunes")
    with contextlib.ExitStack() as visiting:
        try:
            opened = visiting.enter_context(servers.visit([DEFAULT_SERVER] if credentials_only else servers.fleet_wide(),
                                                       owned=owns_server))
        except AuthenticationFailed as err:
            if credentials_only and owns_server:
                raise AuthenticationFailed(
                    f"{err} (the stack's postgres keeps the admin password it first started with in its pgdata "
                    f"volume: a {compose.ADMIN_PASSWORD} made anew since does not open it; put the earlier file "
                    "back)") from None
            raise
        fleet_plan = declarative.plan(opened, project, prune=prune, ignore=ignore, migrations=migrations,
                                      credentials_only=credentials_only, progress=progress)
        if fleet_plan.problems:
            raise InvalidInput(fleet_plan.refusal())
        removals = [s.subject for s in fleet_plan.of(REMOVE)]
        if removals and not confirm_removals(fleet_plan):
            raise InvalidInput(f"apply --prune would remove {', '.join(removals)} (after backups): "
                               "not confirmed; nothing was changed")
        by_name = {server.name: server for server in opened}
        default_url = by_name[DEFAULT_SERVER].url if DEFAULT_SERVER in by_name else None
        for step in fleet_plan.steps:
            if step.action not in (CREATE, UPDATE, REMOVE):
                continue
            server = by_name[step.server]
            progress(f"{step.action} {step.subject}" + ("" if step.server == DEFAULT_SERVER else f" on server {step.server}"))
            try:
                if step.action == REMOVE:
                    removed = reconcile.remove(server, project, step.subject, backup=True, progress=progress)
                    results.append(StepResult(REMOVE, step.subject, True, f"backup {removed.backup}" if removed.backup else ""))
                else:
                    added = provision_on(server, project, step.subject, BotOptions(), rerender=False,
                                         credentials_only=credentials_only, progress=progress)
                    results.append(StepResult(step.action, step.subject, True, added.status))
            except ProvisionError as err:
                results.append(StepResult(step.action, step.subject, False, str(err)))
        if credentials_only and DEFAULT_SERVER in by_name:
            results += _converge_monitor(project, by_name[DEFAULT_SERVER], progress)
            results += _converge_backup_role(project, by_name[DEFAULT_SERVER], progress)
    bots = [s.subject for s in fleet_plan.of(MIGRATE)]
    if bots:
        targets, early = plan_targets(project, bots, all_bots=False, admin_url=default_url)
        results += migration_results(_run_migrations(targets, "head", jobs, DEFAULT_LOCK_WAIT, on_migrated) + early)
    if not credentials_only:
        results += apply_files(project)
    return Applied(fleet_plan, results, migrations_gate_bots=credentials_only)


def _converge_monitor(project: Project, server: Server, progress: Progress) -> list[Any]:
    """The stack's provisioning service: the exporter's monitoring role, when the stack has an
    exporter (its URL file mounted from secrets/); see monitoring.py."""
    import psycopg

    from . import monitoring
    from .declarative import UPDATE, StepResult

    if not project.fleet.stack.exporter:
        return []
    found = monitoring.read_url_file(project.root / monitoring.URL_FILE)
    if found is None:
        return [StepResult(UPDATE, monitoring.ROLE, False, f"no {monitoring.URL_FILE}: run provision render")]
    assert server.conn is not None
    try:
        changed = monitoring.converge(server.conn, found.password)
    except psycopg.Error as err:
        return [StepResult(UPDATE, monitoring.ROLE, False, one_line(err))]
    if changed:
        progress(f"update {monitoring.ROLE}: {', '.join(changed)}")
    return [StepResult(UPDATE, monitoring.ROLE, True, ", ".join(changed) or "unchanged")]


def _converge_backup_role(project: Project, server: Server, progress: Progress) -> list[Any]:
    """The stack's provisioning service: the archive service's replication role, when the stack
    has one (its passfile mounted from secrets/); see archive.converge_role."""
    import psycopg

    from . import archive
    from .declarative import UPDATE, StepResult

    if not project.fleet.stack.archive:
        return []
    password = archive.read_passfile(project.root / "secrets" / f"{archive.ROLE}.pgpass")
    if password is None:
        return [StepResult(UPDATE, archive.ROLE, False, f"no secrets/{archive.ROLE}.pgpass: run provision render")]
    assert server.conn is not None and server.url is not None
    try:
        changed = archive.converge_role(server.conn, server.url, password, server.major)
    except psycopg.Error as err:
        return [StepResult(UPDATE, archive.ROLE, False, one_line(err))]
    if changed:
        progress(f"update {archive.ROLE}: {', '.join(changed)}")
    return [StepResult(UPDATE, archive.ROLE, True, ", ".join(changed) or "unchanged")]


# --------------------------------------------------------------------------- migrations


def _run_migrations(targets: list[Target], dest: str, jobs: int | None, lock_wait: float,
                    on_done: Migrated | None, replay: bool = True) -> list[Outcome]:
    from .migrate import migrate_many

    def report(outcome: Outcome) -> None:
        if on_done is not None:
            on_done(outcome, len(targets))

    return migrate_many(targets, dest, jobs=jobs, lock_wait=lock_wait, on_done=report, replay=replay)


def _default_url(project: Project, servers: Servers, bots: list[str] | None) -> str | None:
    """The default server's URL, to reach its bots on, announced; no admin connection is
    opened. None when none of ``bots`` (None: the whole registry) lives there, so a fleet
    living on [servers.NAME] only never starts the embedded server for nothing."""
    fleet = project.fleet
    if fleet.servers:
        chosen = [fleet.bots[b] for b in (bots or fleet.bots) if b in fleet.bots]
        if not any(e.server == DEFAULT_SERVER for e in chosen):
            return None
    return servers.url(DEFAULT_SERVER)


def migrate_self(root: Path, bot: str, code: str, url: str, *, to: str = "head", check: bool = False,
                 lock_wait: float = DEFAULT_LOCK_WAIT) -> Outcome | None:
    """One bot's own migrations, as its role, through its own DATABASE_URL (no fleet.toml, no
    admin): what a bot's container runs before the bot starts. With ``check`` nothing is
    migrated: the outcome fails unless the database is at ``to`` (the stack's bots, whose
    provisioning service migrated them). None when its code has no migrations."""
    import psycopg

    from .db import parse_url
    from .migrate import bot_conninfo_from_env, current_revision, head_of, migrate_one, resolve, script_directory

    try:
        found = codes.with_migrations(root, code)
    except codes.NoMigrations:
        return None
    database = parse_url(url).get("dbname") or ""
    target = Target(bot=bot, root=str(root), package=found.package, database=database,
                    conninfo=bot_conninfo_from_env(url))
    if not check:
        return migrate_one(target, to, lock_wait=lock_wait)
    script = script_directory(str(root), found.package)
    want = head_of(script, found.package) if to == "head" else resolve(script, found.package, to)
    try:
        have = current_revision(target.conninfo)
    except psycopg.OperationalError as err:  # libpq's text never holds the password
        reason = one_line(err).rsplit("failed: ", 1)[-1].removeprefix("FATAL:  ")
        return Outcome(bot=bot, status="failed", from_rev=None, to_rev=want,
                       error=f"{bot}: cannot reach its database {database}: {reason}")
    if have == want:
        return Outcome(bot=bot, status="up to date", from_rev=have, to_rev=want)
    return Outcome(bot=bot, status="failed", from_rev=have, to_rev=want,
                   error=f"{bot}: its database is at {(have or 'base')[:12]}, its code needs {(want or 'base')[:12]}; "
                         "it stays down until its migration succeeds (the provision service's log says why)")


def migration_targets(project: Project, servers: Servers, bots: list[str], *, all_bots: bool,
                      bot_urls: bool = False) -> tuple[list[Target], list[Outcome]]:
    """The bots to migrate (each reached as its own role) and the ones that cannot be."""
    from .migrate import plan_targets

    if bool(bots) == all_bots:
        raise InvalidInput("name the bots to migrate, or pass --all (not both)")
    url = servers.admin_url if bot_urls else _default_url(project, servers, None if all_bots else bots)
    return plan_targets(project, bots, all_bots=all_bots, admin_url=url, bot_urls=bot_urls)


def migrate(project: Project, servers: Servers, bots: list[str], *, all_bots: bool = False, to: str = "head",
            jobs: int | None = None, bot_urls: bool = False, lock_wait: float = DEFAULT_LOCK_WAIT,
            on_done: Migrated | None = None, replay: bool = True) -> list[Outcome]:
    """Bring bots to ``to`` (head), each as its OWN role, several at once; one bot's failure
    never stops the others (its outcome is "failed" and it is rolled back). ``replay``: see
    migrate.migrate_many (False: Alembic works out every bot's migrations itself)."""
    if jobs is not None and not 1 <= jobs <= 64:
        raise InvalidInput("--jobs must be between 1 and 64")
    from .migrate import at_head

    targets, early = migration_targets(project, servers, bots, all_bots=all_bots, bot_urls=bot_urls)
    # The bots already at head are read a few at once (one connection each) and never reach a
    # migrator process: a migrate --all with nothing pending forks none.
    done, pending = at_head(targets, to)
    for outcome in done:
        if on_done is not None:
            on_done(outcome, len(targets))
    ran = _run_migrations(pending, to, jobs, lock_wait,
                          None if on_done is None else (lambda o, _n: on_done(o, len(targets))), replay) if pending else []
    return sorted(done + ran + early, key=lambda o: o.bot)


@dataclass
class OfflineSql:
    bot: str
    database: str
    package: str
    current: str | None
    sql: str


def migrate_sql(project: Project, servers: Servers, bots: list[str], *, all_bots: bool = False, to: str = "head",
                bot_urls: bool = False) -> tuple[list[OfflineSql], list[Outcome]]:
    """The SQL ``migrate`` would run for each bot (from its current revision), not run."""
    from .migrate import current_revision, offline_sql

    targets, early = migration_targets(project, servers, bots, all_bots=all_bots, bot_urls=bot_urls)
    out = []
    for t in targets:
        current = current_revision(t.conninfo)
        out.append(OfflineSql(t.bot, t.database, t.package, current, offline_sql(t, current, to)))
    return out, early


def _state(target: Target, current: str | None, head: str | None) -> str:
    from .migrate import script_directory

    script = script_directory(target.root, target.package)
    if current == head:
        return "at head"
    if current is not None and is_unknown(script, current):
        return "ahead of the code (unknown revision)"
    return f"behind by {len(list(script.iterate_revisions(head, current or 'base')))}"


def current(project: Project, servers: Servers, bots: list[str]) -> list[dict[str, Any]]:
    """Each bot's migration revision against its code's head (``state``: at head, behind by N,
    ahead of the code, or an error)."""
    from .migrate import current_revision, head_of, one_line, plan_targets, script_directory

    url = _default_url(project, servers, bots or None)
    targets, early = plan_targets(project, bots, all_bots=not bots, admin_url=url)
    rows = []
    for t in targets:
        row: dict[str, Any] = {"bot": t.bot, "code": canonical_code(t.package), "current": None, "head": None,
                               "state": ""}
        try:
            row["head"] = head_of(script_directory(t.root, t.package), t.package)
            row["current"] = current_revision(t.conninfo)
            row["state"] = _state(t, row["current"], row["head"])
        except Exception as err:  # noqa: BLE001 - reported per bot
            row["state"] = f"error: {one_line(err)}"
        rows.append(row)
    rows += [{"bot": o.bot, "code": None, "current": None, "head": None, "state": o.error or o.status} for o in early]
    return sorted(rows, key=lambda r: r["bot"])


@dataclass
class History:
    package: str
    revisions: list[dict[str, Any]]  # newest first: revision, down_revision, doc, head, current
    current: str | None  # the bot's revision ("?": not a bot, or not read)


def history(project: Project, servers: Servers, name: str) -> History:
    """The revisions of a bot's code (or of a code under bots/), newest first, the bot's marked."""
    from .migrate import current_revision, plan_targets, script_directory

    current_rev: str | None = "?"
    if name in project.fleet.bots:
        found = codes.with_migrations(project.root, project.fleet.bots[name].code)
        targets, _early = plan_targets(project, [name], all_bots=False,
                                       admin_url=_default_url(project, servers, [name]))
        if targets:
            current_rev = current_revision(targets[0].conninfo)
    else:
        found = codes.with_migrations(project.root, name)
    script = script_directory(str(project.root), found.package)
    heads = set(script.get_heads())
    revisions = []
    for rev in script.walk_revisions():
        down = rev.down_revision if isinstance(rev.down_revision, str) or rev.down_revision is None \
            else ",".join(rev.down_revision)
        revisions.append({"revision": rev.revision, "down_revision": down, "doc": rev.doc or "",
                          "head": rev.revision in heads, "current": rev.revision == current_rev})
    return History(found.package, revisions, current_rev)


def revision(project: Project, servers: Servers, code: str, message: str, *, autogenerate: bool = False) -> Path | None:
    """Write a new migration for a bot's code into migrations/CODE/versions/ (None: with
    ``autogenerate``, the models already match the migrations and nothing was written)."""
    from .revisions import new_revision

    if not message.strip() or "\n" in message:
        raise InvalidInput("-m needs a one-line message")
    codes.with_migrations(project.root, code)  # bad input fails before any server starts
    if not autogenerate:
        return new_revision(None, None, project.root, code, message, autogenerate=False)
    with servers.opened() as server:
        return new_revision(server.conn, server.url, project.root, code, message, autogenerate=True)


def downgrade(project: Project, servers: Servers, name: str, to: str, *, backup: bool = True,
              progress: Progress = _quiet) -> Outcome:
    """Undo a bot's migrations down to ``to``, as its own role, after a pg_dump backup."""
    from .migrate import migrate_one, plan_targets, resolve, script_directory

    if name not in project.fleet.bots:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    with servers.opened(project.fleet.bots[name].server) as server:
        targets, early = plan_targets(project, [name], all_bots=False, admin_url=server.url)
        if early:
            raise ProvisionError(early[0].error or "cannot migrate")
        target = targets[0]
        try:
            resolve(script_directory(target.root, target.package), target.package, to)
        except MigrationFailed as err:
            raise InvalidInput(str(err)) from None
        if backup:
            progress(f"backing up {target.database} with pg_dump")
            path = dump(server.url, target.database, project.backups(name), name, server_major=server.major)
            progress(f"backup written: {path}")
    return migrate_one(target, to, downgrade=True)


def check(project: Project, servers: Servers) -> list[dict[str, str]]:
    """The CI gate's findings: codes whose models and migrations disagree (compared on a
    scratch database), and bots not at head. Empty: all is well."""
    from .migrate import current_revision, head_of, one_line, plan_targets, script_directory
    from .revisions import model_differences

    findings: list[dict[str, str]] = []
    with servers.opened() as server:
        for package in codes.migration_codes(project.root):
            try:
                for diff in model_differences(server.conn, server.url, project.root, package):
                    findings.append({"what": f"code {package}", "finding": f"models differ from migrations: {diff}",
                                     "fix": f"provision revision {package} -m '...' --autogenerate"})
            except Exception as err:  # noqa: BLE001 - reported, then the gate fails
                findings.append({"what": f"code {package}", "finding": one_line(err), "fix": "fix the migration"})
    targets, early = plan_targets(project, [], all_bots=True, admin_url=server.url)
    for o in early:
        if not o.ok:
            findings.append({"what": f"bot {o.bot}", "finding": o.error or o.status, "fix": f"provision add-bot {o.bot}"})
    for t in targets:
        try:
            head = head_of(script_directory(t.root, t.package), t.package)
            current_rev = current_revision(t.conninfo)
        except Exception as err:  # noqa: BLE001
            findings.append({"what": f"bot {t.bot}", "finding": one_line(err), "fix": f"provision current {t.bot}"})
            continue
        if current_rev != head:
            findings.append({"what": f"bot {t.bot}",
                             "finding": f"database at {(current_rev or 'base')[:12]}, code head is {(head or 'base')[:12]}",
                             "fix": f"provision migrate {t.bot}"})
    return findings


def new_bot(project: Project, name: str) -> list[Path]:
    """Scaffold bots/NAME and migrations/NAME with its first revision; never overwrites a file."""
    from .scaffold import new_bot as scaffold

    return scaffold(project.root, name)


# --------------------------------------------------------------------------- the compose stack


def stack_settings(stack: StackSettings, **changes: Any) -> StackSettings:
    """A copy of fleet.toml's [server] with the settings given (None = keep)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("postgres_memory", "bot_memory"):
        if key in changes:
            changes[key] = budgets.canonical_memory(changes[key], "--" + key.replace("_", "-"))
    new = dataclasses.replace(stack, **changes)
    if "pgbouncer" in changes and changes["pgbouncer"] != stack.pgbouncer:
        # Bots reach the database through PgBouncer when it is on (their env files follow on add-bot).
        fro, to = (("postgres", 5432), ("pgbouncer", 6432)) if new.pgbouncer else (("pgbouncer", 6432), ("postgres", 5432))
        if (new.bot_host, new.bot_port) == fro:
            new = dataclasses.replace(new, bot_host=to[0], bot_port=to[1])
    return new


def budget(project: Project, **preview: Any) -> dict[str, budgets.Budget]:
    """Each server's connection and memory budget (``preview``: [server] settings to try
    without saving). A budget that does not fit is returned as it is (``fits`` False).
    Read-only: a folder without fleet.toml is refused (no fleet here)."""
    project.require_fleet()
    fleet = dataclasses.replace(project.fleet, stack=stack_settings(project.fleet.stack, **preview))
    return {name: budgets.server_budget(fleet, name) for name in fleet.server_names()}


def render(project: Project, *, allow_missing_config: bool = False, progress: Progress = _quiet,
           **settings: Any) -> compose.RenderResult:
    """Write the compose stack from fleet.toml; ``settings`` change [server] first. A bot that
    lacks a setting its code requires is refused unless ``allow_missing_config``.

    A refused render changes nothing: the whole stack is planned and checked with the new
    settings (budget, credentials, settings, validation, files botfleet did not write) before
    they are saved in fleet.toml and anything is written."""
    current_fleet = project.fleet
    new = stack_settings(current_fleet.stack, **settings)
    budgets.validate_stack(new)
    preview = dataclasses.replace(current_fleet, stack=new)
    budgets.require_fit(budgets.compute(preview), "the fleet")
    if new != current_fleet.stack:  # else the render below plans and checks it all before writing (once)
        compose.refuse_foreign(project.root, compose.prepare(project, preview, allow_missing_config=allow_missing_config))
        with project.editing() as fleet:
            fleet.stack = new
        progress(f"saved the stack settings in {project.registry.path}")
    result = compose.render(project, allow_missing_config=allow_missing_config)
    published = budgets.parse_publish(project.fleet.stack.publish)
    if published and _answers(*published):
        progress(f"note: {published[0]}:{published[1]} already answers: unless that is this stack's postgres, "
                 "docker compose up will fail to publish it (provision render --publish ADDRESS:PORT, or '' for none)")
    return result


def _answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (a port another server holds)."""
    import socket

    try:
        with socket.create_connection((host.strip("[]"), port), timeout=0.3):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the embedded server


def embedded_server(project: Project):
    from .embedded import EmbeddedServer

    return EmbeddedServer(project.state_dir)


@dataclass
class ServerStarted:
    """``provision server start``: the server now, the port it left (when ``--port`` moved it)
    and the registry bots whose DATABASE_URL still names that old port (``--db-port``)."""

    status: Any
    moved_from: int | None = None
    repoint: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.status.as_dict(), "moved_from": self.moved_from, "repoint": self.repoint}


def server_start(project: Project, port: int | None = None) -> ServerStarted:
    """Start the embedded server on the fleet's recorded port (refused, not moved, when something
    else holds it), or move it to ``port``, naming the bots whose env files pin the old one."""
    server = embedded_server(project)
    before = server.status().port
    status = server.start(port)
    from .archive import keep_receiving

    keep_receiving(project)
    if before is None or status.port == before:
        return ServerStarted(status)
    pinned = sorted(name for name, entry in project.fleet.bots.items() if entry.db_port == before)
    return ServerStarted(status, before, pinned)


# --------------------------------------------------------------------------- a bot's own settings: config

from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from .settings import Changed


def _settings_bot(project: Project, bot: str) -> None:
    """A valid bot name that fleet.toml has (InvalidInput, exit 2, before anything is read)."""
    validate(bot)
    if bot not in project.fleet.bots:
        raise InvalidInput(f"not in the fleet registry: {bot} (see provision list; provision add-bot {bot})")


def missing_settings(project: Project) -> dict[str, list[str]]:
    """Each registry bot's required settings (its code's ``REQUIRED_SETTINGS``) that are not
    set, or set empty, in its env file; bots that lack none are left out. Reads files only."""
    from . import settings

    out: dict[str, list[str]] = {}
    for bot in sorted(project.fleet.bots):
        missing = settings.missing(project, bot)
        if missing:
            out[bot] = missing
    return out


def _settings_changed(project: Project, result: Changed, progress: Progress) -> Changed:
    """After a change of a bot's settings: what its code still needs, and the stack re-rendered."""
    from . import settings

    result.missing = settings.missing(project, result.bot)
    if result.changed:
        progress(f"wrote {result.env_file}")
        warning = compose.rerender_if_present(project)
        if warning:
            progress(warning)
    return result


def config_set(project: Project, bot: str, values: dict[str, str], *, progress: Progress = _quiet) -> Changed:
    """Set a bot's own settings (``{"BOT_TOKEN": "..."}``) in its env file ``secrets/BOT.env``
    (0600, atomically, under a lock); never in fleet.toml or a compose file. Keys are
    ``[A-Z_][A-Z0-9_]*``, not botfleet's own (``DATABASE_URL*``, ``DB_POOL_*``); values are one
    line (see provisioning.envfile's quoting rule). Bad input raises InvalidInput and changes
    nothing. Returns ``settings.Changed`` (keys only, never a value)."""
    from . import settings

    _settings_bot(project, bot)
    values = settings.check_values(values)
    return _settings_changed(project, settings.set_values(project, bot, values), progress)


def config_unset(project: Project, bot: str, keys: list[str], *, progress: Progress = _quiet) -> Changed:
    """Remove settings from a bot's env file; a key that is not set is reported unchanged."""
    from . import settings

    _settings_bot(project, bot)
    for key in keys:
        settings.check_key(key)
    return _settings_changed(project, settings.unset(project, bot, keys), progress)


@dataclass
class ConfigListing:
    """A bot's own settings (the values stay out of repr; ``as_dict`` masks them unless ``show``)."""

    bot: str
    code: str
    env_file: str
    values: dict[str, str] = field(repr=False)
    required: list[str]
    missing: list[str]

    def as_dict(self, show: bool = False) -> dict[str, Any]:
        from .settings import MASK

        return {"bot": self.bot, "code": self.code, "env_file": self.env_file,
                "settings": {k: (v if show else MASK) for k, v in self.values.items()},
                "required": self.required, "missing": self.missing}


def config_list(project: Project, bot: str) -> ConfigListing:
    """A bot's own settings, and the required ones (its code's REQUIRED_SETTINGS) not set."""
    from . import settings

    _settings_bot(project, bot)
    values = settings.read(project, bot)
    code = project.fleet.bots[bot].code  # its one spelling (hello-bot), whatever its package is called
    required, missing = codes.required_settings(project.root, code), settings.missing(project, bot, values)
    return ConfigListing(bot, code, str(project.env_path(bot)), values, list(required), missing)


# --------------------------------------------------------------------------- top, metrics

# The figures are ``monitor``'s (a leaf reading the statistics views), the servers kept open and
# sampled by the ``watch`` service; here so that every command stays one function of this module.
from . import exporter  # noqa: E402
from .watch import DEFAULT_INTERVAL, Frame, Scrape, Watch, check_interval  # noqa: E402,F401


def watch(project: Project, servers: Servers, bots: list[str], *, server: str | None = None,
          queries: bool = False, monitor_url: str | None = None) -> Watch:
    """The servers of ``bots`` (every bot when empty; only ``server``'s with it) watched for
    `provision top`: a context manager whose ``frames(interval)`` yields each refresh. The bots
    and servers are checked (InvalidInput, before any server is touched); a server that does not
    answer is reported in each frame's ``unreachable``. ``monitor_url``: the default server read
    as the monitoring role (the stack's exporter; monitoring.py), not as its admin."""
    return Watch(project, servers, bots, server=server, queries=queries, monitor_url=monitor_url)


def metrics(project: Project, servers: Servers, bots: list[str], *, server: str | None = None,
            monitor_url: str | None = None) -> Scrape:
    """Every watched bot's figures once, in Prometheus's text exposition format."""
    with Watch(project, servers, bots, server=server, monitor_url=monitor_url) as watching:
        return watching.scrape()


def serve_metrics(project: Project, servers: Servers, bots: list[str], listen: str, *, server: str | None = None,
                  monitor_url: str | None = None, ready: Progress = _quiet) -> None:
    """Serve the figures at http://LISTEN/metrics, sampled anew for each scrape, until interrupted.
    ``listen`` and the bots are checked before any server is touched (InvalidInput)."""
    host, port = exporter.parse_listen(listen)
    with Watch(project, servers, bots, server=server, monitor_url=monitor_url) as watching:
        exporter.serve(host, port, lambda: watching.scrape().text, ready=ready)


# --------------------------------------------------------------------------- one bot from the shell: info, env, run, psql

# The verbs live in the ``access`` service (how the host reaches a bot); here so that every
# command stays one function of this module.
from .access import BotEnvironment, BotInfo  # noqa: E402,F401
from .access import environment as bot_env  # noqa: E402,F401
from .access import info as bot_info  # noqa: E402,F401
from .access import psql as bot_psql  # noqa: E402,F401
from .access import run as bot_run  # noqa: E402,F401
from .access import stored_url as bot_url  # noqa: E402,F401


# --------------------------------------------------------------------------- storage quota


def quota(project: Project, servers: Servers, bots: list[str] | None = None, *, enforce: bool = False,
          progress: Progress = _quiet) -> list[QuotaState]:
    """Each bot's database size against its quota (``max_size``, else [defaults]'s); the named
    bots, or every registry bot. With ``enforce`` (``provision quota enforce``) a bot over its
    quota is suspended (NOLOGIN, its sessions ended, recorded so the reconcile keeps it) and a
    suspended one under it again is lifted. See quota.py for why this is what holds. A folder
    without fleet.toml is refused (no fleet here)."""
    project.require_fleet()
    names = chosen_bots(project, bots, all_bots=False) if bots else sorted(project.fleet.bots)
    fleet = project.fleet
    states: list[QuotaState] = []
    with servers.visit(servers.of(names)) as opened:
        for server in opened:
            assert server.conn is not None
            mine = [fleet.bots[n] for n in names if fleet.bots[n].server == server.name]
            states += quotas.on_server(server.conn, server.name,
                                       [(e.name, e.role, e.database, fleet.max_size(e)) for e in mine], enforce=enforce)
    for state in states:
        if state.action:
            progress(f"{state.bot}: {state.action}" + (f" ({state.sessions_ended} sessions ended)"
                                                       if state.sessions_ended else ""))
    return sorted(states, key=lambda s: s.bot)


from .quota import QuotaState  # noqa: E402,F401
