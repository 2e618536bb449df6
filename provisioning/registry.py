"""The fleet registry: ``fleet.toml`` in the project, one table per bot, no secrets.

Hand-editable; every write re-reads the file under a lock so concurrent
provision runs never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .errors import InvalidInput
from .files import atomic_write, file_lock

HEADER = (
    "# botfleet fleet registry: one [bots.<name>] table per bot.\n"
    "# Written by `provision`; safe to edit by hand. It never holds a secret.\n\n"
)

# Connections kept free in each bot's role limit for `provision migrate`.
MIGRATION_MARGIN = 1

DEFAULT_POOL_SIZE = 2
DEFAULT_MAX_OVERFLOW = 3
DEFAULT_STATEMENT_TIMEOUT = "30s"
DEFAULT_IDLE_TIMEOUT = "60s"


@dataclass
class ServerSettings:
    """How bots reach the shared server (the compose service, by default)."""

    bot_host: str = "postgres"
    bot_port: int = 5432
    # The compose stack (`provision render`, `provision budget`; see provisioning/budget.py).
    postgres_major: int = 17  # the official postgres image's major version, pinned
    postgres_memory: str = "512M"  # the postgres container's memory limit; tuning derives from it
    max_connections: int = 0  # 0: as many as the memory limit affords
    bot_memory: str = "128M"  # each bot container's memory limit
    publish: str = "127.0.0.1:5432"  # host address:port for the admin ("" = not published)
    pgbouncer: bool = False  # bots connect through a PgBouncer in transaction mode
    pgbouncer_pool_size: int = 2  # server connections PgBouncer keeps per bot
    pgbouncer_image: str = "edoburu/pgbouncer:v1.24.1-p1"  # needs PgBouncer >= 1.21
    bot_image: str = "botfleet-bot:latest"  # built from the repo's Dockerfile


DEFAULT_SERVER = "default"
SERVER_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")


@dataclass
class ExtraServer:
    """A further PostgreSQL server the fleet places bots on: ``[servers.NAME]``.

    The default server (no name) is ``--admin-url`` / ``ADMIN_DATABASE_URL`` /
    the embedded one, and the compose stack's postgres; these are servers
    botfleet does not run, each with its own admin URL and connection budget.
    """

    admin_url: str  # without a password: PGPASSWORD, ~/.pgpass or ?passfile=... hold it
    bot_host: str = ""  # the host in its bots' DATABASE_URL; "" = admin_url's host
    bot_port: int = 0  # 0 = admin_url's port
    max_connections: int = 100  # its max_connections: the budget its bots must fit in
    superuser_reserved_connections: int = 3

    def endpoint(self) -> tuple[str, int]:
        from .db import parse_url

        params = parse_url(self.admin_url)
        host = self.bot_host or params.get("host") or "127.0.0.1"
        if host.startswith("/"):  # a socket directory is no address for a bot
            host = "127.0.0.1"
        return host, self.bot_port or int(params.get("port") or 5432)


@dataclass
class BotEntry:
    name: str
    code: str
    database: str
    role: str
    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    replicas: int = 1
    statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT
    idle_in_transaction_session_timeout: str = DEFAULT_IDLE_TIMEOUT
    env_file: str = ""
    db_host: str = ""  # how this bot reaches the server; "" = the fleet's [server] bot_host
    db_port: int = 0
    server: str = ""  # the [servers.NAME] it lives on; "" = the default server

    @property
    def pool_max(self) -> int:
        """Connections one replica's pool may open."""
        return self.pool_size + self.max_overflow

    @property
    def connection_limit(self) -> int:
        """The role's CONNECTION LIMIT: every replica's full pool plus the migration margin."""
        return self.pool_max * self.replicas + MIGRATION_MARGIN

    def to_toml(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        if not data["server"]:
            data.pop("server")  # a one-server fleet's file stays as it always was
        data["connection_limit"] = self.connection_limit  # informative; derived on load
        return data


# Field annotations are strings here (from __future__ import annotations).
_TYPES: dict[str, type] = {"int": int, "str": str, "bool": bool}
_TYPE_WORDS = {int: "a whole number", str: "a string", bool: "true or false"}


@dataclass
class Fleet:
    server: ServerSettings
    bots: dict[str, BotEntry]
    servers: dict[str, ExtraServer] = field(default_factory=dict)

    def server_of(self, entry: BotEntry) -> str:
        return entry.server or DEFAULT_SERVER

    def server_names(self) -> list[str]:
        return [DEFAULT_SERVER, *sorted(self.servers)]

    def on(self, server: str) -> dict[str, BotEntry]:
        """The bots placed on ``server`` (a name, or DEFAULT_SERVER)."""
        return {n: e for n, e in self.bots.items() if self.server_of(e) == server}

    def endpoint(self, entry: BotEntry) -> tuple[str, int]:
        """Where the bot's DATABASE_URL points: its own override, else its server's."""
        if entry.server and entry.server in self.servers:
            host, port = self.servers[entry.server].endpoint()
        else:
            host, port = self.server.bot_host, self.server.bot_port
        return entry.db_host or host, entry.db_port or port


class Registry:
    """Read and update ``fleet.toml`` under ``project``."""

    def __init__(self, project: Path):
        self.path = project / "fleet.toml"
        self._lock_path = project / ".botfleet" / "registry.lock"

    def load(self) -> Fleet:
        if not self.path.exists():
            return Fleet(ServerSettings(), {})
        try:
            data = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise InvalidInput(f"{self.path} is not valid TOML: {err}") from None
        unknown = set(data) - {"version", "server", "servers", "bots"}
        if unknown:
            raise InvalidInput(f"{self.path}: unknown table or key {', '.join(sorted(unknown))}")
        server = ServerSettings(**self._checked(ServerSettings, data.get("server", {}), "[server]"))
        bots = {}
        for name, raw in data.get("bots", {}).items():
            if not isinstance(raw, dict):
                raise InvalidInput(f"{self.path}: bots.{name} must be a table")
            values = self._checked(BotEntry, raw, f"[bots.{name}]", derived=("connection_limit",))
            # A bot added by hand needs only its table: the rest derives from its name
            # (names.validate checks the name itself before anything uses it).
            stem = name.replace("-", "_")
            values.setdefault("code", name)
            values.setdefault("database", f"{stem}_db")
            values.setdefault("role", f"{stem}_user")
            values.setdefault("env_file", f"secrets/{name}.env")
            bots[name] = BotEntry(name=name, **values)
        servers = {}
        raw_servers = data.get("servers", {})
        if not isinstance(raw_servers, dict):
            raise InvalidInput(f"{self.path}: servers must be a table of [servers.NAME] tables")
        for name, raw in raw_servers.items():
            where = f"[servers.{name}]"
            if SERVER_NAME_RE.fullmatch(name) is None or name == DEFAULT_SERVER:
                raise InvalidInput(f"{self.path}: {where}: a server name is 1-40 of a-z 0-9 '-' starting with a "
                                   f"letter, and not {DEFAULT_SERVER!r}")
            values = self._checked(ExtraServer, raw, where)
            if "admin_url" not in values:
                raise InvalidInput(f"{self.path}: {where} needs admin_url")
            from .db import parse_url

            if parse_url(values["admin_url"]).get("password"):
                raise InvalidInput(f"{self.path}: {where} admin_url must not contain a password (fleet.toml is "
                                   "committed): use PGPASSWORD, ~/.pgpass or ?passfile=PATH")
            extra = ExtraServer(**values)
            from .budget import MAX_CONNECTIONS, MIN_CONNECTIONS  # budget imports this module

            if not (MIN_CONNECTIONS <= extra.max_connections <= MAX_CONNECTIONS
                    and 0 <= extra.superuser_reserved_connections < extra.max_connections):
                raise InvalidInput(f"{self.path}: {where} max_connections must be {MIN_CONNECTIONS}-{MAX_CONNECTIONS} "
                                   "and superuser_reserved_connections below it")
            if not 0 <= extra.bot_port <= 65535:
                raise InvalidInput(f"{self.path}: {where} bot_port must be 1-65535 (0: admin_url's port)")
            servers[name] = extra
        for name, entry in bots.items():
            if entry.server and entry.server not in servers:
                raise InvalidInput(f"{self.path}: [bots.{name}] server {entry.server!r} is not a [servers.NAME] table")
        return Fleet(server, bots, servers)

    def _checked(self, cls: type, raw: Any, where: str, derived: tuple[str, ...] = ()) -> dict[str, Any]:
        """``raw``'s keys and value types checked against ``cls``'s fields: a typo in a
        hand-edited file is an error, never silently ignored."""
        if not isinstance(raw, dict):
            raise InvalidInput(f"{self.path}: {where} must be a table")
        types = {f.name: _TYPES[f.type] for f in fields(cls) if f.name != "name"}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in derived:
                continue
            if key not in types:
                raise InvalidInput(f"{self.path}: {where} has an unknown key {key!r} "
                                   f"(known: {', '.join(sorted(types))})")
            want = types[key]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise InvalidInput(f"{self.path}: {where} {key} must be {_TYPE_WORDS[want]}, not {value!r}")
            out[key] = value
        return out

    def _dump(self, fleet: Fleet) -> str:
        data: dict[str, Any] = {"version": 1, "server": asdict(fleet.server)}
        if fleet.servers:
            data["servers"] = {name: asdict(fleet.servers[name]) for name in sorted(fleet.servers)}
        data["bots"] = {name: fleet.bots[name].to_toml() for name in sorted(fleet.bots)}
        return HEADER + tomli_w.dumps(data)

    @contextlib.contextmanager
    def editing(self) -> Iterator[Fleet]:
        """Load under an exclusive lock, let the block change it, write it back atomically."""
        with file_lock(self._lock_path):
            fleet = self.load()
            before = copy.deepcopy(fleet)
            yield fleet
            if fleet != before:
                atomic_write(self.path, self._dump(fleet))
