"""How botfleet's commands scale with the fleet: 10, 100, 300 (1,000) bots on one server.

    .venv/bin/python bench/bench_scale.py                       # fleets of 10, 100 and 300 bots
    .venv/bin/python bench/bench_scale.py --sizes 10,100,300,1000 --runs 3
    .venv/bin/python bench/bench_scale.py --sizes 300 --keep /tmp/fleet300   # keep the fleet (profiling)

Each fleet gets a PRIVATE embedded server in a temporary folder (its max_connections raised
with ALTER SYSTEM and a restart, never on a shared server) and is built in-process through
``commands.add_bot`` (pool 1+0, code chat-bot, not migrated), then migrated once with
``provision migrate --all`` and rendered (none of that is timed). Then, each a real
``provision`` process (ADMIN_DATABASE_URL in its environment), median of --runs:

- one more ``add-bot --no-migrate`` (and the same call in-process), ``add-bot`` migrated,
  ``remove-bot`` (of the bot just added, --no-backup);
- the fleet-wide commands ``render``, ``plan``, ``doctor``, ``migrate --all`` (nothing pending),
  ``list``, ``budget``, with their time per bot;
- the floor of a fleet-wide read, in the benchmark's own process: one connection into each bot
  database through the same bounded pool (8 at a time) and a ``SELECT 1``;

each the median of its wall times and of its process's CPU times (user + system, "wall / CPU" in
the table), and, for each, the peak number of client connections on the server (pg_stat_activity,
sampled every 10 ms from a connection of the benchmark's own, which is not counted) and the
peak of the command's open file descriptors (/proc/PID/fd). It prints one table. Nothing is
asserted: the figures are for the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from provisioning import db, pool
from provisioning.commands import BotOptions, add_bot
from provisioning.embedded import EmbeddedServer
from provisioning.project import Project
from provisioning.servers import Servers

REPO = Path(__file__).resolve().parents[1]
PROVISION = str(Path(sys.executable).with_name("provision"))
POOL = ["--pool-size", "1", "--max-overflow", "0", "--code", "chat-bot"]
OPTS = dict(pool_size=1, max_overflow=0, code="chat-bot")
FLEET_WIDE = [
    ("render", ["render"]),
    ("plan", ["plan"]),
    ("doctor", ["doctor"]),
    ("migrate --all", ["migrate", "--all"]),
    ("list", ["list"]),
    ("budget", ["budget"]),
]


FLOOR = "floor: connect to each bot database + SELECT 1"
IN_PROCESS = ("add-bot --no-migrate in-process", FLOOR)  # timed in the benchmark's own process


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Sampler:
    """Peak client connections on the server and open fds of one process, while it runs."""

    def __init__(self, url: str):
        self.conn = db.connect(url)
        self.pid: int | None = None
        self.peak_conns = 0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            n = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                  "AND pid <> pg_backend_pid()").fetchone()[0]
            self.peak_conns = max(self.peak_conns, n)
            if self.pid is not None:
                try:
                    self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.pid}/fd")))
                except OSError:
                    pass
            time.sleep(0.01)

    def __enter__(self) -> "Sampler":
        self.peak_conns = self.peak_fds = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


# The CPU time (user + system) of the last run_cli's process, children included.
last_cpu = 0.0


def run_cli(root: Path, url: str, args: list[str], sampler: Sampler, *, ok=(0,)) -> float:
    """Wall time of one ``provision`` process (its CPU time in ``last_cpu``). It runs as an
    installed botfleet does, from byte-compiled modules: PYTHONDONTWRITEBYTECODE is dropped from
    its environment (set, every run compiled every module of botfleet's again: 0.1-0.4 s)."""
    global last_cpu
    env = {k: v for k, v in os.environ.items() if k not in ("BOTFLEET_HOME", "PYTHONDONTWRITEBYTECODE")}
    env["ADMIN_DATABASE_URL"] = url
    with sampler:
        before = os.times()
        start = time.perf_counter()
        proc = subprocess.Popen([PROVISION, *args, "--project-dir", str(root)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sampler.pid = proc.pid
        out, err = proc.communicate()
        elapsed = time.perf_counter() - start
        after = os.times()
        sampler.pid = None
    last_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode not in ok:
        raise RuntimeError(f"provision {' '.join(args)} exited {proc.returncode}: {(err or out).strip()[-400:]}")
    return elapsed


def build(root: Path, n: int) -> str:
    """A fleet of ``n`` chat-bots on a private embedded server in ``root``; returns its admin URL."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("bots", "migrations"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    server = EmbeddedServer(root / ".botfleet")
    server.start()
    url = server.admin_url()
    needed = 2 * n + 120  # each bot's limit is 1 + 0 + 1 (migrations), plus this benchmark's own
    with db.connect(url) as conn:
        if int(conn.execute("SHOW max_connections").fetchone()[0]) < needed:
            conn.execute(sql.SQL("ALTER SYSTEM SET max_connections = {}").format(sql.Literal(needed)))
            restart = True
        else:
            restart = False
    if restart:
        server.stop()
        server.start()
    project = Project(root)
    servers = Servers(project, url)
    t0 = time.perf_counter()
    for i in range(n):
        add_bot(project, servers, f"s{i:04d}", BotOptions(**OPTS), migrate=False)
        if (i + 1) % 100 == 0:
            say(f"  {i + 1}/{n} bots ({time.perf_counter() - t0:.0f} s)")
    sampler = Sampler(url)
    run_cli(root, url, ["migrate", "--all"], sampler)
    run_cli(root, url, ["render", "--postgres-memory", "256G", "--allow-missing-config"], sampler)
    sampler.conn.close()
    return url


def median_of(runs: int, fn, label: str = "") -> tuple[float, int, int, float]:
    """Median wall time, peak connections, peak fds, median CPU time of ``fn``'s runs; ``fn``
    returns (wall, connections, fds, cpu)."""
    times, conns, fds, cpus = [], [], [], []
    for _ in range(runs):
        t, c, f, cpu = fn()
        times.append(t)
        conns.append(c)
        fds.append(f)
        cpus.append(cpu)
    result = statistics.median(times), max(conns), max(fds), statistics.median(cpus)
    say(f"    {label}: {result[0]:.2f} s ({result[3]:.2f} s CPU), {result[1]} connections, {result[2]} fds")
    return result


def measure(root: Path, url: str, n: int, runs: int) -> dict[str, tuple[float, int, int, float]]:
    sampler = Sampler(url)
    out: dict[str, tuple[float, int, int, float]] = {}
    counter = iter(range(10_000))

    def cli(args: list[str], ok=(0,)):
        def one():
            t = run_cli(root, url, args, sampler, ok=ok)
            return t, sampler.peak_conns, sampler.peak_fds, last_cpu
        return one

    def add_remove(migrate: bool, key: str):
        def one():
            name = f"x{next(counter):04d}"
            flags = [] if migrate else ["--no-migrate"]
            t = run_cli(root, url, ["add-bot", name, *POOL, *flags], sampler)
            peak = sampler.peak_conns, sampler.peak_fds, last_cpu
            tr = run_cli(root, url, ["remove-bot", name, "--yes", "--no-backup"], sampler)
            removes.append((tr, sampler.peak_conns, sampler.peak_fds, last_cpu))
            return t, *peak
        return one

    removes: list[tuple[float, int, int, float]] = []
    out["add-bot --no-migrate"] = median_of(runs, add_remove(False, "add"), "add-bot --no-migrate")
    out["add-bot (migrated)"] = median_of(runs, add_remove(True, "add-m"), "add-bot (migrated)")
    out["remove-bot"] = (statistics.median(r[0] for r in removes), max(r[1] for r in removes),
                         max(r[2] for r in removes), statistics.median(r[3] for r in removes))

    project = Project(root)
    servers = Servers(project, url)

    def in_process():
        name = f"y{next(counter):04d}"
        start, cpu = time.perf_counter(), time.process_time()
        add_bot(project, servers, name, BotOptions(**OPTS), migrate=False)
        t, cpu = time.perf_counter() - start, time.process_time() - cpu
        run_cli(root, url, ["remove-bot", name, "--yes", "--no-backup"], sampler)
        return t, 0, 0, cpu
    out["add-bot --no-migrate in-process"] = median_of(runs, in_process, "add-bot in-process")
    for label, args in FLEET_WIDE:
        # plan: exit 0 (nothing to apply); doctor: 0, or 1 on a finding
        out[label] = median_of(runs, cli(args, ok=(0, 1) if label == "doctor" else (0,)), label)

    def floor():
        """What any fleet-wide read costs at least: one connection into each bot database (as the
        admin, through the same bounded pool) and one SELECT 1, nothing else."""
        databases = [e.database for e in Project(root).fleet.bots.values()]

        def visit(database: str) -> None:
            with db.connect(db.with_database(url, database)) as conn:
                conn.execute("SELECT 1").fetchone()
        start, cpu = time.perf_counter(), time.process_time()
        pool.visit(databases, visit, pool.MAX_JOBS)
        return time.perf_counter() - start, 0, 0, time.process_time() - cpu
    out[FLOOR] = median_of(runs, floor, FLOOR)
    sampler.conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,300", help="fleet sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the (one) fleet here and keep it; time nothing")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.keep:
        t0 = time.perf_counter()
        url = build(args.keep, sizes[0])
        say(f"fleet of {sizes[0]} in {args.keep} ({time.perf_counter() - t0:.0f} s); ADMIN_DATABASE_URL={url}")
        return
    results: dict[int, dict[str, tuple[float, int, int, float]]] = {}
    build_times: dict[int, float] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bf-scale-{n}-") as tmp:
            root = Path(tmp) / "fleet"
            say(f"fleet of {n}: building")
            t0 = time.perf_counter()
            build(root, n)
            build_times[n] = time.perf_counter() - t0
            say(f"fleet of {n}: built in {build_times[n]:.0f} s; timing")
            try:
                url = EmbeddedServer(root / ".botfleet").admin_url()
                results[n] = measure(root, url, n, args.runs)
            finally:
                EmbeddedServer(root / ".botfleet").stop()
    labels = list(next(iter(results.values())))
    fleet_wide = {label for label, _ in FLEET_WIDE}
    head = ["command"] + [f"{n} bots" for n in sizes] + [f"per bot @{n}" for n in sizes if n >= 100]
    rows = []
    for label in labels:
        row = [label]
        for n in sizes:
            t, c, f, cpu = results[n][label]
            row.append(f"{t:.2f} s / {cpu:.2f} s" + (f" ({c} conn, {f} fd)" if label not in IN_PROCESS else ""))
        for n in sizes:
            if n >= 100:
                row.append(f"{results[n][label][0] / n * 1000:.1f} ms" if label in fleet_wide | {FLOOR} else "")
        rows.append(row)
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nfleet build (in-process add_bot, pool 1+0, then migrate --all and render): "
          + ", ".join(f"{n}: {build_times[n]:.0f} s" for n in sizes))


if __name__ == "__main__":
    main()
