"""How fast does `provision migrate` bring a whole fleet to head?

Run by hand from the repository root (it is a benchmark, not a test):

    .venv/bin/python bench/bench_migrate.py [--bots N] [--admin-url URL] [--embedded]

The server is --admin-url, else ADMIN_DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/postgres; with --embedded a throw-away
embedded server is started in a temporary folder and destroyed at the end.

N bots (default 30) named bench<random6>-NN are provisioned (untimed) in a
temporary project holding a copy of this repository's bots/ and migrations/,
their codes cycling through hello-bot, chat-bot and feishu-bot. Every bot is
then brought from base to head several ways, each from base again (the
downgrade between modes is not timed):

  (a) the naive shell loop: `alembic -c migrations/alembic.ini -n CODE upgrade head`,
      one interpreter per bot, its DATABASE_URL in the environment;
  (b) provisioning.migrate.migrate_many with --jobs 1: in this process, one bot after another;
  (c) migrate_many with --jobs 2, 4 and 8: forked worker processes;
  (d) `provision migrate --all` end to end (one process, its default --jobs);
  (b), (c) and (d) each twice: with --no-replay (Alembic for every bot), then as botfleet runs
      by default (Alembic for the first bot of each code, its recorded SQL replayed on the others);
  (e) the floor: the same DDL (alembic's offline --sql script of each bot's code, generated
      before timing) through ONE psql session and through FOUR in parallel, each session
      connecting to its bots' databases in turn as each bot's role (a 0600 passfile).

It prints the total, ms per bot and the speed-up over (a). Everything it
creates on the server is dropped at the end, even on error or Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import psycopg.sql

from bench_provision import PROVISION, on_server, parse_args, progress
from provisioning import db
from provisioning.commands import BotOptions, provision_on
from provisioning.migrate import Target, migrate_many, migrate_one, plan_targets
from provisioning.project import Project
from provisioning.servers import Servers

REPO = Path(__file__).resolve().parents[1]
CODES = ("hello-bot", "chat-bot", "feishu-bot")
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def provision(url: str, root: Path, bots: list[str]) -> list[Target]:
    for folder in ("bots", "migrations"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    project = Project(root)
    with Servers(project, url).opened() as server:
        for i, bot in enumerate(bots):
            provision_on(server, project, bot, BotOptions(code=CODES[i % len(CODES)]))
            progress("provisioning", i + 1, len(bots))
    targets, early = plan_targets(project, [], all_bots=True, admin_url=url)
    if early:
        raise RuntimeError(f"cannot migrate: {early[0].error}")
    return targets


def to_base(targets: list[Target]) -> None:
    for target in targets:
        outcome = migrate_one(target, "base", downgrade=True)
        if not outcome.ok:
            raise RuntimeError(outcome.error)


def check(outcomes, mode: str) -> None:
    failed = [o for o in outcomes if o.status != "upgraded"]
    if failed:
        raise RuntimeError(f"mode {mode}: {failed[0].bot}: {failed[0].status} {failed[0].error or ''}")


def run_alembic_loop(targets: list[Target], url: str) -> float:
    """(a) One `alembic upgrade head` interpreter per bot."""
    params = db.parse_url(url)
    host, port = params.get("host") or "127.0.0.1", params.get("port") or "5432"
    if host.startswith("/"):  # the embedded server's admin URL is a socket folder: bots use TCP
        host = "127.0.0.1"
    start = time.perf_counter()
    for i, t in enumerate(targets, 1):
        info = psycopg.conninfo.conninfo_to_dict(t.conninfo)
        env = {**os.environ, "DATABASE_URL": (
            f"postgresql://{info['user']}:{info['password']}@{host}:{port}/{t.database}")}
        done = subprocess.run([ALEMBIC, "-c", str(Path(t.root) / "migrations" / "alembic.ini"), "-n", t.package,
                               "upgrade", "head"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"alembic upgrade for {t.bot} failed (exit {done.returncode})")
        progress("a", i, len(targets))
    return time.perf_counter() - start


def run_many(targets: list[Target], jobs: int, mode: str, replay: bool = True) -> float:
    done = 0

    def tick(_outcome) -> None:
        nonlocal done
        done += 1
        progress(mode, done, len(targets))

    start = time.perf_counter()
    outcomes = migrate_many(targets, jobs=jobs, on_done=tick, replay=replay)
    elapsed = time.perf_counter() - start
    check(outcomes, mode)
    return elapsed


def run_cli(root: Path, url: str, n: int, *extra: str) -> float:
    """(d) `provision migrate --all` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k != "BOTFLEET_HOME"} | {"ADMIN_DATABASE_URL": url}
    start = time.perf_counter()
    done = subprocess.run([PROVISION, "migrate", "--all", "--project-dir", str(root), *extra],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"provision migrate --all failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    progress("d", n, n)
    return elapsed


def run_psql_floor(targets: list[Target], sessions: int, work: Path) -> float:
    """(e) The migrations' own SQL through ``sessions`` psql processes, bots dealt round-robin."""
    from provisioning.migrate import offline_sql

    work.mkdir(mode=0o700, exist_ok=True)
    scripts: dict[str, Path] = {}
    for t in targets:
        if t.package not in scripts:
            scripts[t.package] = work / f"{t.package}.sql"
            # the version table is there, empty, after the downgrade to base (as for (b)-(d))
            sql = re.sub(r"CREATE TABLE alembic_version \(.*?\);\n", "", offline_sql(t, None), count=1, flags=re.S)
            scripts[t.package].write_text(sql)
    infos = [psycopg.conninfo.conninfo_to_dict(t.conninfo) for t in targets]
    passfile = work / "pgpass"
    passfile.touch(mode=0o600)
    passfile.write_text("".join(
        ":".join(str(i.get(k) or "*").replace("\\", "\\\\").replace(":", "\\:")
                 for k in ("host", "port", "dbname", "user", "password")) + "\n" for i in infos))
    files = []
    for n in range(sessions):
        lines = []
        for t, info in list(zip(targets, infos))[n::sessions]:
            conninfo = psycopg.conninfo.make_conninfo(**{k: v for k, v in info.items() if k != "password"})
            lines += [f"\\connect {psycopg.sql.quote(conninfo)}", f"\\i {scripts[t.package]}"]
        files.append(work / f"session{n}.sql")
        files[-1].write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PGPASSFILE": str(passfile)}
    start = time.perf_counter()
    procs = [subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(f)], env=env,
                              stdout=subprocess.DEVNULL) for f in files]
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"psql failed (exits {codes}); its error is above")
    progress(f"e{sessions}", len(targets), len(targets))
    return elapsed


def report(where: str, n: int, totals: dict[str, float]) -> None:
    width = max(len(label) for label in [*totals, "mode"])
    print(f"\n{n} bots from base to head on {where}")
    print(f"{'mode':<{width}} | {'total s':>8} | {'ms/bot':>7} | speed-up over (a)")
    print(f"{'-' * width}-+-{'-' * 8}-+-{'-' * 7}-+------------------")
    for label, total in totals.items():
        print(f"{label:<{width}} | {total:8.2f} | {total / n * 1000:7.0f} | {totals[next(iter(totals))] / total:8.1f}x")


def main() -> int:
    args, prefix, bots = parse_args(__doc__, 30)

    def body(url: str, tmp: Path) -> None:
        root = tmp / "project"
        root.mkdir(mode=0o700)
        with db.connect(url) as conn:
            where = f"{db.describe(url)} (PostgreSQL {conn.info.server_version // 10000}, {os.cpu_count()} CPUs)"
        targets = provision(url, root, bots)
        totals: dict[str, float] = {}
        totals["(a) alembic upgrade head, a process per bot"] = run_alembic_loop(targets, url)
        for replay in (False, True):
            how = "" if replay else ", --no-replay"
            for jobs in (1, 2, 4, 8):
                to_base(targets)
                mode = ("b" if jobs == 1 else f"c{jobs}") + ("" if replay else "-alembic")
                label = (f"(b) migrate_many --jobs 1 (in-process{how})" if jobs == 1
                         else f"(c) migrate_many --jobs {jobs} (workers{how})")
                totals[label] = run_many(targets, jobs, mode, replay)
            to_base(targets)
            totals[f"(d) provision migrate --all (CLI{how})"] = run_cli(root, url, len(targets),
                                                                       *([] if replay else ["--no-replay"]))
        for sessions in (1, 4):
            to_base(targets)
            label = f"(e) floor: the DDL through {sessions} psql session{'s' if sessions > 1 else ''}"
            totals[label] = run_psql_floor(targets, sessions, tmp / "floor")
        report(where, args.bots, totals)

    return on_server(args, prefix, body)


if __name__ == "__main__":
    sys.exit(main())
