"""How far is `provision add-bot` from the cost of the SQL it runs?

Run by hand from the repository root (it is a benchmark, not a test):

    .venv/bin/python bench/bench_provision.py [--bots N] [--admin-url URL] [--embedded]

The server is --admin-url, else ADMIN_DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/postgres; with --embedded a throw-away
embedded server is started in a temporary folder (its max_connections raised
to hold the N bots) and destroyed at the end.
N bots (default 40) named bench<random6>-NN are provisioned three ways, from
the same empty state each time (one warm-up CREATE DATABASE before (a), and
the drops and a CHECKPOINT before each mode, are not timed):

  (a) the floor: the same SQL as one file through ONE psql session;
  (b) provisioning.commands.provision_on in this process, one admin connection;
  (c) one `provision add-bot NAME` process per bot.

Each bot has the smallest pool (--pool-size 1 --max-overflow 0: a connection
limit of 2), because add-bot holds the connection budget: the fleet's limits
must fit the server's max_connections less superuser_reserved_connections
(40 bots on a server with max_connections 100). A --bots N that cannot fit is
refused before anything is created, with the number that fits.

It prints ms per bot and the ratios, then the median of 10 `provision --help`.
Everything it creates on the server is dropped at the end, even on error or
Ctrl-C. Progress goes to stderr, the table to stdout. On a busy machine the
numbers move by +-30% from run to run: run it twice before believing a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from provisioning import db, passwords
from provisioning.errors import ProvisionError
from provisioning.commands import BotOptions, provision_on
from provisioning.names import validate
from provisioning.project import Project
from provisioning.reconcile import DATABASE_ADMIN_MARGIN, marker
from provisioning.registry import BotEntry
from provisioning.servers import Servers

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PROVISION = str(Path(sys.executable).with_name("provision"))
# The smallest pool add-bot takes, the same in the three modes: each bot's connection limit is
# 1 + 0 + 1 (migrations), so a server with max_connections 100 holds 48 of them.
POOL = {"pool_size": 1, "max_overflow": 0}
POOL_FLAGS = ["--pool-size", "1", "--max-overflow", "0"]


def per_bot() -> int:
    """One bot's connection limit with POOL (what add-bot's budget counts)."""
    return BotEntry(name="bench", code="bench", **POOL).connection_limit


def require_room(url: str, bots: int) -> None:
    """Refuse (RuntimeError) a --bots that add-bot's connection budget would refuse midway."""
    with db.connect(url) as conn:
        max_connections, reserved = conn.execute(
            "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
        ).fetchone()
    fits = (max_connections - reserved) // per_bot()
    if bots > fits:
        raise RuntimeError(f"--bots {bots} needs {bots * per_bot()} connections; max_connections {max_connections} "
                           f"less {reserved} reserved holds {fits} bots: pass --bots {fits}, or --embedded "
                           "(its own server, sized to the bots)")


def size_embedded(server, bots: int) -> None:
    """Give the throw-away embedded server room for ``bots`` bots (a restart: not timed)."""
    needed = bots * per_bot() + 20
    with db.connect(server.admin_url()) as conn:
        if int(conn.execute("SHOW max_connections").fetchone()[0]) >= needed:
            return
        conn.execute(sql.SQL("ALTER SYSTEM SET max_connections = {}").format(sql.Literal(needed)))
    server.stop()
    server.start()
def progress(mode: str, done: int, total: int) -> None:
    """One line per mode on stderr: updated in place on a terminal, printed once otherwise."""
    if sys.stderr.isatty():
        print(f"\rmode {mode}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total:
        print(f"mode {mode}: {done}/{total}", file=sys.stderr, flush=True)


def drop_everything(url: str, prefix: str, *, checkpoint: bool = False) -> None:
    """Drop every database, then every role, whose name starts with ``prefix`` + '_'.

    With ``checkpoint``, flush dirty buffers too, so that no mode pays for the
    previous one's writes (DROP DATABASE checkpoints, but only when it drops).
    """
    like = prefix + r"\_%"
    with db.connect(url) as conn:
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)).fetchall():
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        for (name,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (like,)).fetchall():
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        if checkpoint:
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # superuser or pg_checkpoint
                conn.execute("CHECKPOINT")


def floor_sql(conn, bots: list[str], verifiers: dict[str, str]) -> str:
    """The statements roles.create, databases.create and lock_down_schema run, with
    the same transaction grouping, as a psql script (composed, never formatted)."""
    S, I, L = sql.SQL, sql.Identifier, sql.Literal
    back = S("\\c {}").format(I(conn.info.dbname))
    lines = []
    for i, bot in enumerate(bots, 1):
        names = validate(bot)
        entry = BotEntry(name=bot, code=bot, **POOL)  # registry defaults but the pool
        role, dbname, comment = I(names.role), I(names.database), L(marker(bot))
        statements = [
            S("BEGIN"),
            S("CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
              " CONNECTION LIMIT {} PASSWORD {}").format(role, L(entry.connection_limit), L(verifiers[bot])),
            S("ALTER ROLE {} SET {} = {}").format(role, I("statement_timeout"), L(entry.statement_timeout)),
            S("ALTER ROLE {} SET {} = {}").format(
                role, I("idle_in_transaction_session_timeout"), L(entry.idle_in_transaction_session_timeout)),
            S("COMMENT ON ROLE {} IS {}").format(role, comment),
            S("COMMIT"),
            S("CREATE DATABASE {} WITH OWNER {} ENCODING 'UTF8' TEMPLATE template0 CONNECTION LIMIT {}").format(
                dbname, role, L(entry.connection_limit + DATABASE_ADMIN_MARGIN)),
            S("BEGIN"),
            S("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(dbname),
            S("COMMENT ON DATABASE {} IS {}").format(dbname, comment),
            S("COMMIT"),
        ]
        lines += [s.as_string(conn) + ";" for s in statements]
        lines.append(S("\\c {}").format(dbname).as_string(conn))
        lines.append(S("REVOKE ALL ON SCHEMA public FROM PUBLIC;").as_string(conn))
        lines += [back.as_string(conn), f"\\echo {i}"]  # the echo feeds the progress line
    return "\n".join(lines) + "\n"


def run_floor(url: str, bots: list[str], work: Path) -> float:
    """(a) One psql session running the SQL file; verifiers are computed before timing."""
    with db.connect(url) as conn:
        verifiers = {b: passwords.scram_verifier(conn, passwords.generate(), validate(b).role) for b in bots}
        script = floor_sql(conn, bots, verifiers)
    work.mkdir(mode=0o700)
    path = work / "floor.sql"
    path.write_text(script)
    env = db.libpq_env(url)
    start = time.perf_counter()
    with subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
                          env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                progress("a", int(line), len(bots))
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"psql failed (exit {proc.returncode}); its error is above")
    return elapsed


def run_in_process(url: str, bots: list[str], work: Path) -> float:
    """(b) commands.provision_on, as `add-bot` calls it, on one admin connection (opened inside
    the timing, like psql's own start-up in (a))."""
    work.mkdir(mode=0o700)
    start = time.perf_counter()
    project = Project(work)
    with Servers(project, url).opened() as server:
        for i, bot in enumerate(bots, 1):
            provision_on(server, project, bot, BotOptions(**POOL))
            progress("b", i, len(bots))
    return time.perf_counter() - start


def run_cli(url: str, bots: list[str], work: Path) -> float:
    """(c) One `provision add-bot` process per bot, the admin URL in ADMIN_DATABASE_URL."""
    work.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "BOTFLEET_HOME"} | {"ADMIN_DATABASE_URL": url}
    start = time.perf_counter()
    for i, bot in enumerate(bots, 1):
        done = subprocess.run([PROVISION, "add-bot", bot, *POOL_FLAGS, "--project-dir", str(work)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"provision add-bot {bot} failed (exit {done.returncode}): {done.stderr.strip()}")
        progress("c", i, len(bots))
    return time.perf_counter() - start


def time_help(runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([PROVISION, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(where: str, n: int, totals: dict[str, float], help_s: float) -> None:
    labels = {"a": "(a) SQL file, one psql session", "b": "(b) commands.provision_on, one process",
              "c": "(c) provision add-bot per bot"}
    print(f"\n{n} bots on {where}")
    print(f"{'mode':<32} | {'total s':>8} | {'ms/bot':>8} | ratio to (a)")
    print(f"{'-' * 32}-+-{'-' * 8}-+-{'-' * 8}-+-------------")
    for mode, total in totals.items():
        print(f"{labels[mode]:<32} | {total:8.3f} | {total / n * 1000:8.1f} | {total / totals['a']:11.2f}x")
    print(f"provision --help: {help_s:.3f} s (median of 10 runs)")
    ratio = totals["b"] / totals["a"]
    print(f"targets: (b) <= 1.3x (a): {ratio:.2f}x {'ok' if ratio <= 1.3 else 'MISSED'}; "
          f"provision --help < 0.3 s: {help_s:.3f} s {'ok' if help_s < 0.3 else 'MISSED'}")


def _sigterm(_signum, _frame):
    raise KeyboardInterrupt


def on_server(args, prefix: str, body: Callable[[str, Path], None]) -> int:
    """Run ``body(admin_url, tmp_folder)`` on the benchmark's server: --admin-url, or a
    throw-away embedded one with --embedded. Whatever happens (an error, Ctrl-C,
    SIGTERM), every database and role named ``prefix``_* is dropped at the end and an
    embedded server destroyed. Returns the exit status."""
    signal.signal(signal.SIGTERM, _sigterm)
    url, server, status = None, None, 0
    with tempfile.TemporaryDirectory(prefix="botfleet-bench-") as tmp:
        try:
            if args.embedded:
                from provisioning.embedded import EmbeddedServer

                server = EmbeddedServer(Path(tmp) / ".botfleet")
                print("starting the embedded server...", file=sys.stderr, flush=True)
                server.start()
                size_embedded(server, args.bots)
                url = server.admin_url()
            else:
                url = args.admin_url
            body(url, Path(tmp))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            status = 130
        except (ProvisionError, RuntimeError, psycopg.Error) as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not skip the cleanup
                signal.signal(sig, signal.SIG_IGN)
            print(f"cleaning up {prefix}_* ...", file=sys.stderr, flush=True)
            try:
                if url is not None:
                    drop_everything(url, prefix)
            except (ProvisionError, psycopg.Error) as err:
                print(f"error: cleanup failed ({err}); drop {prefix}_* databases and roles by hand", file=sys.stderr)
                status = 1
            finally:
                if server is not None:
                    server.destroy()
    return status


def parse_args(doc: str, default_bots: int) -> tuple[argparse.Namespace, str, list[str]]:
    """--bots, --admin-url, --embedded; a fresh name prefix and the bots' names."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--bots", type=int, default=default_bots, help=f"bots (default {default_bots})")
    parser.add_argument("--admin-url", default=os.environ.get("ADMIN_DATABASE_URL") or DEFAULT_URL,
                        help=f"admin URL (default: ADMIN_DATABASE_URL, else {DEFAULT_URL})")
    parser.add_argument("--embedded", action="store_true", help="use a throw-away embedded server instead")
    args = parser.parse_args()
    if args.bots < 1:
        parser.error("--bots must be at least 1")
    prefix = "bench" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))
    return args, prefix, [f"{prefix}-{i:02d}" for i in range(1, args.bots + 1)]


def main() -> int:
    args, prefix, bots = parse_args(__doc__, 40)

    def body(url: str, tmp: Path) -> None:
        require_room(url, len(bots))
        with db.connect(url) as conn:  # untimed warm-up: template0 and the catalogs into the caches
            where = f"{db.describe(url)} (PostgreSQL {conn.info.server_version // 10000}, prefix {prefix})"
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(f"{prefix}_warmup")))
        totals = {}
        for mode, run in (("a", run_floor), ("b", run_in_process), ("c", run_cli)):
            drop_everything(url, prefix, checkpoint=True)
            totals[mode] = run(url, bots, tmp / mode)
        report(where, args.bots, totals, time_help())

    return on_server(args, prefix, body)


if __name__ == "__main__":
    sys.exit(main())
