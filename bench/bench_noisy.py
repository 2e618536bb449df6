"""Noisy neighbour: eight well-behaved bots on one PostgreSQL while one bot misbehaves, with and without botfleet's guards.

Run by hand from the repository root; prints a table (no timing is asserted in tests):

    .venv/bin/python bench/bench_noisy.py                       # 8 good bots, 15 s a phase (5-6 minutes)
    .venv/bin/python bench/bench_noisy.py --seconds 10 --bots 4 --rate 5
    .venv/bin/python bench/bench_noisy.py --pgbouncer           # every bot through PgBouncer (apt-get install -y pgbouncer)

A throwaway embedded PostgreSQL (its own data folder and port; the machine's server is not
touched) gets max_connections from botfleet's budget for the fleet. Every bot (``good-01`` ..
``good-NN`` and ``noisy``) is provisioned with the real ``commands.add_bot``: its own database,
login role (SCRAM over TCP) and env file; the guards are set the way an operator sets them, through
fleet.toml ``[defaults]`` and add-bot's options.

The good bots: each runs in its own process (as each bot is its own container; one event loop for
all of them would be one more CPU bottleneck), has a table of 20,000 rows with an index, and sends
``--rate`` requests a second
(Poisson arrivals, open loop: a slow request does not delay the next) through the shared data layer
(``shared.database.Database`` from its env file, its pool of 2+3): 80% an indexed read of a few
rows, 20% a one-row INSERT, each its own unit of work. Once a second each good bot also opens a new
connection through its pool (the pooled one discarded, a new one opened: SELECT 1), as a restarting
bot or a growing pool does (the data layer tries a new connection again when the server is full for
a moment: SQLSTATE 53300, up to 1.55 s); its failures count
as the good bots' errors and its latency is the CONNECT column. Latency is measured in each bot's
process from when the request starts (a wait for a pooled connection included).

The noisy bot runs in its own process (so its client work does not slow the good bots' event loop)
and, in turn:

1. seqscan: a sequential-scan storm: its whole pool (5 sessions) runs full scans with LIKE on a
   1,000,000-row table (97 MB) without an index, back to back;
2. sort: 2 sessions sort 2,000,000 rows (that table x 2) by a text expression with the fleet's small
   work_mem, back to back: about 280 MB of temp files a sort (three processes with --parallel 2);
3. lock: one session updates a row and keeps its transaction open (idle, as a bot waiting on an
   HTTP call), the other 4 sessions of its pool queue on that row;
4. storm: a connection storm: --storm connections opened at once, outside its pool, held 2 s, again;
5. bulk: 2 sessions insert 20,000-row batches (about 10 MB each) as fast as they can.

Each case runs once WITH the guards and once WITHOUT, back to back (the machine's other load then
hits both alike), after a quiet baseline (the good bots alone) in each mode:

- with:    [defaults] temp_file_limit 64MB, work_mem 4MB, lock_timeout 1s, idle_session_timeout 1min;
           add-bot --statement-timeout 5s --idle-timeout 3s (tightened from 30s/60s so they act inside
           a short phase); the roles' CONNECTION LIMIT from their pools (6); case 5: add-bot noisy
           --max-size (its size at the start + 64 MB) and `provision quota enforce` (commands.quota)
           every --enforce-every seconds, as cron would run it (less often, in real life);
- without: [defaults] empty, --statement-timeout 0 --idle-timeout 0, roles and databases with
           CONNECTION LIMIT -1, no quota: the server's defaults (work_mem 4MB, no temp file limit).

With ``--pgbouncer`` every bot (good and noisy: its pool, its new connections, the storm) reaches
the server through one PgBouncer process the benchmark starts (Debian's package, 1.18), with the
pgbouncer.ini botfleet renders for this fleet (``provision render --pgbouncer``: transaction
pooling, ``pgbouncer_pool_size`` server connections per bot, 1 by default, each bot's clients
capped by max_user_client_connections, max_client_conn every cap + 1,000; ``bench/_pgbouncer.py``,
shared with bench_budget), pointed at the private server without TLS. 1.18 lacks
max_prepared_statements (the stack's image is 1.25), so the bots' engines use unnamed statements
(asyncpg's statement cache off), and the per-bot client cap (1.24), left out on 1.18.
``BOTFLEET_PGBOUNCER=PATH`` runs another PgBouncer binary (a build of the stack's 1.25, say).
``--userlist-verifiers`` (an experiment, not what render writes) puts the roles' SCRAM secrets as
the server stores them in the userlist instead of the passwords. The noisy bot's peak connections are then PgBouncer's server
connections for it; PgBouncer's own CPU is a column. PgBouncer keeps its server connections, and
a role's settings apply when a session starts: each time the guards change, the bots' server
connections are ended (between phases), so the next phase runs with the new settings. After a suspension (case 5) the next phase
waits until the noisy bot gets through PgBouncer again (its server_login_retry, 15 s).

Per phase: the good bots' requests, p50/p99, p99 against the quiet baseline (both modes' quiet phases
pooled: the guards change nothing for bots that behave, and one phase's p99 is a handful of requests), their
errors (requests and new connections, by kind), their new connections' p99, the machine's CPU busy
share (/proc/stat: everything on the machine, not only this benchmark), the CPU the good bots'
processes used, and what the noisy bot did
and got (its PostgreSQL errors by kind, its peak connections, temp bytes, database growth).
Everything it creates is deleted at the end, even on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench import _pgbouncer as pgbouncers  # noqa: E402  (botfleet's pgbouncer.ini for a fleet, the process)
from shared.database import Database  # noqa: E402
from shared.settings import DatabaseSettings  # noqa: E402

CASES = ("seqscan", "sort", "lock", "storm", "bulk")
CASE_TITLES = {"quiet": "quiet baseline", "seqscan": "1 seq-scan storm", "sort": "2 temp-file sort",
               "lock": "3 lock held", "storm": "4 connection storm", "bulk": "5 bulk insert"}
NOISY = "noisy"
BIG_ROWS = 1_000_000
GOOD_ROWS = 20_000
GUARD_DEFAULTS = {"temp_file_limit": "64MB", "work_mem": "4MB", "lock_timeout": "1s", "idle_session_timeout": "1min"}
GUARD_TIMEOUTS = {"statement_timeout": "5s", "idle_timeout": "3s"}
QUOTA_HEADROOM_MB = 64


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def classify(err: BaseException) -> str:
    """A PostgreSQL or client error in a few words (never the URL or the SQL's parameters)."""
    msg = str(err).lower()
    known = (
        ("temp_file_limit", "temp_file_limit exceeded"),
        ("too many connections for role", "too many connections for role"),
        ("too many connections for database", "too many connections for database"),
        ("too many clients", "too many clients (server full)"),
        ("remaining connection slots are reserved", "slots reserved (server full)"),
        ("lock timeout", "lock timeout"),
        ("statement timeout", "statement timeout"),
        ("idle-in-transaction timeout", "idle-in-transaction timeout"),
        ("idle-session timeout", "idle-session timeout"),
        ("not permitted to log in", "NOLOGIN (suspended)"),
        ("administrator command", "session ended by admin"),
        ("queuepool", "pool timeout"),
        ("connection was closed", "connection closed"),
        ("connection is closed", "connection closed"),
        ("connectiondoesnotexist", "connection closed"),
        ("cannot perform operation: another operation is in progress", "connection busy"),
        ("another operation", "connection busy"),
        # PgBouncer's own refusals
        ("max_client_conn", "PgBouncer full (max_client_conn)"),
        ("max_user_client_connections", "PgBouncer: the bot's client cap (max_user_client_connections)"),
        ("server_login_retry", "PgBouncer: server login failing (server_login_retry)"),
        ("query_wait_timeout", "PgBouncer: query_wait_timeout"),
    )
    for needle, label in known:
        if needle in msg:
            return label
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first[:50]}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def connect_args(settings: DatabaseSettings) -> dict:
    url = settings.url
    return {"host": url.host, "port": url.port, "user": url.username, "password": url.password, "database": url.database}


def bot_database(name: str, env: dict[str, str], application_name: str | None, pgbouncer: bool) -> tuple[DatabaseSettings, Database]:
    """The bot's shared data layer from its env file; behind Debian's PgBouncer 1.18 with unnamed
    statements (it lacks max_prepared_statements; the stack's 1.25 has it)."""
    settings = DatabaseSettings.from_env(name, env)
    db = Database(settings, application_name=application_name)
    if pgbouncer:
        pgbouncers.unnamed_statements(db.engine)
    return settings, db


# ---------------------------------------------------------------- the noisy bot (a child process)
async def noisy_child(case: str, env: dict[str, str], storm: int, pgbouncer: bool) -> dict:
    settings, db = bot_database(NOISY, env, f"{NOISY}-{case}", pgbouncer)
    pool = settings.pool_size + settings.max_overflow
    errors: Counter[str] = Counter()
    ops = Counter()
    extra: dict = {}
    async with db.unit_of_work() as s:  # warm the pool, create what the case needs
        if case == "bulk":
            await s.execute(text("CREATE TABLE IF NOT EXISTS grow (id int, body text)"))
    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    t_start = time.time()

    async def until_deadline(step) -> None:
        while time.time() < deadline:
            try:
                await step()
            except Exception as err:  # noqa: BLE001 - a misbehaving bot retries
                kind = classify(err)
                if ":" in kind and kind not in errors:  # not a known kind: its message once, on stderr
                    say(f"    noisy bot: {type(err).__name__}: {str(err)[:300]}")
                errors[kind] += 1
                if "suspended" in classify(err) or "by admin" in classify(err):
                    extra.setdefault("first_refused_s", round(time.time() - t_start, 1))
                await asyncio.sleep(0.2)

    async def scan() -> None:
        async with db.unit_of_work() as s:
            await s.execute(text("SELECT count(*) FROM big WHERE payload LIKE :p"), {"p": f"%{random.randrange(4096):03x}f%"})
        ops["scans"] += 1

    async def sort() -> None:
        async with db.unit_of_work() as s:
            await s.execute(text("SELECT payload FROM big CROSS JOIN generate_series(1, 2) g "
                                 "ORDER BY payload || g OFFSET 1999999"))
        ops["sorts"] += 1

    async def hold() -> None:
        async with db.unit_of_work() as s:
            await s.execute(text("UPDATE hot SET n = n + 1 WHERE id = 1"))
            ops["holds"] += 1
            await asyncio.sleep(max(0.0, deadline - time.time()))  # "an HTTP call" with the row locked
            await s.execute(text("SELECT 1"))  # the transaction is used again afterwards

    async def wait_on_row() -> None:
        await asyncio.sleep(0.3)  # the holder first
        async with db.unit_of_work() as s:
            await s.execute(text("UPDATE hot SET n = n + 1 WHERE id = 1"))
        ops["queued updates done"] += 1

    async def storm_wave() -> None:
        args = {**connect_args(settings), **(pgbouncers.ASYNCPG_1_18 if pgbouncer else {})}

        async def one():
            conn = await asyncpg.connect(**args, timeout=10)
            try:
                await asyncio.sleep(2.0)
            finally:
                await conn.close()

        results = await asyncio.gather(*(one() for _ in range(storm)), return_exceptions=True)
        ok = sum(1 for r in results if not isinstance(r, BaseException))
        ops["connections"] += ok
        ops["waves"] += 1
        for r in results:
            if isinstance(r, BaseException):
                errors[classify(r)] += 1
        await asyncio.sleep(0.5)

    async def insert_batch() -> None:
        async with db.unit_of_work() as s:
            await s.execute(text("INSERT INTO grow SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 20000) g"))
        ops["batches of 20,000 rows"] += 1

    if case == "seqscan":
        jobs = [until_deadline(scan) for _ in range(pool)]
    elif case == "sort":
        jobs = [until_deadline(sort) for _ in range(2)]
    elif case == "lock":
        jobs = [until_deadline(hold)] + [until_deadline(wait_on_row) for _ in range(pool - 1)]
    elif case == "storm":
        jobs = [until_deadline(storm_wave)]
    elif case == "bulk":
        jobs = [until_deadline(insert_batch) for _ in range(2)]
    else:
        raise SystemExit(f"unknown case {case}")
    try:
        await asyncio.wait_for(asyncio.gather(*jobs), timeout=max(1.0, deadline - time.time()) + 30)
    except asyncio.TimeoutError:
        errors["still running 30 s after the phase"] += 1
    try:
        await asyncio.wait_for(db.dispose(), 10)
    except Exception:  # noqa: BLE001
        pass
    return {"ops": dict(ops), "errors": dict(errors), "extra": extra}


def child_main(args: argparse.Namespace) -> int:
    env = json.loads(os.environ.pop("BENCH_NOISY_ENV"))
    if args.child.startswith("good:"):
        _, name, seed = args.child.split(":")
        result = asyncio.run(good_child(name, env, args.rate, int(seed), args.pgbouncer))
    else:
        result = asyncio.run(noisy_child(args.child, env, args.storm, args.pgbouncer))
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the well-behaved bots
class GoodStats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.connects: list[float] = []
        self.errors: Counter[str] = Counter()


async def request(db: Database, rng: random.Random, stats: GoodStats) -> None:
    t0 = time.perf_counter()
    try:
        async with db.unit_of_work() as s:
            k = rng.randrange(GOOD_ROWS // 4)
            if rng.random() < 0.8:
                (await s.execute(text("SELECT id, body FROM notes WHERE k = :k ORDER BY id DESC LIMIT 5"), {"k": k})).all()
            else:
                await s.execute(text("INSERT INTO notes (k, body) VALUES (:k, :b)"), {"k": k, "b": f"note {rng.random()}"})
        stats.latencies.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - counted
        stats.errors[classify(err)] += 1


async def probe(db: Database, stats: GoodStats) -> None:
    """A new connection as the bot's pool opens one (a restart, a growing pool): through the shared
    data layer, which tries again when the server is full for a moment."""
    try:
        async with db.engine.connect() as pooled:  # when the pool has none, this opens one: a failure counts
            await pooled.invalidate()  # discarded: the next checkout opens a new connection
    except Exception as err:  # noqa: BLE001
        stats.errors["new connection: " + classify(err)] += 1
        return
    t0 = time.perf_counter()
    try:
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
        stats.connects.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001
        stats.errors["new connection: " + classify(err)] += 1


async def good_bot(db: Database, args: dict, rate: float, seed: int, deadline: float, stats: GoodStats) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    at, next_probe = loop.time(), loop.time() + rng.random()
    while True:
        at += rng.expovariate(rate)
        if at >= deadline:
            break
        while next_probe < at:
            await asyncio.sleep(max(0.0, next_probe - loop.time()))
            tasks.add(asyncio.create_task(probe(db, stats)))
            next_probe += 1.0
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.add(asyncio.create_task(request(db, rng, stats)))
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=15)
        for t in pending:
            t.cancel()
        if pending:
            stats.errors["unfinished 15 s after the phase"] += len(pending)


async def monitor(admin_url: str, role: str, stop: asyncio.Event, peaks: dict) -> None:
    """Every 0.25 s: the noisy bot's connections and the server's, its longest idle transaction
    and its sessions waiting on a lock (the admin's own session over the socket, not counted)."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        while not stop.is_set():
            row = await (await admin.execute(
                "SELECT count(*) FILTER (WHERE usename = %s), count(*), "
                "coalesce(max(extract(epoch FROM now() - xact_start)) FILTER (WHERE usename = %s "
                "AND state LIKE 'idle in transaction%%'), 0), "
                "count(*) FILTER (WHERE usename = %s AND wait_event_type = 'Lock') FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()", (role, role, role))).fetchone()
            peaks["noisy"] = max(peaks.get("noisy", 0), row[0])
            peaks["all"] = max(peaks.get("all", 0), row[1])
            peaks["idle_xact_s"] = max(peaks.get("idle_xact_s", 0.0), float(row[2]))
            peaks["lock_waiters"] = max(peaks.get("lock_waiters", 0), row[3])
            await asyncio.sleep(0.25)


async def good_child(name: str, env: dict[str, str], rate: float, seed: int, pgbouncer: bool) -> dict:
    """One well-behaved bot in its own process (as each bot is its own container)."""
    settings, db = bot_database(name, env, name, pgbouncer)
    async with db.unit_of_work() as s:  # warm: the pool's first connection, as a running bot has it
        await s.execute(text("SELECT 1"))
    print("ready", flush=True)
    until = float(await asyncio.to_thread(sys.stdin.readline))
    loop = asyncio.get_running_loop()
    stats, cpu0 = GoodStats(), os.times()
    await good_bot(db, connect_args(settings), rate, seed, loop.time() + (until - time.time()), stats)
    cpu1 = os.times()
    await db.dispose()
    return {"latencies": stats.latencies, "connects": stats.connects, "errors": dict(stats.errors),
            "cpu_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system}


def start_child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """This script as a child (a bot); its env file's values (its password) only in its environment."""
    child = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "BENCH_NOISY_ENV": json.dumps(env)})
    return child


def await_ready(child: subprocess.Popen, what: str) -> None:
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"{what} did not start: {line!r}")


def collect(child: subprocess.Popen) -> dict | None:
    try:
        out, _ = child.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        child.kill()
        return None


async def good_phase(bench: "Bench", seconds: float, children: list[subprocess.Popen], enforce_every: float | None) -> tuple[dict, dict]:
    """Start every bot (good and noisy) at once, watch the server, enforce the quota (case 5)."""
    peaks, quota_log = {}, {}
    stop = asyncio.Event()
    mon = asyncio.create_task(monitor(bench.server.admin_url(), bench.role(NOISY), stop, peaks))
    loop = asyncio.get_running_loop()
    start = time.time()
    for child in children:
        child.stdin.write(f"{start + seconds}\n")
        child.stdin.flush()
    deadline = loop.time() + seconds
    if enforce_every:
        while loop.time() < deadline:
            await asyncio.sleep(enforce_every)
            states = await asyncio.to_thread(bench.enforce_quota)
            for st in states:
                if st.action == "suspended" and "suspended_s" not in quota_log:
                    quota_log.update(suspended_s=round(time.time() - start, 1), size=st.size_bytes,
                                     max_size=st.max_size_bytes, ended=st.sessions_ended)
    await asyncio.sleep(max(0.0, deadline - loop.time()))
    stop.set()
    await mon
    return peaks, quota_log


# ---------------------------------------------------------------- the fleet and its server
def cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far (0 when there is none)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, tmp: Path, bots: int, rate: float, storm: int, parallel: int = 0, pgbouncer: bool = False,
                 userlist_verifiers: bool = False):
        from provisioning import budget as budgets
        from provisioning.embedded import EmbeddedServer

        self.tmp, self.n_good, self.rate, self.storm = tmp, bots, rate, storm
        self.pgbouncer = pgbouncer
        self.userlist_verifiers = userlist_verifiers
        self.bouncer: subprocess.Popen | None = None  # started by start_pgbouncer, after the data is made
        self.bouncer_port: int | None = None
        self.bouncer_ini: Path | None = None
        self.names = [f"good-{i + 1:02d}" for i in range(bots)] + [NOISY]
        need = budgets.SUPERUSER_RESERVED + budgets.PROVISIONER_MARGIN + len(self.names) * 6
        self.max_connections = -(-need // 10) * 10
        self.server = EmbeddedServer(tmp / ".botfleet")
        self.server.init()
        with open(self.server.pgdata / "postgresql.conf", "a") as fh:  # after the include: wins
            fh.write(f"\n# bench_noisy\nmax_connections = {self.max_connections}\n"
                     f"superuser_reserved_connections = {budgets.SUPERUSER_RESERVED}\n"
                     # as the stack's postgres runs (compose/postgresql.conf.j2): no parallel workers
                     f"max_parallel_workers_per_gather = {parallel}\n")
        self.server.start()
        from provisioning.project import Project
        from provisioning.servers import Servers

        self.project = Project(tmp / "fleet")
        self.servers = Servers(self.project, self.server.admin_url())
        self.port = self.server.status().port

    def role(self, name: str) -> str:
        return self.project.fleet.bots[name].role if name in self.project.fleet.bots else name.replace("-", "_") + "_user"

    def database(self, name: str) -> str:
        return self.project.fleet.bots[name].database

    def env(self, name: str) -> dict[str, str]:
        """The bot's env file's values; once PgBouncer runs, DATABASE_URL points at it (as
        ``render --pgbouncer`` points the stack's bots at the pgbouncer service)."""
        values = dict(self.project.env(name).values)
        if self.bouncer_port is not None:
            from sqlalchemy.engine import make_url

            url = make_url(values["DATABASE_URL"]).set(host="127.0.0.1", port=self.bouncer_port)
            values["DATABASE_URL"] = url.render_as_string(hide_password=False)
        return values

    def start_pgbouncer(self) -> None:
        """PgBouncer with botfleet's pgbouncer.ini for this fleet (transaction pooling, the fleet's
        pgbouncer_pool_size server connections per bot), in front of the private server."""
        passwords = {name: self.project.env(name).credentials(entry.role).password
                     for name, entry in self.project.fleet.bots.items()}
        if self.userlist_verifiers:  # the server's SCRAM secrets instead of the passwords
            with self.admin() as conn:
                stored = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                                           ([e.role for e in self.project.fleet.bots.values()],)).fetchall())
            passwords = {name: stored[entry.role] for name, entry in self.project.fleet.bots.items()}
        self.bouncer_ini, port = pgbouncers.pgbouncer_config(self.tmp / "pgbouncer", self.project, passwords, self.port)
        self.bouncer = pgbouncers.start(self.bouncer_ini, port)
        self.bouncer_port = port

    def end_pooled_server_connections(self) -> int:
        """A role's settings (the guards) are read when a session starts, and PgBouncer keeps its
        server connections across phases (server_lifetime 3600, server_idle_timeout 600): after the
        guards change, the bots' server connections are ended (no bot runs between phases), so the
        next phase's sessions start with the new settings."""
        roles = [self.role(n) for n in self.names]
        with self.admin() as conn:
            ended = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE usename = ANY(%s) AND pid <> pg_backend_pid()", (roles,)).fetchone()[0]
        time.sleep(0.5)
        return ended

    def stop_pgbouncer(self) -> None:
        if self.bouncer is None:
            return
        pgbouncers.stop(self.bouncer)
        self.bouncer = None
        log = self.tmp / "pgbouncer" / "pgbouncer.log"
        if log.exists():  # what it warned about, by kind (its log has no password)
            kinds = Counter(re.sub(r"\d+", "N", re.sub(r"[CS]-0x[0-9a-f]+|@[0-9.]+:\d+", "", line.split(" ", 4)[-1]))[:140]
                            for line in log.read_text(errors="replace").splitlines()
                            if " WARNING " in line or " ERROR " in line or " FATAL " in line)
            for kind, n in kinds.most_common(12):
                say(f"  pgbouncer log: {n} x {kind}")

    def good_envs(self) -> list[tuple[str, dict[str, str]]]:
        return [(n, self.env(n)) for n in self.names if n != NOISY]

    def admin(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.server.admin_url(), dbname=database, autocommit=True)

    def add_bot(self, name: str, **opts) -> None:
        from provisioning.commands import BotOptions, add_bot

        add_bot(self.project, self.servers, name, BotOptions(db_host="127.0.0.1", db_port=self.port, **opts), migrate=False)

    def configure(self, guards: bool) -> str:
        """Set (or take away) the guards the way an operator does: fleet.toml [defaults], add-bot's options."""
        from provisioning.registry import Defaults

        if self.project.root.joinpath("fleet.toml").exists():
            with self.project.editing() as fleet:
                fleet.defaults = Defaults(**GUARD_DEFAULTS) if guards else Defaults()
        for name in self.names:
            timeouts = GUARD_TIMEOUTS if guards else {"statement_timeout": "0", "idle_timeout": "0"}
            self.add_bot(name, **timeouts, max_size="default")
        if not self.project.fleet.defaults.work_mem and guards:  # the first add-bot wrote fleet.toml: now the defaults
            return self.configure(guards)
        with self.admin() as conn:
            if not guards:
                for name in self.names:
                    conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(self.role(name))))
                    conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT -1").format(sql.Identifier(self.database(name))))
            row = conn.execute(
                "SELECT r.rolconnlimit, coalesce((SELECT array_to_string(s.setconfig, ', ') FROM pg_db_role_setting s "
                "WHERE s.setrole = r.oid AND s.setdatabase = 0), '') FROM pg_roles r WHERE r.rolname = %s",
                (self.role(NOISY),)).fetchone()
        return f"connection limit {row[0]}; {row[1] or 'no role settings'}"

    def prepare_data(self) -> None:
        async def go() -> None:
            for name, env in self.good_envs():
                db = Database(DatabaseSettings.from_env(name, env))
                async with db.unit_of_work() as s:
                    await s.execute(text("CREATE TABLE notes (id bigserial PRIMARY KEY, k int NOT NULL, body text NOT NULL, "
                                         "at timestamptz NOT NULL DEFAULT now())"))
                    await s.execute(text("INSERT INTO notes (k, body) SELECT g % :q, 'note ' || g FROM generate_series(1, :n) g"),
                                    {"q": GOOD_ROWS // 4, "n": GOOD_ROWS})
                    await s.execute(text("CREATE INDEX notes_k ON notes (k)"))
                await db.dispose()
            db = Database(DatabaseSettings.from_env(NOISY, self.env(NOISY)))
            async with db.unit_of_work() as s:
                await s.execute(text("SET LOCAL statement_timeout = 0"))
                await s.execute(text("CREATE TABLE big (id int NOT NULL, payload text NOT NULL)"))  # no index
                await s.execute(text("INSERT INTO big SELECT g, md5(g::text) || md5((g * 7)::text) "
                                     "FROM generate_series(1, :n) g"), {"n": BIG_ROWS})
                await s.execute(text("CREATE TABLE hot (id int PRIMARY KEY, n int NOT NULL)"))
                await s.execute(text("INSERT INTO hot VALUES (1, 0)"))
            await db.dispose()
        asyncio.run(go())
        with self.admin() as conn:
            for name in self.names:
                with self.admin(self.database(name)) as c:
                    c.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")

    def noisy_facts(self) -> tuple[int, int]:
        with self.admin() as conn:
            row = conn.execute("SELECT pg_database_size(%s), coalesce(temp_bytes, 0) FROM pg_stat_database WHERE datname = %s",
                               (self.database(NOISY), self.database(NOISY))).fetchone()
        return row[0], row[1]

    def enforce_quota(self):
        from provisioning.commands import quota

        return quota(self.project, self.servers, [NOISY], enforce=True)

    def reset_after(self, case: str, guards: bool) -> None:
        if case == "bulk":
            with self.admin(self.database(NOISY)) as c:
                c.execute("DROP TABLE IF EXISTS grow")
            if guards:
                self.enforce_quota()  # under its quota again: lifted
                self.add_bot(NOISY, max_size="default")
                if self.bouncer_port is not None:
                    self.await_login_through_pgbouncer(NOISY)
        with self.admin() as conn:
            conn.execute("CHECKPOINT")
        time.sleep(1.0)

    def await_login_through_pgbouncer(self, name: str, within: float = 40.0) -> None:
        """After a suspension PgBouncer refuses the bot's clients for server_login_retry (15 s) once
        its server login failed: the next phase starts when the bot gets through again."""
        settings = DatabaseSettings.from_env(name, self.env(name))

        async def attempt() -> None:
            conn = await asyncpg.connect(**connect_args(settings), **pgbouncers.ASYNCPG_1_18, timeout=5)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        until = time.monotonic() + within
        while True:
            try:
                asyncio.run(attempt())
                return
            except Exception as err:  # noqa: BLE001 - tried again until the deadline
                if time.monotonic() > until:
                    raise SystemExit(f"{name} still cannot get through PgBouncer: {classify(err)}") from None
                time.sleep(1.0)

    def phase(self, case: str, guards: bool, seconds: float, enforce_every: float) -> dict:
        if case == "bulk" and guards:
            size, _ = self.noisy_facts()
            self.add_bot(NOISY, max_size=f"{size // 2**20 + QUOTA_HEADROOM_MB}MB")
        mode = ["--pgbouncer"] if self.pgbouncer else []
        good = [start_child(["--child", f"good:{name}:{i}", "--rate", str(self.rate), *mode], env)
                for i, (name, env) in enumerate(self.good_envs())]
        noisy_proc = start_child(["--child", case, "--storm", str(self.storm), *mode], self.env(NOISY)) if case != "quiet" else None
        try:
            for i, child in enumerate(good):
                await_ready(child, f"good bot {i + 1}")
            if noisy_proc is not None:
                await_ready(noisy_proc, f"the noisy bot ({case})")
        except BaseException:
            for child in good + ([noisy_proc] if noisy_proc else []):
                child.kill()
                child.wait()
            raise
        size0, temp0 = self.noisy_facts()
        busy0, total0 = cpu_times()
        bouncer_pid = self.bouncer.pid if self.bouncer is not None else None
        bouncer0 = process_cpu_s(bouncer_pid)
        noisy_pid = noisy_proc.pid if noisy_proc is not None else None
        noisy_cpu0 = process_cpu_s(noisy_pid)
        peaks, quota_log = asyncio.run(good_phase(
            self, seconds, good + ([noisy_proc] if noisy_proc else []), enforce_every if (case == "bulk" and guards) else None))
        busy1, total1 = cpu_times()
        bouncer_cpu = 100.0 * (process_cpu_s(bouncer_pid) - bouncer0) / seconds if bouncer_pid else None
        noisy_cpu = 100.0 * (process_cpu_s(noisy_pid) - noisy_cpu0) / seconds  # its client side (its process, still running)
        reports = [collect(child) for child in good]
        stats = GoodStats()
        for rep in reports:
            if rep is None:
                stats.errors["no report from a good bot"] += 1
                continue
            stats.latencies += rep["latencies"]
            stats.connects += rep["connects"]
            stats.errors.update(rep["errors"])
        own_cpu = 100.0 * sum(rep["cpu_s"] for rep in reports if rep) / seconds
        noisy = {}
        if noisy_proc is not None:
            noisy = collect(noisy_proc) or {"ops": {}, "errors": {"no report from the noisy bot": 1}, "extra": {}}
        time.sleep(1.0)  # the statistics of its last transactions
        size1, temp1 = self.noisy_facts()
        self.reset_after(case, guards)
        return {"case": case, "guards": guards, "stats": stats, "peaks": peaks, "quota": quota_log, "noisy": noisy,
                "growth": size1 - size0, "temp": temp1 - temp0, "cpu": 100.0 * (busy1 - busy0) / max(1, total1 - total0), "own_cpu": own_cpu,
                "bouncer_cpu": bouncer_cpu, "noisy_cpu": noisy_cpu}


# ---------------------------------------------------------------- report
def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if abs(n) < 10 * 2**30 else f"{n / 2**30:.1f} GB"


def noisy_text(r: dict) -> str:
    if r["case"] == "quiet":
        return "-"
    n = r["noisy"]
    parts = [", ".join(f"{v} {k}" for k, v in n.get("ops", {}).items()) or "nothing done"]
    errs = n.get("errors", {})
    parts.append("errors: " + (", ".join(f"{v} x {k}" for k, v in sorted(errs.items(), key=lambda kv: -kv[1])) if errs else "none"))
    if r["case"] == "lock":
        parts.append(f"longest idle transaction {r['peaks'].get('idle_xact_s', 0):.0f} s, "
                     f"up to {r['peaks'].get('lock_waiters', 0)} sessions waiting on its lock")
    parts.append(f"peak {r['peaks'].get('noisy', 0)} conns (server {r['peaks'].get('all', 0)})"
                 if r.get("bouncer_cpu") is None else
                 f"peak {r['peaks'].get('noisy', 0)} server conns from PgBouncer (server {r['peaks'].get('all', 0)})")
    parts.append(f"its own process {r['noisy_cpu']:.0f}% CPU")
    if r["temp"]:
        parts.append(f"temp {mb(r['temp'])}")
    if r["case"] == "bulk":
        parts.append(f"db +{mb(r['growth'])}")
    if r["quota"]:
        q = r["quota"]
        parts.append(f"suspended by quota enforce at {q['suspended_s']} s ({mb(q['size'])} > {mb(q['max_size'])}, "
                     f"{q['ended']} sessions ended)")
    return "; ".join(parts)


def report(results: list[dict]) -> None:
    # The quiet phases of both modes pooled: the guards change nothing for bots that behave, and one
    # quiet phase's p99 is a handful of requests, easily moved by the machine's other load.
    quiet = [x for r in results if r["case"] == "quiet" for x in r["stats"].latencies]
    qp99 = pct(quiet, 99) * 1000
    bouncer = any(r.get("bouncer_cpu") is not None for r in results)
    header = ("case", "guards", "requests", "p50 ms", "p99 ms", "p99/quiet", "errors", "connect p99 ms", "CPU busy", "bots' CPU",
              *(("pgbouncer CPU",) if bouncer else ()), "goal", "noisy bot")
    rows = []
    for r in results:
        s = r["stats"]
        p99 = pct(s.latencies, 99) * 1000
        errs = sum(s.errors.values())
        ratio = p99 / qp99 if qp99 else float("nan")
        goal = "-" if r["case"] == "quiet" or not r["guards"] else ("met" if ratio <= 2 and errs == 0 else "missed")
        err_text = str(errs) + (" (" + ", ".join(f"{v} {k}" for k, v in s.errors.most_common()) + ")" if errs else "")
        rows.append((CASE_TITLES[r["case"]], "on" if r["guards"] else "off", str(len(s.latencies)),
                     f"{pct(s.latencies, 50) * 1000:.1f}", f"{p99:.1f}", f"{ratio:.1f}x", err_text,
                     f"{pct(s.connects, 99) * 1000:.0f}", f"{r['cpu']:.0f}%", f"{r['own_cpu']:.0f}%",
                     *((f"{r['bouncer_cpu']:.0f}%",) if bouncer else ()), goal, noisy_text(r)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])


def pgbouncer_facts(ini: Path) -> str:
    version = subprocess.run([pgbouncers.binary(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lacks = [what for what, since in (("max_prepared_statements (unnamed statements)", (1, 21)),
                                      ("the per-bot client cap max_user_client_connections (1.24)", (1, 24)))
             if pgbouncers.version() < since]
    caps = sorted(set(re.findall(r"max_user_client_connections=(\d+)", ini.read_text())), key=int)
    per_bot = pgbouncers.ini_value(ini, "default_pool_size")
    return (f"{version}, pool_mode {pgbouncers.ini_value(ini, 'pool_mode')}, {per_bot} server connection(s) per bot "
            f"(pgbouncer_pool_size), max_client_conn {pgbouncers.ini_value(ini, 'max_client_conn')}, "
            f"per-bot client cap (max_user_client_connections) {'/'.join(caps) or 'none'}, "
            f"botfleet's rendered pgbouncer.ini without TLS{''.join(', ' + w for w in lacks)}")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return f"{os.cpu_count()} CPUs ({model}), {mem / 1024:.0f} GB RAM, load average {os.getloadavg()[0]:.2f} at start"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", type=int, default=8, help="well-behaved bots")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=5.0, help="requests a second per good bot")
    parser.add_argument("--storm", type=int, default=150, help="connections the noisy bot opens at once (case 4)")
    parser.add_argument("--enforce-every", type=float, default=2.0, help="seconds between quota enforce runs (case 5, with guards)")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
    parser.add_argument("--parallel", type=int, default=0,
                        help="max_parallel_workers_per_gather (0, as the stack's postgres; 2 is PostgreSQL's default)")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="every bot through PgBouncer (transaction pooling, botfleet's rendered pgbouncer.ini for the fleet)")
    parser.add_argument("--userlist-verifiers", action="store_true",
                        help="with --pgbouncer: PgBouncer's userlist holds the roles' SCRAM secrets as the server stores "
                             "them, not the passwords (no key derivation per login; an experiment: render writes passwords)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    if args.pgbouncer:
        pgbouncers.require()
    host = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_noisy") as tmp:
        bench = None
        try:
            say("starting a private embedded PostgreSQL and provisioning the fleet ...")
            bench = Bench(Path(tmp), args.bots, args.rate, args.storm, args.parallel, args.pgbouncer, args.userlist_verifiers)
            settings_on = bench.configure(True)
            bench.prepare_data()
            if args.pgbouncer:
                bench.start_pgbouncer()
                bouncer = pgbouncer_facts(bench.bouncer_ini)
                say(f"PgBouncer: {bouncer}")
            version = bench.server.status().version
            say(f"guards on: noisy role: {settings_on}")
            mode = True
            for case in ("quiet", *cases):  # on and off back to back, so the machine's other load hits both alike
                for guards in (True, False):
                    if guards != mode:
                        settings = bench.configure(guards)
                        say(f"guards {'on' if guards else 'off'}: noisy role: {settings}")
                        if args.pgbouncer:
                            say(f"  PgBouncer's server connections ended: {bench.end_pooled_server_connections()}")
                        mode = guards
                    say(f"  {case} ({args.seconds:g} s) ...")
                    results.append(bench.phase(case, guards, args.seconds, args.enforce_every))
            results.sort(key=lambda r: (not r["guards"], ("quiet", *cases).index(r["case"])))
        finally:
            if bench is not None:
                bench.stop_pgbouncer()
                bench.server.destroy()
    print(f"machine: {host}; shared with other work (load average {os.getloadavg()[0]:.2f} at the end)")
    print(f"server: embedded PostgreSQL {version} (private cluster), max_connections {bench.max_connections}, "
          f"max_parallel_workers_per_gather {args.parallel}, "
          f"server defaults otherwise (work_mem 4MB, shared_buffers 128MB)")
    print(f"fleet: {args.bots} good bots x {args.rate:g} req/s (80% indexed read, 20% one-row insert) + 1 new connection/s "
          f"each; 1 noisy bot; {args.seconds:g} s per phase")
    print(f"guards on:  {settings_on}; case 5: --max-size (size at start + {QUOTA_HEADROOM_MB} MB), "
          f"quota enforce every {args.enforce_every:g} s")
    if args.pgbouncer:
        print(f"connections: every bot (its pool, its new connections, the storm) through PgBouncer: {bouncer}")
    else:
        print("connections: every bot straight to the server")
    print("guards off: [defaults] empty, statement/idle-in-transaction timeouts 0, CONNECTION LIMIT -1, no quota")
    print("goal (guards on): good bots' p99 <= 2x the quiet baseline and 0 errors\n")
    report(results)
    quiet = [x for r in results if r["case"] == "quiet" for x in r["stats"].latencies]
    print(f"\np99/quiet: against the two quiet phases pooled ({len(quiet)} requests, p50 {pct(quiet, 50) * 1000:.1f} ms, "
          f"p99 {pct(quiet, 99) * 1000:.1f} ms).", end="")
    print(" CPU busy: the whole machine's (all CPUs), from /proc/stat; bots' CPU: the good bots' processes together, in % of one CPU. The guards bound memory, temp files, time, locks, "
          "connections and storage; none of them shares out CPU, so a CPU-bound neighbour (a scan or sort storm) "
          "slows the others on a 2-core machine whatever they are.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
