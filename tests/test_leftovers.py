"""What killed runs leave behind (issue 14 item 13): doctor reports it, ``doctor --fix`` removes
what is botfleet's own and safe to remove, and a killed ``migrate --all`` leaves no worker.

Leftovers are made the way a kill leaves them: an atomic write's temporary file (an env file's
holds a password), a backup without its checksum, an empty checksum, a checksum whose backup is
gone, and a scratch database whose ``provision check`` died (nobody holds its lock). A live
writer's fresh temporary file and a running check's scratch database are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from psycopg import sql

from provisioning.backup import checksum_path
from provisioning.db import LOCK_NAMESPACE, STATE_DATABASE, lock_key
from provisioning.migrate import MIGRATION_LOCK_SPACE
from provisioning.revisions import scratch_prefix

from .conftest import PROVISION, assert_no_leak, db, other_fleets, role


AN_HOUR_AGO = time.time() - 3600


def _leftover(path: Path, text: str, *, stale: bool = True) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    if stale:
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return path


def test_doctor_reports_crash_leftovers_and_fix_removes_only_what_is_safe(fleet, pg, admin):
    name = fleet.name("left")
    fleet.add(name)
    assert fleet.run("backup", name).returncode == 0
    folder = fleet.root / "backups" / name
    (backup,) = sorted(folder.glob("*.dump"))
    password = fleet.password(name)
    secrets = fleet.root / "secrets"

    env_tmp = _leftover(secrets / f".{name}.env.k3j4h5g6.tmp",
                        f"DATABASE_URL=postgresql://{role(name)}:{password}@127.0.0.1:5432/{db(name)}\n")
    live_tmp = _leftover(secrets / f".{name}.env.a1b2c3d4.tmp", "DB_POOL_SIZE=2\n", stale=False)  # a writer at work
    toml_tmp = _leftover(fleet.root / ".fleet.toml.zz11yy22.tmp", "[bots]\n")
    no_sum = folder / f"{name}-20260101T000000000000Z.dump"  # pg_dump killed: no checksum written
    shutil.copyfile(backup, no_sum)
    empty_sum_dump = folder / f"{name}-20260102T000000000000Z.dump"  # the disk filled up writing its checksum
    shutil.copyfile(backup, empty_sum_dump)
    empty_sum = _leftover(checksum_path(empty_sum_dump), "")
    orphan_sum = _leftover(folder / f"{name}-20260103T000000000000Z.dump.sha256", "0" * 64 + "  gone.dump\n")

    prefix = scratch_prefix(fleet.root)
    dead, live = prefix + "0badc0de", prefix + "1111aaaa"
    ident = sql.Identifier
    holder = pg.connect(STATE_DATABASE)  # a running check holds its scratch database's lock, where botfleet locks
    try:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(live)))
        for scratch in (dead, live):
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident(scratch)))

        proc = fleet.run("doctor", *other_fleets(), "--json")
        assert proc.returncode == 1
        report = json.loads(proc.stdout)
        leftovers = [f for f in report["found"] if f["check"] == "leftover"]
        expected = [  # (what the message names, the fix, fixable)
            (f"{env_tmp}: the temporary file of a write that was killed before it replaced {name}.env (it may hold a "
             "password)", f"rm {env_tmp}", True),
            (f"{toml_tmp}: the temporary file of a write that was killed before it replaced fleet.toml", f"rm {toml_tmp}",
             True),
            (f"backup {no_sum} has no checksum beside it",
             f"cd {folder} && pg_restore --file=/dev/null {no_sum.name} && sha256sum {no_sum.name} > {no_sum.name}.sha256",
             False),
            (f"{empty_sum} is empty: the checksum of {empty_sum_dump.name} was never written", f"rm {empty_sum}", True),
            (f"{orphan_sum} is the checksum of a backup that is gone", f"rm {orphan_sum}", True),
            (f"database {dead} is a scratch database a killed provision check", f'DROP DATABASE "{dead}"', True),
        ]
        for message, fix, fixable in expected:
            hits = [f for f in leftovers if message in f["message"]]
            assert len(hits) == 1, (message, [f["message"] for f in leftovers])
            assert hits[0]["fix"].startswith(fix) and hits[0]["fixable"] is fixable, hits[0]
        assert len(leftovers) == len(expected), [f["message"] for f in leftovers]
        text = fleet.run("doctor", *other_fleets())
        assert_no_leak(password, proc.stdout, proc.stderr, text.stdout, text.stderr)

        proc = fleet.run("doctor", *other_fleets(), "--fix", "--json")
        report = json.loads(proc.stdout)
        assert proc.returncode == 1  # the backups without a checksum are the user's: reported, never deleted
        assert sorted(f["message"].split(" has no")[0] for f in report["remaining"]) == [
            f"backup {no_sum}", f"backup {empty_sum_dump}"]
        assert all(f["status"] == "fixed" for f in report["fixed"]), report["fixed"]
        assert not any(p.exists() for p in (env_tmp, toml_tmp, empty_sum, orphan_sum))
        assert all(p.exists() for p in (live_tmp, no_sum, empty_sum_dump, backup, checksum_path(backup)))
        datnames = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                                (prefix,)).fetchall()}
        assert datnames == {live}
    finally:
        holder.close()
        for scratch in (dead, live):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident(scratch)))


# --- a killed `provision migrate --all` ----------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_killed_migrate_all_leaves_no_worker_behind(code_fleet, pg):
    fleet = code_fleet
    names = [fleet.name("kill"), fleet.name("kill")]
    # two codes: each bot is its code's first, so both are migrated at once (a code's other bots
    # would wait for its first, whose recorded SQL they replay)
    for name, code in zip(names, ("hello-bot", "chat-bot")):
        fleet.add(name, "--code", code, "--no-migrate")
    # Both bots' migration locks are held, so each worker waits inside its migration.
    holders = [pg.connect(db(name)) for name in names]
    for conn, name in zip(holders, names):
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (MIGRATION_LOCK_SPACE, lock_key(db(name))))
    proc = subprocess.Popen([PROVISION, "migrate", "--all", "--jobs", "2", "--lock-wait", "600"], env=fleet.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        with pg.connect() as admin:
            while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s) AND "
                                "application_name = 'botfleet-migrate' AND wait_event_type = 'Lock'",
                                ([db(n) for n in names],)).fetchone()[0] < 2:
                assert proc.poll() is None, "provision migrate ended before its workers waited"
                assert time.monotonic() < deadline, "the workers never reached the bots' migration locks"
                time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [w for w in workers if _alive(w)] == [], "workers outlived the killed provision migrate"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for worker in workers:  # only this test's own processes, by pid
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
        for conn in holders:
            conn.close()
