"""The continuous archive against pg_dump/pg_restore: base backup, full recovery, one bot back in time, RPO.

Run by hand from the repository root; prints a table (no timing is asserted in tests):

    .venv/bin/python bench/bench_pitr.py                    # a 1 GB fleet (4 bots of 256 MB)
    .venv/bin/python bench/bench_pitr.py --size-mb 256 --bots 4

A throwaway fleet with its own embedded PostgreSQL (its own folder under /tmp, its own port; the
machine's server is not touched), driven through the real console script (`provision ...`), as an
operator would:

1. ``--bots`` bots, each filled to ``--size-mb / --bots`` of rows (a table with a primary key);
2. ``provision backup --server``: the archive set up and a base backup (Barman, pg_basebackup);
3. ``provision backup --all`` (pg_dump -Fc of every bot) and ``provision restore NAME FILE --yes``
   of every bot (pg_restore, one transaction each): the logical route, for the same data;
4. ``provision recover --server --into DIR --yes``: the whole server from the archive (base backup
   copied, WAL replayed, promoted, stopped);
5. ``provision restore bot-0 --to T --yes``: one bot back in time (scratch recovery, pg_dump of that
   bot, restore);
6. recovery point objective: a client commits one row per transaction as fast as it can; the server
   is killed with SIGKILL (postmaster and backends) mid-write; the archive is recovered to the
   latest WAL and the acknowledged commits are counted against the rows present. Once with
   ``[backup] synchronous = false`` (asynchronous streaming), once with it true, each on a small
   fleet of its own.

Everything it creates is deleted at the end, even on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from provisioning.archive import Archive  # noqa: E402
from provisioning.embedded import EmbeddedServer  # noqa: E402
from provisioning.pitr import running  # noqa: E402
from provisioning.project import Project  # noqa: E402

PROVISION = str(Path(sys.executable).with_name("provision"))
ROW_BYTES = 260  # about what one row of the fill below takes on disk, with its index entry


class Fleet:
    def __init__(self, folder: Path, name: str):
        self.root = folder / name
        self.root.mkdir()
        self.embedded = EmbeddedServer(self.root / ".botfleet")

    def run(self, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
        env.update(BOTFLEET_HOME=str(self.root), NO_COLOR="1")
        started = time.monotonic()
        proc = subprocess.run([PROVISION, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        took = time.monotonic() - started
        if check and proc.returncode != 0:
            raise SystemExit(f"provision {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return took, proc

    def bot(self, name: str) -> psycopg.Connection:
        conn = psycopg.connect(self.embedded.admin_url(), dbname=f"{name.replace('-', '_')}_db", autocommit=True)
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(f"{name.replace('-', '_')}_user")))
        return conn

    def add(self, names: list[str], synchronous: bool) -> None:
        for name in names:
            self.run("add-bot", name)
            with self.bot(name) as conn:
                conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL)")
        with open(self.root / "fleet.toml", "a") as fh:
            fh.write(f"\n[backup]\nsynchronous = {'true' if synchronous else 'false'}\n")

    def close(self) -> None:
        self.run("server", "stop", check=False)
        archive = Archive(Project(self.root))
        if archive.configured:
            archive.stop_receiver()
        self.embedded.destroy()


def fill(fleet: Fleet, name: str, mb: int) -> None:
    rows = mb * 2**20 // ROW_BYTES
    with fleet.bot(name) as conn:
        for start in range(0, rows, 200_000):
            # random hex: a dump compresses it about as much as real text, not 50:1 as a repeated value
            conn.execute("INSERT INTO items (v) SELECT md5(random()::text) || md5(random()::text) || "
                         "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(g::text) "
                         "FROM generate_series(%s::int, %s::int) g", (start, min(rows, start + 200_000) - 1))


def kill(embedded: EmbeddedServer) -> None:
    pid = embedded.status().pid
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                pass
    os.kill(pid, signal.SIGKILL)
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rpo(folder: Path, synchronous: bool, commits: int) -> tuple[int, int, float]:
    """(acknowledged, lost, seconds of acknowledged commits lost) after a kill -9."""
    fleet = Fleet(folder, f"rpo-{'sync' if synchronous else 'async'}")
    try:
        fleet.add(["rpo"], synchronous)
        fleet.run("backup", "--server")
        acked: list[tuple[int, float]] = []
        ready = threading.Event()

        def writer() -> None:
            try:
                with fleet.bot("rpo") as conn:
                    for i in range(10**7):
                        row = conn.execute("INSERT INTO items (v) VALUES ('x') RETURNING id").fetchone()
                        acked.append((row[0], time.time()))
                        if i == commits:
                            ready.set()
            except psycopg.Error:
                pass
            finally:
                ready.set()

        thread = threading.Thread(target=writer)
        thread.start()
        ready.wait()
        kill(fleet.embedded)
        thread.join()
        dest = folder / f"rpo-{'sync' if synchronous else 'async'}-recovered"
        fleet.run("recover", "--server", "--into", str(dest), "--yes")
        work = folder / f"work-{dest.name}"
        work.mkdir(mode=0o711)
        with running(dest, work) as scratch, psycopg.connect(scratch.url, dbname="rpo_db") as conn:
            present = {r[0] for r in conn.execute("SELECT id FROM items")}
        lost = [(i, t) for i, t in acked if i not in present]
        seconds = (acked[-1][1] - min(t for _, t in lost)) if lost else 0.0
        return len(acked), len(lost), seconds
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="the fleet's data, all bots together")
    parser.add_argument("--bots", type=int, default=4)
    parser.add_argument("--rpo-commits", type=int, default=2000, help="commits before the kill")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="botfleet-bench-pitr-"))
    folder.chmod(0o711)
    rows: list[tuple[str, str, str]] = []
    fleet = None
    try:
        fleet = Fleet(folder, "fleet")
        names = [f"bot-{i}" for i in range(args.bots)]
        fleet.add(names, synchronous=False)
        print(f"filling {args.bots} bots with {args.size_mb} MB ...", file=sys.stderr)
        for name in names:
            fill(fleet, name, args.size_mb // args.bots)
        with psycopg.connect(fleet.embedded.admin_url(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            total = sum(conn.execute("SELECT pg_database_size(%s)", (f"{n.replace('-', '_')}_db",)).fetchone()[0]
                        for n in names)
        rows.append(("fleet data (the bots' databases)", f"{total / 2**20:.0f} MB", f"{args.bots} bots"))

        took, _ = fleet.run("backup", "--server")
        rows.append(("base backup (backup --server, first: sets the archive up)", f"{took:.1f} s", "Barman, pg_basebackup"))
        took, _ = fleet.run("backup", "--server")
        rows.append(("base backup (backup --server, again)", f"{took:.1f} s", ""))
        took, _ = fleet.run("backup", "--all")
        dumps = sorted((fleet.root / "backups").rglob("*.dump"))
        rows.append(("pg_dump of every bot (backup --all)", f"{took:.1f} s",
                     f"{sum(p.stat().st_size for p in dumps) / 2**20:.0f} MB of dumps"))
        started = time.monotonic()
        for path in dumps:
            fleet.run("restore", path.parent.name, str(path), "--yes")
        rows.append(("pg_restore of every bot (restore NAME FILE --yes)", f"{time.monotonic() - started:.1f} s",
                     "each after its safety dump"))

        with fleet.bot(names[0]) as conn:
            conn.execute("INSERT INTO items (v) SELECT 'before' FROM generate_series(1, 100)")
        time.sleep(1.1)
        mark = dt.datetime.now(dt.timezone.utc)
        time.sleep(1.1)
        with fleet.bot(names[0]) as conn:
            conn.execute("DELETE FROM items WHERE v = 'before'")

        dest = folder / "recovered"
        took, _ = fleet.run("recover", "--server", "--into", str(dest), "--yes")
        rows.append(("full recovery (recover --server --into, latest)", f"{took:.1f} s", "copy, WAL replay, promote"))
        shutil.rmtree(dest)
        took, _ = fleet.run("restore", names[0], "--to", mark.isoformat(sep=" "), "--yes")
        with fleet.bot(names[0]) as conn:
            back = conn.execute("SELECT count(*) FROM items WHERE v = 'before'").fetchone()[0]
        rows.append((f"one bot back in time (restore {names[0]} --to T)", f"{took:.1f} s",
                     f"whole-server scratch recovery + dump/restore of one bot; {back} rows back"))
        fleet.close()
        fleet = None

        for synchronous in (False, True):
            acked, lost, seconds = rpo(folder, synchronous, args.rpo_commits)
            rows.append((f"RPO after kill -9, {'synchronous' if synchronous else 'asynchronous'} streaming",
                         f"{lost} commits", f"of {acked} acknowledged; {seconds:.2f} s of commits lost"))
    finally:
        if fleet is not None:
            fleet.close()
        shutil.rmtree(folder, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"{'what'.ljust(width)}  {'result':>12}  notes")
    for what, result, notes in rows:
        print(f"{what.ljust(width)}  {result:>12}  {notes}")


if __name__ == "__main__":
    main()
