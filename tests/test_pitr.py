"""The continuous archive (Barman) and point-in-time recovery, on a fleet's own embedded server.

One archived fleet for the module (three bots, a base backup, synchronous WAL streaming):
the whole server recovered to a time, one bot back in time while the others keep
serving, bad input refused with nothing changed, and a kill -9 mid-write recovered with
no acknowledged commit lost. Never the shared server: PITR reconfigures the server it
archives (its pg_hba, synchronous_standby_names, a replication slot).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning.archive import Archive
from provisioning.embedded import EmbeddedServer, _free_port, _port_free
from provisioning.pitr import running
from provisioning.project import Project

from .conftest import provision

BOTS = ("pa", "pb", "pc")


@dataclass
class Archived:
    root: Path
    embedded: EmbeddedServer

    def folder(self, name: str) -> Path:
        """A path for a recovered data folder beside the fleet (not under pytest's root, whose
        modes another pytest session may strip while the scratch server runs)."""
        return self.root.parent / name

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
        env.update(BOTFLEET_HOME=str(self.root), NO_COLOR="1", COLUMNS="200")
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return provision(args, self.env())

    def admin(self, bot: str) -> psycopg.Connection:
        conn = psycopg.connect(self.embedded.admin_url(), dbname=f"{bot}_db", autocommit=True)
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(f"{bot}_user")))
        return conn

    def write(self, bot: str, values: list[str]) -> None:
        with self.admin(bot) as conn:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO items (v) VALUES (%s)", [(v,) for v in values])

    def checksum(self, bot: str, url: str | None = None) -> tuple[int, str]:
        with psycopg.connect(url or self.embedded.admin_url(), dbname=f"{bot}_db", autocommit=True) as conn:
            return checksum(conn)


def checksum(conn: psycopg.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT count(*), md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) FROM items").fetchone()
    return row[0], row[1]


def moment() -> dt.datetime:
    """A recovery target with a clear second on both sides of it."""
    time.sleep(1.1)
    mark = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.1)
    return mark


def stamp(mark: dt.datetime) -> str:
    return mark.isoformat(sep=" ")


@pytest.fixture(scope="module")
def archived() -> Iterator[Archived]:
    folder = Path(tempfile.mkdtemp(prefix="botfleet-test-pitr-"))
    folder.chmod(0o711)  # the server's OS user (as root) traverses it
    root = folder / "fleet"
    root.mkdir()
    fleet = Archived(root, EmbeddedServer(root / ".botfleet"))
    try:
        for bot in BOTS:
            proc = fleet.run("add-bot", bot)
            assert proc.returncode == 0, proc.stderr
        with open(root / "fleet.toml", "a") as fh:
            fh.write('\n[backup]\nretention = "7 days"\nsynchronous = true\n')
        for bot in BOTS:
            with fleet.admin(bot) as conn:
                conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, v text NOT NULL)")
            fleet.write(bot, [f"{bot}-seed-{i}" for i in range(50)])
        proc = fleet.run("backup", "--server", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["backup"]["status"] == "DONE"
        yield fleet
    finally:
        provision(("server", "stop"), fleet.env())
        archive = Archive(Project(root))  # the receiver may outlive a failed test: stop it by its own command
        if archive.configured:
            archive.stop_receiver()
        fleet.embedded.destroy()
        shutil.rmtree(folder, ignore_errors=True)


def test_backups_lists_window_and_health(archived):
    proc = archived.run("backups", "--server", "--json")
    assert proc.returncode == 0, proc.stderr
    window = json.loads(proc.stdout)
    assert len(window["backups"]) >= 1 and window["start"] <= window["end"]
    assert window["health"]["receiver_running"] is True and window["health"]["synchronous"] is True
    with psycopg.connect(archived.embedded.admin_url(), autocommit=True) as conn:
        assert conn.execute("SHOW synchronous_standby_names").fetchone()[0] == "barman_receive_wal"
        assert conn.execute("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'barman_receive_wal'"
                            ).fetchone()[0] == "sync"
        # the role has replication and nothing more than it needs
        row = conn.execute("SELECT rolreplication, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                           "WHERE rolname = 'botfleet_backup'").fetchone()
    assert row == (True, False, False, False)
    passfile = archived.root / "secrets" / "botfleet_backup.pgpass"
    assert passfile.stat().st_mode & 0o777 == 0o600
    password = passfile.read_text().strip().rsplit(":", 1)[1]
    for path in ("barman.conf", "barman.log"):
        assert password not in (archived.root / ".botfleet" / "barman" / path).read_text(), f"the password is in {path}"
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                assert password.encode() not in (pid / "cmdline").read_bytes(), "the password is in a process's arguments"
            except OSError:
                pass
    again = archived.run("backups", "--server")
    assert again.returncode == 0 and "recoverable:" in again.stdout and "WAL receiver: running" in again.stdout
    listed = archived.run("list")
    assert listed.returncode == 0 and "archive: receiver running" in listed.stdout.splitlines()[-1], listed.stdout
    doctor = archived.run("doctor", "--json")
    assert not [f for f in json.loads(doctor.stdout)["found"] if f["check"] == "archive"], doctor.stdout
    # a second backup --server converges (nothing to set up) and takes one more base backup
    second = archived.run("backup", "--server", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changed"] == []


def test_scheduled_dumps_are_due_once_per_period(archived):
    first = archived.run("backup", "--all", "--prune", "--json")
    assert first.returncode == 0, first.stderr
    assert sorted(r["bot"] for r in json.loads(first.stdout)) == list(BOTS)
    again = archived.run("backup", "--all", "--prune", "--json")  # cron, a minute later: none is due
    assert again.returncode == 0 and json.loads(again.stdout) == []
    assert "younger than [backup] dump_every (1 day); skipped" in again.stderr


def test_whole_server_recovered_to_a_time(archived, tmp_path):
    for bot in BOTS:
        archived.write(bot, [f"{bot}-before-{i}" for i in range(20)])
    mark = moment()
    at_mark = {bot: archived.checksum(bot) for bot in BOTS}
    for bot in BOTS:
        archived.write(bot, [f"{bot}-after-{i}" for i in range(20)])
        with archived.admin(bot) as conn:
            conn.execute("DELETE FROM items WHERE id % 3 = 0")
    assert all(archived.checksum(bot) != at_mark[bot] for bot in BOTS)

    dest = archived.folder("recovered")
    proc = archived.run("recover", "--server", "--to", stamp(mark), "--into", str(dest), "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["into"] == str(dest)
    work = archived.folder(f"work-{dest.name}")
    work.mkdir(mode=0o711)
    with running(dest, work) as scratch:  # it starts as a normal server (already promoted)
        assert {bot: archived.checksum(bot, scratch.url) for bot in BOTS} == at_mark


def test_one_bot_back_in_time_while_the_others_serve(archived):
    for bot in BOTS:
        archived.write(bot, [f"{bot}-t2-before-{i}" for i in range(10)])
    mark = moment()
    pa_at_mark = archived.checksum("pa")
    for bot in BOTS:
        archived.write(bot, [f"{bot}-t2-after-{i}" for i in range(10)])
    with archived.admin("pa") as conn:
        conn.execute("DELETE FROM items")  # the mistake to undo

    served: dict[str, list] = {"ok": [], "errors": []}
    stop = threading.Event()

    def others_serve() -> None:
        i = 0
        while not stop.is_set():
            for bot in ("pb", "pc"):
                try:
                    archived.write(bot, [f"{bot}-during-{i}"])
                    with archived.admin(bot) as conn:
                        conn.execute("SELECT count(*) FROM items").fetchone()
                    served["ok"].append(f"{bot}-during-{i}")
                except psycopg.Error as err:
                    served["errors"].append(str(err))
            i += 1

    thread = threading.Thread(target=others_serve)
    thread.start()
    try:
        proc = archived.run("restore", "pa", "--to", stamp(mark), "--yes", "--json")
    finally:
        stop.set()
        thread.join()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["restore"]["safety_backup"] and Path(out["restore"]["safety_backup"]).exists()
    assert archived.checksum("pa") == pa_at_mark
    assert served["errors"] == [] and served["ok"]
    for bot in ("pb", "pc"):
        with psycopg.connect(archived.embedded.admin_url(), dbname=f"{bot}_db") as conn:
            have = {r[0] for r in conn.execute("SELECT v FROM items")}
        assert {f"{bot}-t2-after-{i}" for i in range(10)} <= have
        assert {v for v in served["ok"] if v.startswith(bot)} <= have
    # the scratch server is gone
    assert not list((archived.root / ".botfleet" / "barman").glob("pitr-*"))


def test_bad_input_is_refused_and_changes_nothing(archived, tmp_path):
    before = {bot: archived.checksum(bot) for bot in BOTS}
    first = json.loads(archived.run("backups", "--server", "--json").stdout)["start"]
    early = dt.datetime.fromisoformat(first.replace("Z", "+00:00")) - dt.timedelta(hours=1)
    dest = tmp_path / "never"
    cases = [
        (("recover", "--server", "--to", stamp(early), "--into", str(dest), "--yes"), "before the first base backup"),
        (("recover", "--server", "--to", "2999-01-01 00:00:00+00", "--into", str(dest), "--yes"), "in the future"),
        (("recover", "--server", "--to", "yesterday", "--into", str(dest), "--yes"), "is not a time"),
        (("recover", "--server", "--to", "2026-01-01 00:00:00", "--into", str(dest), "--yes"), "no time zone"),
        (("restore", "nosuch", "--to", stamp(early)), "not in the fleet registry"),
        (("restore", "pa", "--to", stamp(early), "--yes"), "before the first base backup"),
        (("recover", "--server", "--into", str(archived.root), "--yes"), "not an empty folder"),
        (("recover", "--server", "--into", str(dest)), "--yes"),
    ]
    for args, words in cases:
        proc = archived.run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and words in lines[-1], (args, proc.stderr)
        assert not dest.exists()

    # a fleet without an archive
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "fleet.toml").write_text("version = 1\n")
    env = dict(archived.env(), BOTFLEET_HOME=str(bare))
    for args in (("recover", "--server", "--into", str(dest), "--yes"), ("backups", "--server")):
        proc = provision(args, env)
        assert proc.returncode == 2 and "no archive of server default yet" in proc.stderr, proc.stderr
    assert not (bare / ".botfleet" / "pgdata").exists()

    # no space in the target folder: a 1 MB tmpfs
    if os.geteuid() == 0:
        small = tmp_path / "small"
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
        try:
            proc = archived.run("recover", "--server", "--into", str(small / "pg"), "--yes")
            assert proc.returncode == 2 and "not enough space" in proc.stderr, proc.stderr
            assert list(small.iterdir()) == []
        finally:
            subprocess.run(["umount", str(small)], check=True)
    assert {bot: archived.checksum(bot) for bot in BOTS} == before


def _kill_server(embedded: EmbeddedServer) -> None:
    """kill -9 the postmaster and every backend it runs: a crash, not a shutdown."""
    pid = embedded.status().pid
    assert pid is not None
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and _ppid(p) == pid]
    os.kill(pid, signal.SIGKILL)
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_kill_mid_write_loses_no_acknowledged_commit(archived, tmp_path):
    acknowledged: list[int] = []
    started = threading.Event()

    def writer() -> None:
        try:
            with archived.admin("pc") as conn:
                for i in range(100000):
                    row = conn.execute("INSERT INTO items (v) VALUES (%s) RETURNING id", (f"pc-crash-{i}",)).fetchone()
                    acknowledged.append(row[0])  # autocommit: returned = committed and acknowledged
                    if i == 200:
                        started.set()
        except psycopg.Error:
            pass  # the crash
        finally:
            started.set()

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait()
    _kill_server(archived.embedded)
    thread.join()
    assert len(acknowledged) > 200

    dest = archived.folder("latest")
    proc = archived.run("recover", "--server", "--into", str(dest), "--yes")
    assert proc.returncode == 0, proc.stderr
    work = archived.folder(f"work-{dest.name}")
    work.mkdir(mode=0o711)
    with running(dest, work) as scratch, psycopg.connect(scratch.url, dbname="pc_db") as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM items WHERE v LIKE 'pc-crash-%%'")}
    lost = set(acknowledged) - present
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged commits lost"
    # the crashed server comes back (crash recovery) with its receiver; on another port when
    # another test's server took this one meanwhile
    port = archived.embedded.status().port
    proc = archived.run("server", "start", *(() if _port_free(port) else ("--port", str(_free_port()))))
    assert proc.returncode == 0, proc.stderr
    assert Archive(Project(archived.root)).receiver_running()


@pytest.mark.parametrize(("table", "words"), [
    ('retention = "forever"', 'retention must look like "7 days"'),
    ('retention = ""', "give retention"),
    ("dump_keep = 0", "dump_keep at least 1"),
    ("synchronus = true", "unknown key 'synchronus'"),
])
def test_a_bad_backup_table_is_refused(tmp_path, table, words):
    (tmp_path / "fleet.toml").write_text(f"version = 1\n\n[backup]\n{table}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    proc = provision(("backups", "--server"), dict(env, BOTFLEET_HOME=str(tmp_path), NO_COLOR="1"))
    assert proc.returncode == 2 and "[backup]" in proc.stderr and words in proc.stderr, proc.stderr
    assert not (tmp_path / ".botfleet" / "pgdata").exists()
