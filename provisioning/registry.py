"""The fleet registry: ``fleet.toml`` in the project, one table per bot, no secrets.

Hand-editable; every write re-reads the file under a lock so concurrent
provision runs never lose each other's entries.

Loading is the ONE validation every command goes through: a bot name, a value
of the wrong type or out of range, an unknown key or a server that is not
declared is refused here, in one line, before any command touches anything.
A bot's database, role and env file derive from its name (``names.derive``)
and are not stored; older files that spell them out are still read, as long as
they say what the name derives.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .errors import InvalidInput
from .files import atomic_write, file_lock
from .names import CODE_RE, canonical_code, derive, validate

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

# The bounds of a server's max_connections (the stack's and a [servers.NAME]'s).
MIN_CONNECTIONS = 20
MAX_CONNECTIONS = 5000
MAX_POOL = 1000
MAX_REPLICAS = 100
TIMEOUT_RE = re.compile(r"(\d{1,9})(ms|s|min|h)?")
# A role's timeout settings are int milliseconds on the server: at most 2^31 - 1 ms (about 24 days).
TIMEOUT_UNIT_MS = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000}
MAX_TIMEOUT_MS = 2**31 - 1
HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")

# The per-bot guards beyond the two timeouts: role settings, each "" = the fleet's [defaults]
# value, and "" there = not set on the role (the server's own default rules). Only
# temp_file_limit is PGC_SUSET (set by a superuser, and then the bot cannot lift it); the bot
# may SET the others in its own session: they are defaults that bound a bot's mistakes.
GUARDS = ("temp_file_limit", "work_mem", "lock_timeout", "idle_session_timeout")
SIZE_GUARDS = ("temp_file_limit", "work_mem")
TIMEOUT_GUARDS = ("statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout", "idle_session_timeout")
# A size as PostgreSQL spells one (its units, case and all): a memory setting's value on the server.
SIZE_RE = re.compile(r"(\d{1,13})(kB|MB|GB|TB)")
SIZE_UNIT_KB = {"kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}
MAX_SETTING_KB = 2**31 - 1  # a memory setting is an int of kB on the server
MIN_WORK_MEM_KB = 64
NO_QUOTA = "none"  # max_size of a bot that has no quota, whatever [defaults] says

DEFAULT_SERVER = "default"
SERVER_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")


@dataclass
class StackSettings:
    """The compose stack's settings (``[server]`` in fleet.toml): how bots reach the
    stack's postgres, and how that postgres and the bot containers are sized."""

    bot_host: str = "postgres"
    bot_port: int = 5432
    project_name: str = "botfleet"  # the compose project (and so its volume's) name, whatever the folder is called
    postgres_major: int = 17  # the official postgres image's major version, pinned
    postgres_memory: str = "512M"  # the postgres container's memory limit; tuning derives from it
    max_connections: int = 0  # 0: as many as the memory limit affords
    # The memory budget's two assumptions (provision budget): the percent of the connections that
    # run a query (a sort or hash: work_mem) at the same moment, and the percent of the memory kept free.
    active_percent: int = 10
    headroom_percent: int = 10
    bot_memory: str = ""  # each bot container's memory limit; "" = its code's measured default
    bot_cpus: str = "0.5"  # each bot container's CPU limit (cores)
    # host address:port where the admin reaches the stack's postgres ("" = not published); not
    # 5432, where a PostgreSQL already running on the host usually listens
    publish: str = "127.0.0.1:15432"
    pgbouncer: bool = False  # bots connect through a PgBouncer in transaction mode
    pgbouncer_pool_size: int = 1  # server connections PgBouncer keeps per bot (transaction pooling)
    pgbouncer_image: str = "edoburu/pgbouncer:v1.25.2-p0"  # needs PgBouncer >= 1.24 (max_user_client_connections)
    bot_image: str = "botfleet-bot:latest"  # built from the repo's Dockerfile
    # `provision metrics` as a service of the stack (a monitoring role of its own, pg_monitor's rights)
    exporter: bool = False
    exporter_publish: str = "127.0.0.1:9187"  # host address:port of its /metrics ("" = the stack's networks only)
    # a Barman service in the stack: WAL streamed to its own volume, base backups every [backup] base_every
    archive: bool = False


@dataclass
class BackupSettings:
    """Backups of the fleet (``[backup]`` in fleet.toml): the continuous archive's retention
    (barman's retention_policy), whether commits wait for the archive, and the scheduled
    per-bot dumps of ``provision backup --all --prune``."""

    retention: str = "7 days"  # a recovery window ("7 days", "2 weeks"); "" with keep = N instead
    keep: int = 0  # keep N base backups (barman's REDUNDANCY N); 0 = the window rules
    synchronous: bool = False  # zero data loss: a commit returns once the archive has its WAL
    dump_every: str = "1 day"  # backup --all --prune dumps a bot whose newest dump is older
    dump_keep: int = 7  # ... and then keeps its N newest dumps
    base_every: str = "1 day"  # the stack's archive service takes a base backup when the newest is older
    # the most WAL the server keeps for an archive that stopped reading it (max_slot_wal_keep_size):
    # past it the archive breaks (doctor says so) instead of the server's disk filling up
    max_wal_kept: str = "4GB"


RETENTION_RE = re.compile(r"([1-9][0-9]{0,3}) ?(day|week|month)s?")


def backup_problem(settings: BackupSettings) -> str | None:
    """Why ``[backup]`` cannot be used (None: it can), in one line."""
    for key in ("retention", "dump_every", "base_every"):
        value = getattr(settings, key)
        if value and RETENTION_RE.fullmatch(value.strip()) is None:
            return f"{key} must look like \"7 days\", \"2 weeks\" or \"1 month\" (got {value!r})"
    if not settings.retention and settings.keep < 1:
        return "give retention (e.g. \"7 days\") or keep = N base backups"
    if not SIZE_RE.fullmatch(settings.max_wal_kept.strip()):
        return f"max_wal_kept must be a size such as \"4GB\" (kB, MB, GB or TB; got {settings.max_wal_kept!r})"
    if settings.keep < 0 or settings.dump_keep < 1:
        return "keep must be 0 or more and dump_keep at least 1"
    return None


@dataclass
class Defaults:
    """The fleet's default guards (``[defaults]`` in fleet.toml), for every bot that does not set
    its own. "" = none: the server's own default rules (and no storage quota)."""

    temp_file_limit: str = ""  # e.g. "1GB": temp files one session may hold (-1: unlimited)
    work_mem: str = ""  # e.g. "4MB": memory per sort or hash before it spills to temp files
    lock_timeout: str = ""  # e.g. "5s": the longest wait for a lock
    idle_session_timeout: str = ""  # e.g. "1h": an idle session is ended (PostgreSQL 14+)
    max_size: str = ""  # e.g. "2GB": the database's storage quota (provision quota)


def size_bytes(value: str) -> int | None:
    """A size such as "2GB" in bytes; None for "" or "none" (no quota) or a malformed one."""
    match = SIZE_RE.fullmatch(value)
    return int(match.group(1)) * SIZE_UNIT_KB[match.group(2)] * 1024 if match else None


@dataclass
class ServerEntry:
    """A further PostgreSQL server the fleet places bots on: ``[servers.NAME]``.

    The default server is ``--admin-url`` / ``ADMIN_DATABASE_URL`` / the embedded
    one, and the compose stack's postgres; these are servers botfleet does not
    run, each with its own admin URL and connection budget.
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
    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    replicas: int = 1
    statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT
    idle_in_transaction_session_timeout: str = DEFAULT_IDLE_TIMEOUT
    # How the host reaches the bot's server, in its env file only (a bot run on the host for
    # development); "" / 0 = its server's endpoint. The compose stack ignores them.
    db_host: str = ""
    db_port: int = 0
    server: str = DEFAULT_SERVER  # DEFAULT_SERVER or a [servers.NAME]
    publish: str = ""  # ADDRESS:PORT on the host for the bot's HTTP port 8000 ("" = not published)
    memory: str = ""  # its container's memory limit; "" = [server] bot_memory, else its code's default
    cpus: str = ""  # its container's CPU limit; "" = [server] bot_cpus
    # Guards and quota ("" = [defaults]'s; see GUARDS): role settings, and the database's quota.
    temp_file_limit: str = ""
    work_mem: str = ""
    lock_timeout: str = ""
    idle_session_timeout: str = ""
    max_size: str = ""  # "2GB"; NO_QUOTA: none, whatever [defaults] says

    @property
    def database(self) -> str:
        return derive(self.name).database

    @property
    def role(self) -> str:
        return derive(self.name).role

    @property
    def env_file(self) -> str:
        """The bot's credentials file, relative to the project."""
        return f"secrets/{self.name}.env"

    @property
    def pool_max(self) -> int:
        """Connections one replica's pool may open."""
        return self.pool_size + self.max_overflow

    @property
    def connection_limit(self) -> int:
        """The role's CONNECTION LIMIT: every replica's full pool plus the migration margin."""
        return self.pool_max * self.replicas + MIGRATION_MARGIN

    def to_toml(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # asdict's, without its deep copy:
        # every field is a str or an int
        data.pop("name")
        if data["server"] == DEFAULT_SERVER:
            data.pop("server")  # a one-server fleet's file stays as it always was
        for key in ("publish", "memory", "cpus", *GUARDS, "max_size"):
            if not data[key]:
                data.pop(key)  # unset: the defaults apply
        return data


# The registry keys of a bot's settings, with add-bot's flag for each: one rule, two spellings.
OPTION_FLAGS = {"pool_size": "--pool-size", "max_overflow": "--max-overflow", "replicas": "--replicas",
                "statement_timeout": "--statement-timeout", "idle_in_transaction_session_timeout": "--idle-timeout",
                "db_host": "--db-host", "db_port": "--db-port", "publish": "--publish", "memory": "--memory",
                "cpus": "--cpus", "temp_file_limit": "--temp-file-limit", "work_mem": "--work-mem",
                "lock_timeout": "--lock-timeout", "idle_session_timeout": "--idle-session-timeout",
                "max_size": "--max-size"}
MEMORY_RE = re.compile(r"([1-9][0-9]{0,6})([MG])")
CPUS_RE = re.compile(r"(0\.[0-9]{1,2}|[1-9][0-9]?(\.[0-9]{1,2})?)")


def option_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for a bot's setting ``key`` (None: it is), in words
    that start with the setting's name as the caller spells it (``{key}``)."""
    if value is None:
        return None
    if key == "pool_size" and not 1 <= value <= MAX_POOL:
        return f"{{key}} must be between 1 and {MAX_POOL}"
    if key == "max_overflow" and not 0 <= value <= MAX_POOL:
        return f"{{key}} must be between 0 and {MAX_POOL}"
    if key == "replicas" and not 1 <= value <= MAX_REPLICAS:
        return f"{{key}} must be between 1 and {MAX_REPLICAS}"
    if key in GUARDS[2:] and value == "":
        return None  # the fleet's default
    if key in SIZE_GUARDS or key == "max_size":
        return _size_problem(key, value)
    if key in TIMEOUT_GUARDS:
        match = TIMEOUT_RE.fullmatch(value)
        if match is None:
            return f"{{key}} must look like 30s, 500ms, 5min or 1h (got {value!r})"
        if int(match.group(1)) * TIMEOUT_UNIT_MS[match.group(2) or "ms"] > MAX_TIMEOUT_MS:
            return f"{{key}} {value!r} is longer than PostgreSQL allows (about 24 days; 0 turns it off)"
    if key == "db_port" and not 0 <= value <= 65535:
        return "{key} must be between 1 and 65535"
    if key == "db_host" and value != "" and HOST_RE.fullmatch(value) is None:
        return f"{{key}} {value!r} is not a host name"
    if key == "publish" and value != "" and publish_address(value) is None:
        return f"{{key}} must be PORT or ADDRESS:PORT such as 127.0.0.1:8081 (got {value!r})"
    if key == "memory" and value != "" and MEMORY_RE.fullmatch(value.upper()) is None:
        return f"{{key}} must look like 256M or 1G (got {value!r})"
    if key == "cpus" and value != "" and CPUS_RE.fullmatch(value) is None:
        return f"{{key}} must be a number of cores such as 0.5 or 2 (got {value!r})"
    return None


def _size_problem(key: str, value: str) -> str | None:
    """A guard's or a quota's size: PostgreSQL's spelling (64MB, 1GB, 512kB), in its range."""
    if value == "" or (key == "temp_file_limit" and value == "-1") or (key == "max_size" and value == NO_QUOTA):
        return None
    extra = {"temp_file_limit": ", or -1 for no limit", "max_size": f", or {NO_QUOTA!r} for no quota"}.get(key, "")
    match = SIZE_RE.fullmatch(value)
    if match is None:
        return f"{{key}} must look like 64MB, 1GB or 512kB (PostgreSQL's units kB, MB, GB, TB){extra} (got {value!r})"
    kb = int(match.group(1)) * SIZE_UNIT_KB[match.group(2)]
    if key == "work_mem" and not MIN_WORK_MEM_KB <= kb <= MAX_SETTING_KB:
        return f"{{key}} {value!r} is out of PostgreSQL's range (64kB to 2147483647kB)"
    if key == "temp_file_limit" and kb > MAX_SETTING_KB:
        return f"{{key}} {value!r} is more than PostgreSQL allows (2147483647kB; -1 for no limit)"
    if key == "max_size" and kb == 0:
        return f"{{key}} must be more than 0 ({NO_QUOTA!r} for no quota)"
    return None


def publish_address(value: str) -> tuple[str, int] | None:
    """``PORT`` (on the loopback) or ``ADDRESS:PORT`` (IPv6 in brackets) as (address, port); None
    when it is neither."""
    import ipaddress

    host, sep, port = value.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        return None
    return (host, number) if 1 <= number <= 65535 else None


def check_options(values: dict[str, Any], *, flags: bool) -> None:
    """Raise InvalidInput (exit 2) for the first bad setting, named by its add-bot flag
    (``flags``) or its registry key."""
    for key, value in values.items():
        problem = option_problem(key, value)
        if problem is not None:
            raise InvalidInput(problem.format(key=OPTION_FLAGS[key] if flags else key))


# Field annotations are strings here (from __future__ import annotations).
_TYPES: dict[str, type] = {"int": int, "str": str, "bool": bool}
_TYPE_WORDS = {int: "a whole number", str: "a string", bool: "true or false"}
# Derived values that older files store: read (they must agree with the name), never written.
_DERIVED = ("database", "role", "env_file", "connection_limit")


@dataclass
class Fleet:
    stack: StackSettings
    bots: dict[str, BotEntry]
    servers: dict[str, ServerEntry] = field(default_factory=dict)
    defaults: Defaults = field(default_factory=Defaults)
    backup: BackupSettings = field(default_factory=BackupSettings)

    def guards(self, entry: BotEntry) -> dict[str, str]:
        """The bot's guards as its role gets them: its own value, else [defaults]'s; unset ones left out."""
        chosen = {key: getattr(entry, key) or getattr(self.defaults, key) for key in GUARDS}
        return {key: value for key, value in chosen.items() if value}

    def max_size(self, entry: BotEntry) -> int | None:
        """The bot's storage quota in bytes (its own max_size, else [defaults]'s); None: no quota."""
        return size_bytes(entry.max_size or self.defaults.max_size)

    def server_names(self) -> list[str]:
        return [DEFAULT_SERVER, *sorted(self.servers)]

    def on(self, server: str) -> dict[str, BotEntry]:
        """The bots placed on ``server`` (a name, or DEFAULT_SERVER)."""
        return {n: e for n, e in self.bots.items() if e.server == server}

    def only(self, server: str) -> Fleet:
        """The same fleet with only the bots placed on ``server``."""
        return Fleet(self.stack, self.on(server), self.servers, self.defaults, self.backup)

    def server_endpoint(self, entry: BotEntry) -> tuple[str, int]:
        """Where bots reach the bot's server: its [servers.NAME]'s bot_host/bot_port, else
        [server]'s (the stack's postgres). Which server a bot uses is its ``server``, nothing else."""
        if entry.server in self.servers:
            return self.servers[entry.server].endpoint()
        return self.stack.bot_host, self.stack.bot_port

    def endpoint(self, entry: BotEntry) -> tuple[str, int]:
        """Where the DATABASE_URL of the bot's env file (secrets/NAME.env, read on the host)
        points: its db_host/db_port, else its server's endpoint. The rendered stack does not
        follow db_host/db_port (compose.prepare): they say how the host reaches the server, not
        where the bot runs."""
        host, port = self.server_endpoint(entry)
        return entry.db_host or host, entry.db_port or port


def _copy(fleet: Fleet) -> Fleet:
    """A copy of ``fleet`` that shares nothing a caller may change (every field of its entries
    is a str, an int or a bool)."""
    return Fleet(copy.copy(fleet.stack), {k: copy.copy(v) for k, v in fleet.bots.items()},
                 {k: copy.copy(v) for k, v in fleet.servers.items()}, copy.copy(fleet.defaults),
                 copy.copy(fleet.backup))


# fleet.toml's path -> (its text, the fleet it parsed to), the last one this process read.
_LOADED: dict[str, tuple[str, Fleet]] = {}


class Registry:
    """Read and update ``fleet.toml`` under ``project``."""

    def __init__(self, project: Path):
        self.path = project / "fleet.toml"
        self._lock_path = project / ".botfleet" / "registry.lock"
        self._cache_path = project / ".botfleet" / "fleet-toml.json"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Fleet:
        if not self.path.exists():
            return Fleet(StackSettings(), {})
        text = self.path.read_text(encoding="utf-8")
        # The same text parses to the same fleet: a command that reads fleet.toml, then re-reads
        # it under the lock to change it, parses (and checks every bot of) it once.
        key = str(self.path.resolve())
        cached = _LOADED.get(key)
        if cached is not None and cached[0] == text:
            return _copy(cached[1])
        fleet = self._parse(text)
        _LOADED[key] = (text, _copy(fleet))
        return fleet

    def _toml(self, text: str) -> dict[str, Any]:
        """``text`` parsed as TOML; the result is kept in .botfleet/ (with the text's digest) for
        the next command, since tomllib, pure Python, costs 0.05 s at 1,000 bots: what is read
        from there is only the same text's own parse, and every check of it runs again."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        cache = self._cache_path
        try:
            kept = json.loads(cache.read_bytes())
            if isinstance(kept, dict) and kept.get("sha256") == digest and isinstance(kept.get("toml"), dict):
                return kept["toml"]
        except (OSError, ValueError):
            pass
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise InvalidInput(f"{self.path} is not valid TOML: {err}") from None
        self._remember(digest, data)
        return data

    def _remember(self, digest: str, data: dict[str, Any]) -> None:
        """Keep ``data``, the parse of the text whose digest is ``digest``, for :meth:`_toml`."""
        if not self._cache_path.parent.is_dir():
            return  # no .botfleet/ yet: not made for a cache
        with contextlib.suppress(OSError, TypeError, ValueError):  # TypeError: a date, say (not JSON)
            kept_text = json.dumps({"sha256": digest, "toml": data}, separators=(",", ":"))
            if json.loads(kept_text)["toml"] == data:  # JSON gives back exactly this parse
                atomic_write(self._cache_path, kept_text + "\n")

    def _parse(self, text: str) -> Fleet:
        data = self._toml(text)
        unknown = set(data) - {"version", "server", "servers", "bots", "defaults", "backup"}
        if unknown:
            raise InvalidInput(f"{self.path}: unknown table or key {', '.join(sorted(unknown))}")
        stack = StackSettings(**self._checked(StackSettings, data.get("server", {}), "[server]"))
        servers = self._servers(data.get("servers", {}))
        defaults = Defaults(**self._checked(Defaults, data.get("defaults", {}), "[defaults]"))
        try:
            check_options(asdict(defaults), flags=False)
        except InvalidInput as err:
            raise InvalidInput(f"{self.path}: [defaults] {err}") from None
        backup = BackupSettings(**self._checked(BackupSettings, data.get("backup", {}), "[backup]"))
        problem = backup_problem(backup)
        if problem:
            raise InvalidInput(f"{self.path}: [backup] {problem}")
        raw_bots = data.get("bots", {})
        if not isinstance(raw_bots, dict):
            raise InvalidInput(f"{self.path}: bots must be a table of [bots.NAME] tables")
        bots = {name: self._bot(name, raw, servers) for name, raw in raw_bots.items()}
        return Fleet(stack, bots, servers, defaults, backup)

    def _bot(self, name: str, raw: Any, servers: dict[str, ServerEntry]) -> BotEntry:
        where = f"[bots.{name}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{self.path}: bots.{name} must be a table")
        try:
            names = validate(name)
        except InvalidInput as err:
            raise InvalidInput(f"{self.path}: {err}") from None
        values = self._checked(BotEntry, raw, where, derived=_DERIVED)
        stored = {k: raw[k] for k in ("database", "role") if k in raw}
        if any(stored.get(k, want) != want for k, want in (("database", names.database), ("role", names.role))):
            raise InvalidInput(f"{self.path}: {where} database and role must be {names.database} and {names.role} "
                               "(botfleet derives them from the name; rename a bot by adding a new one)")
        if raw.get("env_file", f"secrets/{name}.env") != f"secrets/{name}.env":
            raise InvalidInput(f"{self.path}: {where} env_file must be secrets/{name}.env (derived from the name)")
        values.setdefault("code", name)
        if CODE_RE.fullmatch(values["code"]) is None:
            raise InvalidInput(f"{self.path}: {where} code {values['code']!r} is not a bot code name "
                               "(a-z, 0-9, '-' or '_', starting with a letter)")
        values["code"] = canonical_code(values["code"])
        values["server"] = values.get("server") or DEFAULT_SERVER
        if values["server"] != DEFAULT_SERVER and values["server"] not in servers:
            raise InvalidInput(f"{self.path}: {where} server {values['server']!r} is not a [servers.NAME] table")
        try:
            check_options({k: v for k, v in values.items() if k in OPTION_FLAGS}, flags=False)
        except InvalidInput as err:
            raise InvalidInput(f"{self.path}: {where} {err}") from None
        return BotEntry(name=name, **values)

    def _servers(self, raw_servers: Any) -> dict[str, ServerEntry]:
        from .db import parse_url

        if not isinstance(raw_servers, dict):
            raise InvalidInput(f"{self.path}: servers must be a table of [servers.NAME] tables")
        servers = {}
        for name, raw in raw_servers.items():
            where = f"[servers.{name}]"
            if SERVER_NAME_RE.fullmatch(name) is None or name == DEFAULT_SERVER:
                raise InvalidInput(f"{self.path}: {where}: a server name is 1-40 of a-z 0-9 '-' starting with a "
                                   f"letter, and not {DEFAULT_SERVER!r}")
            values = self._checked(ServerEntry, raw, where)
            if "admin_url" not in values:
                raise InvalidInput(f"{self.path}: {where} needs admin_url")
            if parse_url(values["admin_url"]).get("password"):
                raise InvalidInput(f"{self.path}: {where} admin_url must not contain a password (fleet.toml is "
                                   "committed): use PGPASSWORD, ~/.pgpass or ?passfile=PATH")
            extra = ServerEntry(**values)
            if not (MIN_CONNECTIONS <= extra.max_connections <= MAX_CONNECTIONS
                    and 0 <= extra.superuser_reserved_connections < extra.max_connections):
                raise InvalidInput(f"{self.path}: {where} max_connections must be {MIN_CONNECTIONS}-{MAX_CONNECTIONS} "
                                   "and superuser_reserved_connections below it")
            if not 0 <= extra.bot_port <= 65535:
                raise InvalidInput(f"{self.path}: {where} bot_port must be 1-65535 (0: admin_url's port)")
            if extra.bot_host and HOST_RE.fullmatch(extra.bot_host) is None:
                raise InvalidInput(f"{self.path}: {where} bot_host {extra.bot_host!r} is not a host name")
            servers[name] = extra
        return servers

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

    def _data(self, fleet: Fleet) -> dict[str, Any]:
        data: dict[str, Any] = {"version": 1, "server": asdict(fleet.stack)}
        defaults = {k: v for k, v in asdict(fleet.defaults).items() if v}
        if defaults:  # a fleet without defaults keeps its file as it always was
            data["defaults"] = defaults
        backup = asdict(fleet.backup)
        if backup != asdict(BackupSettings()):  # a fleet without [backup] keeps its file as it always was
            data["backup"] = backup
        if fleet.servers:
            data["servers"] = {name: asdict(fleet.servers[name]) for name in sorted(fleet.servers)}
        data["bots"] = {name: fleet.bots[name].to_toml() for name in sorted(fleet.bots)}
        return data

    @contextlib.contextmanager
    def editing(self) -> Iterator[Fleet]:
        """Load under an exclusive lock, let the block change it, write it back atomically."""
        with file_lock(self._lock_path):
            fleet = self.load()
            before = _copy(fleet)
            yield fleet
            if fleet != before:
                data = self._data(fleet)
                text = HEADER + tomli_w.dumps(data)
                atomic_write(self.path, text)
                # tomli_w writes what tomllib reads back as ``data``: the next command need not parse it
                self._remember(hashlib.sha256(text.encode()).hexdigest(), data)
