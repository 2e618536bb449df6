"""What does one `provision top` / `provision metrics` sample cost, for fleets of growing size?

Run by hand from the repository root (it is a benchmark, not a test):

    .venv/bin/python bench/bench_top.py [--bots 10,50,200] [--sessions 2] [--samples 50] [--admin-url URL]

Without --admin-url a throw-away embedded server is started in a temporary folder and destroyed
at the end. For the largest fleet it creates that many bot-like databases and login roles
(bench<random6>_<i>_db / _user), with --sessions idle sessions on each of the first 20 bots and
one session of the first bot waiting on a row lock another of its sessions holds; then, for each
fleet size, it times --samples calls of ``monitor.sample`` (the read `top` and `metrics` do per
refresh: a fixed handful of queries, whatever the fleet's size) and of ``monitor.exposition``
(the text) over one admin connection, and prints p50/p99, the statements per sample, and the time of the database sizes alone.
Goal: a constant number of statements per sample whatever the fleet's size, and a sample of a
200-bot fleet that costs a small fraction of a 2 s refresh (a 15 s scrape: less still). Everything it creates is dropped at the end, even on error or Ctrl-C.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from provisioning import monitor
from provisioning.db import as_role
from provisioning.passwords import scram_verifier

BUSY_BOTS = 20  # bots that get idle sessions (the server's max_connections bounds the rest)
PASSWORD = secrets.token_hex(16)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Counting:
    """Counts the statements an admin connection runs (psycopg's execute)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn, self.count = conn, 0

    def execute(self, *args, **kwargs):
        self.count += 1
        return self.conn.execute(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def create(admin: psycopg.Connection, stem: str, n: int) -> list[monitor.Watched]:
    bots = []
    for i in range(n):
        w = monitor.Watched(f"{stem}-{i}", f"{stem}_{i}_db", f"{stem}_{i}_user")
        verifier = scram_verifier(admin, PASSWORD, w.role)  # the password reaches the server only as a verifier
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(w.role), sql.Literal(verifier)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(w.database), sql.Identifier(w.role)))
        bots.append(w)
        if (i + 1) % 25 == 0:
            say(f"  {i + 1} of {n} bots created")
    return bots


def drop(admin_url: str, stem: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        dbs = [r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{stem}\\_%",))]
        for name in dbs:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        roles = [r[0] for r in admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"{stem}\\_%",))]
        for name in roles:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", default="10,50,200", help="fleet sizes, comma-separated (default 10,50,200)")
    parser.add_argument("--sessions", type=int, default=2, help=f"idle sessions on each of the first {BUSY_BOTS} bots")
    parser.add_argument("--samples", type=int, default=50, help="timed samples per fleet size (default 50)")
    parser.add_argument("--admin-url", help="a superuser URL; default: a throw-away embedded server")
    args = parser.parse_args()
    sizes = sorted({int(x) for x in args.bots.split(",") if x.strip()})
    if not sizes or sizes[0] < 1 or args.samples < 1 or args.sessions < 0:
        parser.error("--bots, --samples must be positive, --sessions at least 0")

    server = tmp = None
    stem = f"bench{secrets.token_hex(3)}"
    sessions: list[psycopg.Connection] = []
    waiting: threading.Thread | None = None
    admin_url = args.admin_url
    try:
        if not admin_url:
            from provisioning.embedded import EmbeddedServer

            tmp = tempfile.TemporaryDirectory(prefix="bench-top-")
            say("starting an embedded server ...")
            server = EmbeddedServer(Path(tmp.name) / ".botfleet")
            server.start()
            admin_url = server.admin_url()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            version = admin.execute("SHOW server_version").fetchone()[0]
            say(f"creating {sizes[-1]} bots ...")
            bots = create(admin, stem, sizes[-1])
            for w in bots[:BUSY_BOTS]:
                for _ in range(args.sessions):
                    sessions.append(psycopg.connect(as_role(admin_url, w.role, PASSWORD, w.database), autocommit=True))
            first = bots[0]
            holder = psycopg.connect(as_role(admin_url, first.role, PASSWORD, first.database))
            sessions.append(holder)
            holder.execute("CREATE TABLE t (id int PRIMARY KEY)")
            holder.execute("INSERT INTO t VALUES (1)")
            holder.commit()
            holder.execute("UPDATE t SET id = 1 WHERE id = 1")  # held, idle in transaction
            waiter = psycopg.connect(as_role(admin_url, first.role, PASSWORD, first.database), autocommit=True)
            sessions.append(waiter)
            waiting = threading.Thread(target=lambda: _quietly(waiter, "UPDATE t SET id = 1 WHERE id = 1"), daemon=True)
            waiting.start()
            time.sleep(0.5)

            counting = Counting(admin)
            rows = []
            for n in sizes:
                watched = bots[:n]
                monitor.sample(admin, "default", watched)  # warm-up
                times, text_times = [], []
                counting.count = 0
                for _ in range(args.samples):
                    t0 = time.perf_counter()
                    s = monitor.sample(counting, "default", watched)  # type: ignore[arg-type]
                    t1 = time.perf_counter()
                    monitor.exposition([s])
                    text_times.append((time.perf_counter() - t1) * 1000)
                    times.append((t1 - t0) * 1000)
                waits = sum(len(b.lock_waits) for b in s.bots)
                names = [w.database for w in watched]
                size_times = []
                for _ in range(args.samples):  # the part of a sample that grows with the fleet: each database's files
                    t0 = time.perf_counter()
                    admin.execute("SELECT pg_database_size(datname) FROM pg_database WHERE datname = ANY(%s)",
                                  (names,)).fetchall()
                    size_times.append((time.perf_counter() - t0) * 1000)
                rows.append((n, counting.count / args.samples, percentile(times, 50), percentile(times, 99),
                             percentile(size_times, 50), statistics.fmean(text_times), waits))
        holder.rollback()
        waiting.join(timeout=30)  # its connection is closed below, never while it is in use

        print(f"one top/metrics sample over one admin connection, PostgreSQL {version}, "
              f"{len(sessions)} bot sessions open (one waiting on a lock), {args.samples} samples per size")
        print()
        print(f"| {'bots':>5} | {'statements':>10} | {'sample p50 ms':>13} | {'sample p99 ms':>13} | "
              f"{'sizes p50 ms':>12} | {'text mean ms':>12} | {'lock waits seen':>15} |")
        print(f"|{'-' * 7}|{'-' * 12}|{'-' * 15}|{'-' * 15}|{'-' * 14}|{'-' * 14}|{'-' * 17}|")
        for n, statements, p50, p99, sizes_ms, text_ms, waits in rows:
            print(f"| {n:>5} | {statements:>10.0f} | {p50:>13.2f} | {p99:>13.2f} | {sizes_ms:>12.2f} | "
                  f"{text_ms:>12.2f} | {waits:>15} |")
        print()
        print("statements: per sample, whatever the fleet's size; sizes: pg_database_size of the watched")
        print("databases alone (it lists each database's files), the part of a sample that grows with the fleet.")
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if waiting is not None and waiting.is_alive():
            sessions[-2].rollback()  # the holder: the waiter goes on and ends
            waiting.join(timeout=30)
        for conn in sessions:
            conn.close()
        if admin_url:
            try:
                drop(admin_url, stem)
            except Exception as err:  # noqa: BLE001 - report, keep cleaning
                say(f"warning: could not drop the {stem}_* databases and roles: {err}")
        if server is not None:
            say("destroying the embedded server ...")
            server.destroy()
        if tmp is not None:
            tmp.cleanup()


def _quietly(conn: psycopg.Connection, query: str) -> None:
    try:
        conn.execute(query)
    except psycopg.Error:
        pass


if __name__ == "__main__":
    sys.exit(main())
