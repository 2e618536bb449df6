"""A crash of add-bot at any statement never leaves a database that every role can open,
and the rerun finishes what the crash interrupted.

The kill is injected, not timed: strace delivers SIGKILL to `provision add-bot` at its Nth
`sendto` system call (libpq sends each statement with one), for every N until the run
completes untouched.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from psycopg import sql

from .conftest import PROVISION

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")


def state(admin, name: str) -> dict | None:
    stem = name.replace("-", "_")
    row = admin.execute(
        "SELECT d.datallowconn, shobj_description(d.oid, 'pg_database'),"
        "       EXISTS (SELECT 1 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a"
        "               WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT')"
        " FROM pg_database d WHERE d.datname = %s", (f"{stem}_db",)).fetchone()
    if row is None:
        return None
    return {"allow": row[0], "comment": row[1], "public_connect": row[2]}


# One connection a bot: the forty-odd bots of the test fit any server's connection budget.
SMALL_POOL = ("--pool-size", "1", "--max-overflow", "0")


def _killed_add_bot(fleet, name: str, n: int) -> subprocess.CompletedProcess:
    """`provision add-bot NAME` killed (SIGKILL) at its Nth statement to the server."""
    return subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=sendto",
         "-e", f"inject=sendto:signal=SIGKILL:when={n}", PROVISION, "add-bot", name, "--no-migrate",
         *SMALL_POOL],
        env=fleet.env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_kill_at_every_statement_of_add_bot_is_safe_and_a_rerun_finishes(fleet, admin):
    """Every statement, each with a bot of its own: the killed runs go a few at a time (they are
    processes, most of their time is start-up), then each bot is checked and finished by a rerun."""
    from concurrent.futures import ThreadPoolExecutor

    killed: dict[int, str] = {}
    finished = False
    with ThreadPoolExecutor(max_workers=4) as pool:
        for first in range(1, 200, 4):
            batch = {n: fleet.name(f"crash{n}") for n in range(first, first + 4)}
            results = dict(zip(batch, pool.map(lambda n: _killed_add_bot(fleet, batch[n], n), batch)))
            for n, proc in results.items():
                if proc.returncode == 0:
                    finished = True  # no Nth statement: add-bot ran to its end
                else:
                    assert proc.returncode == -9, (n, proc.returncode, proc.stderr)  # killed, not refused
                    killed[n] = batch[n]
            if finished:
                break
    assert finished, "add-bot never ran to its end"
    assert len(killed) >= 8, f"add-bot was killed at too few statements to mean much: {sorted(killed)}"
    assert sorted(killed) == list(range(1, len(killed) + 1)), "a kill at an early statement let add-bot finish"
    for n, name in sorted(killed.items()):
        db = state(admin, name)
        # whatever the moment of the crash: no database of the bot that every role may open
        assert db is None or not db["allow"] or not db["public_connect"], (n, db)
        rerun = fleet.run("add-bot", name, "--no-migrate", *SMALL_POOL)
        assert rerun.returncode == 0, (n, rerun.stderr)
        db = state(admin, name)
        assert db == {"allow": True, "comment": f"botfleet bot {name}", "public_connect": False}, (n, db)


def test_a_half_made_database_is_closed_to_everyone_and_finished_by_the_rerun(fleet, admin, pg):
    """The exact state a kill between CREATE DATABASE and its lock-down leaves."""
    name = fleet.name("half")
    fleet.add(name, "--no-migrate")
    stem = name.replace("-", "_")
    ident = sql.Identifier(f"{stem}_db")
    admin.execute(sql.SQL("DROP DATABASE {}").format(ident))
    admin.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ALLOW_CONNECTIONS false").format(
        ident, sql.Identifier(f"{stem}_user")))
    assert state(admin, name) == {"allow": False, "comment": None, "public_connect": True}
    with pytest.raises(Exception, match="is not currently accepting connections"):
        pg.connect(f"{stem}_db").close()
    plan = fleet.run("plan", "--no-migrate", "--ignore-stray", "*")
    assert plan.returncode == 0 and "database accepts connections again" in plan.stdout, plan.stdout + plan.stderr
    proc = fleet.run("add-bot", name, "--no-migrate")
    assert proc.returncode == 0, proc.stderr
    assert state(admin, name) == {"allow": True, "comment": f"botfleet bot {name}", "public_connect": False}
