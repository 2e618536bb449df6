"""The shared PostgreSQL's tuning and the fleet's connection and memory budget.

Everything here is pure arithmetic over the registry (no server, no files), so
``provision budget``, ``provision render`` and ``add-bot`` agree to the byte.

The model (measured by bench/bench_budget.py; README "The compose stack"):

- memory limit M of the postgres container (default 512M);
- shared_buffers = M/4, effective_cache_size = M/2, maintenance_work_mem = M/16,
  autovacuum_work_mem = M/64 for each of 2 autovacuum workers, work_mem = 4 MB at every
  size (PostgreSQL's default: bots run small queries, more memory buys more connections;
  a bot that needs more sets its own --work-mem);
- shared memory = shared_buffers + M/128 (buffer descriptors and the like) + WAL buffers
  (M/128 up to 16 MB, as wal_buffers = -1 sizes them) + 12 MB + 96 kB per max_connections
  slot (PGPROC, locks): above PostgreSQL 15's and 18's ``shared_memory_size`` at every size
  measured;
- fixed = shared memory + maintenance_work_mem + the autovacuum workers' + 24 MB for the
  background processes;
- every allowed connection (max_connections) costs a backend's own memory, BACKEND_KB
  (an idle backend that served a bot's queries: PSS less its shared-memory share);
- only the connections running a query at once cost work_mem: ``active_percent`` of them
  (fleet.toml [server], default 10), each charged WORK_MEM_FACTOR (3) x work_mem (a sort and a
  hash, which may take hash_mem_multiplier 2 x work_mem) + ACTIVE_EXTRA_KB (3 MB) of executor
  memory;
- ``headroom_percent`` of M (default 10) is kept free for what the model does not count
  (page tables, a connection storm's short-lived backends, fragmentation);
- max_connections: the operator's number, or the most that fit M with all of the above, each
  share counted at its exact fraction of M so that more memory never affords fewer connections;
- reserve: superuser_reserved_connections (3) + the provisioner's margin (2: an admin session
  and a pg_dump) + behind PgBouncer the migrator's jobs (8: the only direct connections then);
- each bot's share is its role's CONNECTION LIMIT, ``(pool_size + max_overflow) x replicas + 1``
  (the + 1 for migrations); behind PgBouncer a bot holds at most ``pgbouncer_pool_size``
  server connections (its pools go to PgBouncer, its migrations come from the reserve).

The fleet fits when reserve + the sum of the shares <= max_connections and the memory
estimate (fixed + connections + active + headroom) <= M.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidInput
from .names import code_package
from .registry import (
    CPUS_RE, DEFAULT_SERVER, HOST_RE, MAX_CONNECTIONS, MIN_CONNECTIONS, SERVER_NAME_RE, BotEntry, Fleet,
    StackSettings,
)

SUPERUSER_RESERVED = 3
PROVISIONER_MARGIN = 2  # `provision` admin session + a pg_dump during remove-bot
# The stack's metrics exporter (render --exporter): its role's CONNECTION LIMIT, its container's memory
EXPORTER_CONNECTIONS = 2
EXPORTER_MEMORY = "128M"  # measured: 51 MiB resident after scrapes (VmHWM), + a health check
# The stack's archive service (render --archive, archive.py): barman's own sessions (a check, a
# backup, cron) take max_connections slots and are reserved; its walsenders (pg_receivewal, and
# pg_basebackup's during a backup, a check's) have slots of their own (max_wal_senders) but each is
# a backend: their memory is charged like a connection's. The container: barman (Python) and the
# PostgreSQL client tools.
ARCHIVE_CONNECTIONS = 3
ARCHIVE_WAL_SENDERS = 6
ARCHIVE_MEMORY = "256M"
MIGRATION_JOBS = 8  # behind PgBouncer: migrate's worker pool, the only direct bot connections
BACKGROUND_MB = 24
AUTOVACUUM_WORKERS = 2
# Measured by bench/bench_budget.py (README "Benchmarks"), rounded up:
BACKEND_KB = 2048  # an idle backend's own memory after it served a bot's queries (PSS - Pss_Shmem)
SLOT_KB = 96  # shared memory per max_connections slot (PGPROC, lock table; shared_memory_size)
SHARED_BASE_MB = 12  # shared memory beyond shared_buffers, its descriptors, WAL buffers and the slots
WORK_MEM_FACTOR = 3  # a running sort and hash: a hash takes up to hash_mem_multiplier (2) x work_mem
ACTIVE_EXTRA_KB = 3072  # a running query's executor memory beyond work_mem
WORK_MEM_MB = 4  # PostgreSQL's own default: bots run small queries; one that needs more sets --work-mem
DEFAULT_ACTIVE_PERCENT = 10
DEFAULT_HEADROOM_PERCENT = 10
POSTGRES_MAJORS = range(13, 19)
MEMORY_RE = re.compile(r"([1-9][0-9]{0,6})([MG])")
IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,199}(@sha256:[0-9a-f]{64})?")
# a tag that names the PgBouncer version (edoburu/pgbouncer:v1.25.2-p0, pgbouncer/pgbouncer:1.24.1):
# older than PGBOUNCER_MIN is refused; an image without one is taken as it is
PGBOUNCER_TAG_RE = re.compile(r":v?(\d+)\.(\d+)(?:\.\d+)?(?:-[A-Za-z0-9.]+)?(?:@|$)")
PGBOUNCER_MIN = (1, 24)


# Each example bot's memory limit: its resident memory after start-up in its container, measured
# on the real engine (docker stats, 2026-11-26: hello-bot 173-175 MiB, aiogram's import alone is
# ~165 MB; chat-bot 54 MiB; feishu-bot 53 MiB), with room to work; the health check adds nothing
# lasting (shared.health reads the bot's heartbeat). A code not listed gets DEFAULT_BOT_MEMORY.
CODE_MEMORY = {"hello_bot": "256M", "chat_bot": "192M", "feishu_bot": "192M"}
DEFAULT_BOT_MEMORY = "256M"


def bot_memory(fleet: Fleet, entry: BotEntry) -> str:
    """A bot container's memory limit: its own, else [server] bot_memory, else its code's default."""
    value = entry.memory or fleet.stack.bot_memory or CODE_MEMORY.get(code_package(entry.code), DEFAULT_BOT_MEMORY)
    return canonical_memory(value, "memory")


class BudgetExceeded(InvalidInput):
    """The fleet would not fit the shared server's connections or memory (nothing was changed)."""


def memory_mb(value: str, what: str) -> int:
    """``512M`` / ``1G`` as megabytes (InvalidInput otherwise)."""
    match = MEMORY_RE.fullmatch(str(value).strip().upper())
    if match is None:
        raise InvalidInput(f"{what} must look like 512M or 2G (got {value!r})")
    number, unit = int(match.group(1)), match.group(2)
    return number * 1024 if unit == "G" else number


def canonical_memory(value: str, what: str) -> str:
    mb = memory_mb(value, what)
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def parse_publish(value: str) -> tuple[str, int] | None:
    """``ADDRESS:PORT`` (IPv6 in brackets) or "" (not published)."""
    value = value.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    try:
        if not sep:
            raise ValueError
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"publish must be ADDRESS:PORT such as 127.0.0.1:5432, or empty (got {value!r})") from None
    return host, number


def validate_stack(server: StackSettings) -> None:
    """Refuse settings the stack cannot be rendered from (InvalidInput, one line)."""
    if server.postgres_major not in POSTGRES_MAJORS:
        raise InvalidInput(f"postgres_major must be {POSTGRES_MAJORS.start}-{POSTGRES_MAJORS.stop - 1} (got {server.postgres_major})")
    if memory_mb(server.postgres_memory, "postgres_memory") < 128:
        raise InvalidInput(f"postgres_memory must be at least 128M (got {server.postgres_memory})")
    if server.bot_memory and memory_mb(server.bot_memory, "bot_memory") < 32:
        raise InvalidInput(f"bot_memory must be at least 32M (got {server.bot_memory})")
    if CPUS_RE.fullmatch(server.bot_cpus) is None:
        raise InvalidInput(f"bot_cpus must be a number of cores such as 0.5 or 2 (got {server.bot_cpus!r})")
    if SERVER_NAME_RE.fullmatch(server.project_name) is None:
        raise InvalidInput(f"project_name must be 1-40 of a-z 0-9 '-' starting with a letter (got {server.project_name!r})")
    if server.max_connections != 0 and not MIN_CONNECTIONS <= server.max_connections <= MAX_CONNECTIONS:
        raise InvalidInput(f"max_connections must be 0 (derived from the memory) or {MIN_CONNECTIONS}-{MAX_CONNECTIONS} "
                           f"(got {server.max_connections})")
    if not 1 <= server.active_percent <= 100:
        raise InvalidInput(f"active_percent must be 1-100: the share of connections running a query at once "
                           f"(got {server.active_percent})")
    if not 0 <= server.headroom_percent <= 50:
        raise InvalidInput(f"headroom_percent must be 0-50: the share of the memory kept free (got {server.headroom_percent})")
    if not 1 <= server.pgbouncer_pool_size <= 100:
        raise InvalidInput(f"pgbouncer_pool_size must be 1-100 (got {server.pgbouncer_pool_size})")
    for key in ("pgbouncer_image", "bot_image"):
        if IMAGE_RE.fullmatch(getattr(server, key)) is None:
            raise InvalidInput(f"{key} {getattr(server, key)!r} is not an image reference")
    tagged = PGBOUNCER_TAG_RE.search(server.pgbouncer_image)
    if server.pgbouncer and tagged and (int(tagged.group(1)), int(tagged.group(2))) < PGBOUNCER_MIN:
        # an older PgBouncer refuses the rendered [users] lines (max_user_client_connections) and does not start
        raise InvalidInput(f"pgbouncer_image {server.pgbouncer_image!r} is PgBouncer {tagged.group(1)}.{tagged.group(2)}: "
                           f"the rendered pgbouncer.ini needs {PGBOUNCER_MIN[0]}.{PGBOUNCER_MIN[1]} or newer "
                           "(max_user_client_connections)")
    if HOST_RE.fullmatch(server.bot_host) is None or not 1 <= server.bot_port <= 65535:
        raise InvalidInput("bot_host/bot_port in fleet.toml are not a host name and port")
    parse_publish(server.publish)


@dataclass(frozen=True)
class Tuning:
    """postgresql.conf numbers for one memory limit (sizes in MB), and the memory model behind them."""

    memory_mb: int
    shared_buffers_mb: int
    effective_cache_size_mb: int
    maintenance_work_mem_mb: int
    autovacuum_work_mem_mb: int
    work_mem_mb: int
    max_connections: int
    max_connections_derived: bool
    superuser_reserved_connections: int = SUPERUSER_RESERVED
    autovacuum_max_workers: int = AUTOVACUUM_WORKERS
    active_percent: int = DEFAULT_ACTIVE_PERCENT
    headroom_percent: int = DEFAULT_HEADROOM_PERCENT
    wal_senders: int = 0  # the archive's walsenders: backends outside max_connections (max_wal_senders)

    @property
    def shared_mb(self) -> int:
        """The shared memory segment: shared_buffers, its descriptors and WAL buffers, a slot per connection."""
        return (self.shared_buffers_mb + self.memory_mb // 128 + min(self.memory_mb // 128, 16) + SHARED_BASE_MB
                + -(-self.max_connections * SLOT_KB // 1024))

    @property
    def maintenance_mb(self) -> int:
        return self.maintenance_work_mem_mb + self.autovacuum_max_workers * self.autovacuum_work_mem_mb

    @property
    def fixed_mb(self) -> int:
        return self.shared_mb + self.maintenance_mb + BACKGROUND_MB

    @property
    def active_connections(self) -> int:
        """Connections assumed to run a query (a sort or a hash) at the same moment."""
        return -(-self.max_connections * self.active_percent // 100)

    @property
    def active_kb(self) -> int:
        """What one running query may add to its backend: work_mem x the factor + executor memory."""
        return WORK_MEM_FACTOR * self.work_mem_mb * 1024 + ACTIVE_EXTRA_KB

    @property
    def headroom_mb(self) -> int:
        return self.memory_mb * self.headroom_percent // 100

    @property
    def connections_mb(self) -> int:
        return -(-(self.max_connections + self.wal_senders) * BACKEND_KB // 1024)

    @property
    def active_mb(self) -> int:
        return -(-self.active_connections * self.active_kb // 1024)

    @property
    def memory_estimate_mb(self) -> int:
        """Everything the model charges, headroom included: it fits when this is at most memory_mb."""
        return self.fixed_mb + self.connections_mb + self.active_mb + self.headroom_mb


def tune(server: StackSettings) -> Tuning:
    """The postgres settings derived from the memory limit (and max_connections, if set)."""
    validate_stack(server)
    return tuning_for(memory_mb(server.postgres_memory, "postgres_memory"), server.max_connections,
                      server.active_percent, server.headroom_percent,
                      ARCHIVE_WAL_SENDERS if server.archive else 0)


def _work_mem_mb(mem: int) -> int:
    """work_mem at every memory limit: WORK_MEM_MB. More memory buys more connections, not larger sorts."""
    return WORK_MEM_MB


def derived_max_connections(mem: int, active_percent: int = DEFAULT_ACTIVE_PERCENT,
                            headroom_percent: int = DEFAULT_HEADROOM_PERCENT, wal_senders: int = 0) -> int:
    """max_connections derived from a memory limit M (MB, at least 128), never fewer at a larger M.

    The most connections C with fixed + C x (backend + slot) + active + headroom <= M, every
    share of M counted at its exact fraction, not the rounded setting: shared_buffers + M/128 +
    maintenance + the autovacuum workers as 45/128 of M (360 kB per MB), the WAL buffers as M/128
    up to 16 MB, the headroom as its percent. The active connections are ceil(C x
    active%), charged here as C x active% plus one whole active connection. Each exact share is
    at least what the rounded settings take, so the memory estimate always fits; and the count
    rises with M (what is left grows with M, a connection's cost does not). Then within
    MIN_CONNECTIONS-MAX_CONNECTIONS. Everything is in hundredths of a kB, in integers."""
    active = WORK_MEM_FACTOR * WORK_MEM_MB * 1024 + ACTIVE_EXTRA_KB
    # + 3 MB: the estimate rounds the slots, the backends and the active part up to whole MB
    fixed_kb = (360 * mem + min(8 * mem, 16 * 1024) + (SHARED_BASE_MB + BACKGROUND_MB + 3) * 1024
                + wal_senders * BACKEND_KB)
    free = 100 * (1024 * mem - fixed_kb - active) - headroom_percent * 1024 * mem
    per = 100 * (BACKEND_KB + SLOT_KB) + active_percent * active
    afford = max(free, 0) // per
    return min(max(afford, MIN_CONNECTIONS), MAX_CONNECTIONS)


def tuning_for(mem: int, max_connections: int = 0, active_percent: int = DEFAULT_ACTIVE_PERCENT,
               headroom_percent: int = DEFAULT_HEADROOM_PERCENT, wal_senders: int = 0) -> Tuning:
    """The tuning of a memory limit (MB), with max_connections set (or 0: derived from it)."""
    derived = max_connections == 0
    return Tuning(
        memory_mb=mem,
        shared_buffers_mb=mem // 4,
        effective_cache_size_mb=mem // 2,
        maintenance_work_mem_mb=max(mem // 16, 8),
        autovacuum_work_mem_mb=max(mem // 64, 2),
        work_mem_mb=_work_mem_mb(mem),
        max_connections=(derived_max_connections(mem, active_percent, headroom_percent, wal_senders) if derived
                         else max_connections),
        max_connections_derived=derived,
        active_percent=active_percent,
        headroom_percent=headroom_percent,
        wal_senders=wal_senders,
    )


ADVICE_STEP_MB = 64
ADVICE_LIMIT_MB = 1024 * 1024  # 1T: beyond it the advice is not memory


def memory_to_fit(connections: int, max_connections: int, memory: int, active_percent: int = DEFAULT_ACTIVE_PERCENT,
                  headroom_percent: int = DEFAULT_HEADROOM_PERCENT, wal_senders: int = 0) -> int | None:
    """The smallest memory limit (MB: ``memory`` itself, else a multiple of 64M above it) whose
    tuning has ``connections`` and fits its memory estimate, with ``max_connections`` set (or 0:
    derived from the memory). None when no memory up to 1T does."""
    mem = max(memory, 128)
    while mem <= ADVICE_LIMIT_MB:
        t = tuning_for(mem, max_connections, active_percent, headroom_percent, wal_senders)
        if t.max_connections >= connections and t.memory_estimate_mb <= mem:
            return mem
        if t.max_connections_derived and t.max_connections >= MAX_CONNECTIONS:
            return None  # derived: more memory gives no more connections
        mem = (mem // ADVICE_STEP_MB + 1) * ADVICE_STEP_MB
    return None


def memory_terms(t: Tuning) -> str:
    """The estimate's terms in words (budget's output and a refusal's)."""
    return (f"shared {t.shared_mb}MB (shared_buffers {t.shared_buffers_mb}MB + {t.shared_mb - t.shared_buffers_mb}MB) "
            f"+ maintenance {t.maintenance_mb}MB + background {BACKGROUND_MB}MB + {t.max_connections} connections"
            f"{f' and {t.wal_senders} WAL senders' if t.wal_senders else ''} x "
            f"{BACKEND_KB / 1024:g}MB + {t.active_connections} active ({t.active_percent}%) x {t.active_kb / 1024:g}MB "
            f"({WORK_MEM_FACTOR} x work_mem {t.work_mem_mb}MB + {ACTIVE_EXTRA_KB / 1024:g}MB) "
            f"+ headroom {t.headroom_mb}MB ({t.headroom_percent}%)")


def memory_text(mb: int) -> str:
    """Megabytes as --postgres-memory takes them (1G, 1216M)."""
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


@dataclass(frozen=True)
class BotShare:
    name: str
    pool: str  # "pool_size+max_overflow"
    pool_max: int
    replicas: int
    share: int  # server connections this bot may hold (its role limit, or its PgBouncer cap + 1)
    client_connections: int  # what the bot's pools may open (to PgBouncer, when it is on)
    memory_mb: int = 0  # its containers' memory limits, all replicas (the stack's bots)


def bot_share(entry: BotEntry, server: StackSettings, fleet: Fleet | None = None) -> BotShare:
    clients = entry.pool_max * entry.replicas
    share = entry.connection_limit
    if server.pgbouncer:
        # its pools go to PgBouncer; its migrations are the migrator's, counted in the reserve
        share = min(clients, server.pgbouncer_pool_size)
    memory = memory_mb(bot_memory(fleet, entry), "memory") * entry.replicas if fleet is not None else 0
    return BotShare(entry.name, f"{entry.pool_size}+{entry.max_overflow}", entry.pool_max, entry.replicas, share,
                    clients, memory)


@dataclass
class Budget:
    tuning: Tuning
    pgbouncer: bool
    bots: list[BotShare] = field(default_factory=list)
    exporter: bool = False  # the stack's exporter service: its connections are reserved, its memory counted
    archive: bool = False  # the stack's archive service: barman's sessions reserved, its memory counted

    @property
    def migration_reserve(self) -> int:
        """Behind PgBouncer the bots reach postgres only through it (their network has no route to
        postgres); their migrations come from the provision service, at most MIGRATION_JOBS at once."""
        return MIGRATION_JOBS if self.pgbouncer else 0

    @property
    def reserve(self) -> int:
        return (self.tuning.superuser_reserved_connections + PROVISIONER_MARGIN + self.migration_reserve
                + self.exporter_connections + self.archive_connections)

    @property
    def exporter_connections(self) -> int:
        return EXPORTER_CONNECTIONS if self.exporter else 0

    @property
    def archive_connections(self) -> int:
        return ARCHIVE_CONNECTIONS if self.archive else 0

    @property
    def total(self) -> int:
        return sum(b.share for b in self.bots)

    @property
    def bots_memory_mb(self) -> int:
        """What the bots' containers (and the exporter's and the archive's) may use together (their
        memory limits): the host needs it beside postgres's."""
        return (sum(b.memory_mb for b in self.bots) + (memory_mb(EXPORTER_MEMORY, "memory") if self.exporter else 0)
                + (memory_mb(ARCHIVE_MEMORY, "memory") if self.archive else 0))

    @property
    def headroom(self) -> int:
        return self.tuning.max_connections - self.reserve - self.total

    @property
    def memory_fits(self) -> bool:
        # memory_mb 0: a [servers.NAME] botfleet does not run; its memory is not ours to budget.
        return self.tuning.memory_mb == 0 or self.tuning.memory_estimate_mb <= self.tuning.memory_mb

    @property
    def fits(self) -> bool:
        return self.headroom >= 0 and self.memory_fits

    def as_dict(self) -> dict[str, Any]:
        t = self.tuning
        return {
            "max_connections": t.max_connections, "max_connections_derived": t.max_connections_derived,
            "superuser_reserved_connections": t.superuser_reserved_connections,
            "provisioner_margin": PROVISIONER_MARGIN, "migration_reserve": self.migration_reserve,
            "exporter_connections": self.exporter_connections, "archive_connections": self.archive_connections,
            "reserve": self.reserve, "pgbouncer": self.pgbouncer,
            "bots": [asdict(b) for b in self.bots], "total": self.total, "headroom": self.headroom,
            "memory": {"limit_mb": t.memory_mb, "shared_buffers_mb": t.shared_buffers_mb, "shared_mb": t.shared_mb,
                       "maintenance_mb": t.maintenance_mb, "background_mb": BACKGROUND_MB if t.memory_mb else 0,
                       "fixed_mb": t.fixed_mb, "backend_kb": BACKEND_KB, "connections_mb": t.connections_mb,
                       "wal_senders": t.wal_senders,
                       "work_mem_mb": t.work_mem_mb, "active_percent": t.active_percent,
                       "active_connections": t.active_connections, "active_kb": t.active_kb,
                       "active_mb": t.active_mb, "headroom_percent": t.headroom_percent,
                       "headroom_mb": t.headroom_mb, "estimate_mb": t.memory_estimate_mb,
                       "bots_mb": self.bots_memory_mb},
            "fits": self.fits,
        }


def compute(fleet: Fleet, extra: BotEntry | None = None) -> Budget:
    """The default server's budget (the compose stack's postgres): its bots, with
    ``extra`` added (or replacing its namesake) when it goes there."""
    return server_budget(fleet, DEFAULT_SERVER, extra)


def server_budget(fleet: Fleet, server: str, extra: BotEntry | None = None) -> Budget:
    """One server's budget: the bots placed on it, with ``extra`` added (or replacing its
    namesake) when ``extra`` is placed there.

    The default server's numbers derive from ``[server]`` (the stack's memory);
    a ``[servers.NAME]`` has its declared max_connections and no memory model.
    """
    bots = fleet.on(server)
    if extra is not None:
        bots.pop(extra.name, None)
        if extra.server == server:
            bots[extra.name] = extra
    if server == DEFAULT_SERVER:
        return Budget(tune(fleet.stack), fleet.stack.pgbouncer,
                      [bot_share(bots[name], fleet.stack, fleet) for name in sorted(bots)], exporter=fleet.stack.exporter,
                      archive=fleet.stack.archive)
    spec = fleet.servers[server]  # its numbers were range-checked when fleet.toml was loaded
    tuning = Tuning(memory_mb=0, shared_buffers_mb=0, effective_cache_size_mb=0, maintenance_work_mem_mb=0,
                    autovacuum_work_mem_mb=0, work_mem_mb=0, max_connections=spec.max_connections,
                    max_connections_derived=False, superuser_reserved_connections=spec.superuser_reserved_connections)
    direct = StackSettings(pgbouncer=False)
    return Budget(tuning, False, [bot_share(bots[name], direct) for name in sorted(bots)])


def explain(budget: Budget, what: str) -> str:
    """The one-line refusal: the numbers and the ways out."""
    t = budget.tuning
    if budget.headroom < 0:
        need = budget.reserve + budget.total
        problem = (f"{what} needs {need} connections ({budget.total} for {len(budget.bots)} bots + {budget.reserve} reserved) "
                   f"but max_connections is {t.max_connections}: {-budget.headroom} too many")
    else:
        problem = (f"{what}: max_connections {t.max_connections} needs about {t.memory_estimate_mb}MB "
                   f"({memory_terms(t)}) but postgres has {t.memory_mb}MB")
    if t.memory_mb == 0:  # a [servers.NAME]: its numbers are declared in fleet.toml
        return (f"{problem}; nothing was changed. Options: raise that server's max_connections in fleet.toml "
                "(if the server really allows that many), shrink pools (--pool-size 1 --max-overflow 1), "
                "or place the bot on another server (--server NAME)")
    need = budget.reserve + budget.total
    options = []
    if budget.headroom < 0:
        # Each option is a value that fits this fleet (the tuning recomputed for it), or is left out.
        derived = memory_to_fit(need, 0, t.memory_mb, t.active_percent, t.headroom_percent, t.wal_senders)
        if derived is not None:
            options.append(f"raise the memory (provision render --postgres-memory {memory_text(derived)}"
                           + ("" if t.max_connections_derived else " --max-connections 0") + ")")
        fixed = memory_to_fit(need, need, t.memory_mb, t.active_percent, t.headroom_percent, t.wal_senders)
        if fixed is not None and need <= MAX_CONNECTIONS:
            options.append(f"raise max_connections (provision render --max-connections {need}"
                           + ("" if fixed == t.memory_mb else f" --postgres-memory {memory_text(fixed)}") + ")")
        options.append("shrink pools (provision add-bot NAME --pool-size 1 --max-overflow 1)")
        if not budget.pgbouncer:
            options.append("or put PgBouncer in front (provision render --pgbouncer)")
    else:
        more = memory_to_fit(t.max_connections, t.max_connections, t.memory_mb, t.active_percent, t.headroom_percent,
                             t.wal_senders)
        if more is not None:
            options.append(f"raise the memory (provision render --postgres-memory {memory_text(more)})")
        options.append("or lower --max-connections (0 derives it from the memory)")
    return f"{problem}; nothing was changed. Options: " + ", ".join(options)


@dataclass(frozen=True)
class ServerRoom:
    """A server that botfleet does not size (the default server when no stack is rendered): its
    own max_connections less its superuser_reserved_connections, against the fleet's bots there,
    each counted at its role's CONNECTION LIMIT. Other users of that server are not counted."""

    server: str
    max_connections: int
    superuser_reserved_connections: int
    limits: dict[str, int] = field(default_factory=dict)  # bot -> its role's CONNECTION LIMIT

    @property
    def available(self) -> int:
        return self.max_connections - self.superuser_reserved_connections

    @property
    def total(self) -> int:
        return sum(self.limits.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def server_room(fleet: Fleet, server: str, max_connections: int, superuser_reserved: int,
                extra: BotEntry | None = None) -> ServerRoom:
    """The room on ``server`` (its settings as the server reports them) for the fleet's bots placed
    there, with ``extra`` added (or replacing its namesake) when it goes there."""
    bots = fleet.on(server)
    if extra is not None:
        bots.pop(extra.name, None)
        if extra.server == server:
            bots[extra.name] = extra
    return ServerRoom(server, max_connections, superuser_reserved,
                      {name: bots[name].connection_limit for name in sorted(bots)})


def require_room(room: ServerRoom, what: str) -> None:
    """Raise BudgetExceeded, in one line with the numbers and the ways out, when the bots'
    connection limits do not fit the server's own max_connections."""
    if room.fits:
        return
    raise BudgetExceeded(
        f"{what} needs {room.total} connections (the connection limits of {len(room.limits)} bots on server "
        f"{room.server}) but it allows {room.available} (max_connections {room.max_connections} - "
        f"superuser_reserved_connections {room.superuser_reserved_connections}): {room.total - room.available} "
        "too many; nothing was changed. Options: fewer replicas or smaller pools (--replicas 1, --pool-size 1 "
        "--max-overflow 1: a bot's limit is (pool_size + max_overflow) x replicas + 1), or raise that server's "
        f"max_connections (ALTER SYSTEM SET max_connections = {room.total + room.superuser_reserved_connections}, "
        "then restart it)")


def require_fit(budget: Budget, what: str) -> None:
    """Raise BudgetExceeded with the numbers when the fleet does not fit."""
    if not budget.fits:
        raise BudgetExceeded(explain(budget, what))
