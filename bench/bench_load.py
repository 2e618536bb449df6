"""Load test: 12 bots on one PostgreSQL with a small max_connections, through the shared data layer.

Run by hand; prints a table (no timing is asserted in tests):

    .venv/bin/python bench/bench_load.py                      # 12 bots, 20 concurrent requests each, 10 s a run
    .venv/bin/python bench/bench_load.py --seconds 20 --concurrency 40

A throwaway embedded PostgreSQL (its own data folder and port; the machine's
server is not touched) gets max_connections from botfleet's budget for the
fleet (reserve + 12 x 6 = 77 -> 80). Bots are provisioned with the real
``commands.provision_on`` (own database, own role, CONNECTION LIMIT 6) and each is
driven by more concurrent requests than its pool, for a bounded time. Each
request is one unit of work: an INSERT and a 5 ms pg_sleep in a transaction.

Three runs:
1. botfleet: pools 2+3 (the fleet default), the roles' connection limits;
2. SQLAlchemy's default pools (5+10), the same role limits;
3. SQLAlchemy's default pools, no role limits (a fleet set up by hand).

Per run: requests done, errors (by kind), p50/p99 latency of the successful
ones, and the peak number of client connections seen in pg_stat_activity
(polled every 20 ms). Also printed: the private memory of an idle bot backend
(PSS), which budget.py's per-connection cost is based on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy import text  # noqa: E402

from provisioning import budget as budgets  # noqa: E402
from provisioning.commands import BotOptions, provision_on  # noqa: E402
from provisioning.db import connect  # noqa: E402
from provisioning.embedded import EmbeddedServer  # noqa: E402
from provisioning.project import Project  # noqa: E402
from provisioning.servers import Servers  # noqa: E402
from shared.database import Database  # noqa: E402
from shared.settings import DatabaseSettings  # noqa: E402


def start_server(state: Path, max_connections: int) -> EmbeddedServer:
    server = EmbeddedServer(state)
    server.init()
    with open(server.pgdata / "postgresql.conf", "a") as fh:  # after the include: wins
        fh.write(f"\n# bench_load\nmax_connections = {max_connections}\nsuperuser_reserved_connections = "
                 f"{budgets.SUPERUSER_RESERVED}\nshared_buffers = 32MB\n")
    server.start()
    return server


def provision(server: EmbeddedServer, project: Path, bots: int) -> list[tuple[str, dict[str, str]]]:
    port = server.status().port
    out = []
    proj = Project(project)
    with Servers(proj, server.admin_url()).opened() as admin:
        for i in range(bots):
            name = f"bench-load-{i:02d}"
            provision_on(admin, proj, name, BotOptions(db_host="127.0.0.1", db_port=port))
            out.append((name, proj.env(name).values))
    return out


def set_role_limits(server: EmbeddedServer, bots, limit: int | None) -> None:
    with connect(server.admin_url()) as conn:
        for name, _env in bots:
            role = name.replace("-", "_") + "_user"
            value = -1 if limit is None else limit
            conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(role), sql.Literal(value)))


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()


def classify(err: BaseException) -> str:
    msg = str(err).lower()
    if "too many clients" in msg:
        return "too many clients"
    if "too many connections for role" in msg:
        return "role limit"
    if "too many connections" in msg and "role" not in msg:
        return "too many clients"
    if "remaining connection slots are reserved" in msg:
        return "slots reserved for superusers"
    if type(err).__name__ == "TimeoutError" and "queuepool" in msg:
        return "pool timeout"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"


async def worker(db: Database, stats: Stats, deadline: float, max_requests: int) -> None:
    for _ in range(max_requests):
        if time.monotonic() >= deadline:
            return
        t0 = time.perf_counter()
        try:
            async with db.unit_of_work() as session:
                await session.execute(text("INSERT INTO hits DEFAULT VALUES"))
                await session.execute(text("SELECT pg_sleep(0.005)"))
            stats.latencies.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - counted, the load goes on
            stats.errors[classify(err)] += 1
            await asyncio.sleep(0.01)


async def monitor(admin: psycopg.AsyncConnection, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        row = await (await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )).fetchone()
        peak[0] = max(peak[0], row[0])
        await asyncio.sleep(0.02)


async def one_run(server, bots, *, pool: tuple[int, int], seconds: float, concurrency: int) -> dict:
    dbs = []
    for name, env in bots:
        settings = DatabaseSettings.from_env(name, {**env, "DB_POOL_SIZE": str(pool[0]), "DB_MAX_OVERFLOW": str(pool[1])})
        dbs.append(Database(settings, application_name=name))
    for db in dbs:  # the bot's table, created as the bot's own role
        async with db.unit_of_work() as session:
            await session.execute(text("CREATE TABLE IF NOT EXISTS hits (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())"))
    for db in dbs:
        await db.engine.dispose()
    admin = await psycopg.AsyncConnection.connect(server.admin_url(), autocommit=True)
    stop, peak, stats = asyncio.Event(), [0], Stats()
    mon = asyncio.create_task(monitor(admin, stop, peak))
    deadline = time.monotonic() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(db, stats, deadline, 100_000) for db in dbs for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    stop.set()
    await mon
    pss = await backend_pss(admin)
    await admin.close()
    for db in dbs:
        await db.dispose()
    lat = sorted(stats.latencies)
    return {
        "requests": len(lat), "errors": sum(stats.errors.values()), "kinds": dict(stats.errors),
        "p50": statistics.median(lat) * 1000 if lat else float("nan"),
        "p99": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else float("nan"),
        "peak": peak[0], "rps": len(lat) / elapsed, "pss_kb": pss,
    }


async def backend_pss(admin) -> int | None:
    """Median proportional memory (PSS) of the bots' backends still open, in kB (Linux, same machine)."""
    rows = await (await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename LIKE 'bench_load_%'")).fetchall()
    values = []
    for (pid,) in rows:
        try:
            text_ = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        values += [int(line.split()[1]) for line in text_.splitlines() if line.startswith("Pss:")]
    return int(statistics.median(values)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent requests per bot (more than its pool)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    args = parser.parse_args()

    need = budgets.SUPERUSER_RESERVED + budgets.PROVISIONER_MARGIN + args.bots * 6
    max_connections = -(-need // 10) * 10
    with tempfile.TemporaryDirectory(prefix="bench_load") as tmp:
        server = start_server(Path(tmp) / ".botfleet", max_connections)
        try:
            bots = provision(server, Path(tmp) / "project", args.bots)
            print(f"server: embedded PostgreSQL {server.status().version}, max_connections {max_connections} "
                  f"({budgets.SUPERUSER_RESERVED} reserved for superusers); {args.bots} bots x {args.concurrency} "
                  f"concurrent requests, {args.seconds:g} s per run")
            print(f"botfleet budget: {need} connections (reserve {need - args.bots * 6} + {args.bots} x 6)\n")
            runs = []
            runs.append(("botfleet pools 2+3, role limit 6", asyncio.run(
                one_run(server, bots, pool=(2, 3), seconds=args.seconds, concurrency=args.concurrency))))
            runs.append(("SQLAlchemy defaults 5+10, role limit 6", asyncio.run(
                one_run(server, bots, pool=(5, 10), seconds=args.seconds, concurrency=args.concurrency))))
            set_role_limits(server, bots, None)
            runs.append(("SQLAlchemy defaults 5+10, no role limit", asyncio.run(
                one_run(server, bots, pool=(5, 10), seconds=args.seconds, concurrency=args.concurrency))))
        finally:
            server.destroy()
    header = ("run", "requests", "req/s", "errors", "p50 ms", "p99 ms", "peak conns", "error kinds")
    rows = [(name, str(r["requests"]), f"{r['rps']:.0f}", str(r["errors"]), f"{r['p50']:.1f}", f"{r['p99']:.1f}",
             f"{r['peak']} / {max_connections}", ", ".join(f"{k}: {v}" for k, v in sorted(r["kinds"].items())) or "-")
            for name, r in runs]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    pss = runs[0][1]["pss_kb"]
    if pss:
        print(f"\nan idle bot backend after the run: {pss / 1024:.1f} MB PSS "
              f"(budget.py counts {budgets.BACKEND_KB / 1024:g} MB a connection, work_mem only for the active ones; "
              "bench_budget.py measures it without the shared-memory share)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
