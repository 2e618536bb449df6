"""A bot cannot block botfleet: botfleet's admin session, and so its advisory locks, live in
its own database `botfleet`, which no bot may open; on a server botfleet runs, the maintenance
databases `postgres` and `template1` are closed to the bots too."""

from __future__ import annotations

import json
import os
import subprocess
import time

import psycopg
import pytest
from psycopg import sql

from provisioning.db import LOCK_NAMESPACE, STATE_DATABASE, lock_key
from provisioning.embedded import EmbeddedServer

from .conftest import PROVISION


def bot_login(fleet, name: str, dbname: str) -> psycopg.Connection:
    port = fleet.server.embedded.status().port
    return psycopg.connect(host="127.0.0.1", port=port, user=name.replace("-", "_") + "_user",
                           password=fleet.password(name), dbname=dbname, autocommit=True, connect_timeout=5)


def test_a_bot_holding_botfleets_lock_key_in_postgres_blocks_nothing(scram_fleet):
    name = scram_fleet.name("lock")
    scram_fleet.add(name, "--db-host", "127.0.0.1")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        bot_login(scram_fleet, name, STATE_DATABASE).close()
    # The maintenance database of a server botfleet does not run may stay open to every role:
    # there the bot takes botfleet's own lock key for itself, and idles.
    with bot_login(scram_fleet, name, "postgres") as squatter:
        squatter.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(name)))
        started = time.monotonic()
        proc = scram_fleet.run("rotate-password", name, "--json")
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 30, "rotate-password waited for the bot's lock"
        assert json.loads(proc.stdout)["rotated"][0]["bot"] == name
    # ... and doctor tells the operator of such a server what to run
    report = json.loads(scram_fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    assert any("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC" in n for n in report["notes"]), report["notes"]


def test_on_its_own_embedded_server_botfleet_closes_the_maintenance_databases(scram_fleet, tmp_path):
    """The embedded server is botfleet's: no bot may connect to postgres or template1 there."""
    root = scram_fleet.root
    env = {k: v for k, v in scram_fleet.env().items() if k != "ADMIN_DATABASE_URL"}
    name = scram_fleet.name("own")
    try:
        proc = subprocess.run([PROVISION, "add-bot", name, "--db-host", "127.0.0.1"], env=env, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert "closed the maintenance database postgres to PUBLIC" in proc.stderr
        status = json.loads(subprocess.run([PROVISION, "server", "status", "--json"], env=env, capture_output=True,
                                           text=True, timeout=60).stdout)
        password = scram_fleet.password(name)
        for dbname in ("postgres", "template1", STATE_DATABASE):
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(host="127.0.0.1", port=status["port"], user=name.replace("-", "_") + "_user",
                                password=password, dbname=dbname, connect_timeout=5).close()
        with psycopg.connect(host="127.0.0.1", port=status["port"], user=name.replace("-", "_") + "_user",
                             password=password, dbname=name.replace("-", "_") + "_db", connect_timeout=5) as own:
            assert own.execute("SELECT 1").fetchone() == (1,)
        again = subprocess.run([PROVISION, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(again.stdout)["notes"] == [], again.stdout
    finally:
        subprocess.run([PROVISION, "server", "stop"], env=env, capture_output=True, timeout=120)
        scram_fleet.names.remove(name)  # it lives on the project's own embedded server, stopped with it
    assert os.path.isdir(root / ".botfleet" / "pgdata")


def test_the_lock_message_names_who_holds_it(pg):
    """Someone else's session holding botfleet's lock is not "another provision run"."""
    from provisioning.db import advisory_lock, connect, ensure_state_database, with_database
    from provisioning.errors import LockTimeout

    with pg.connect() as conn:
        ensure_state_database(conn)
    url = with_database(pg.url, STATE_DATABASE)
    name = f"lock-msg-{os.getpid()}"
    with psycopg.connect(url, autocommit=True, application_name="by-hand") as other, connect(url) as mine:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(name)))
        with pytest.raises(LockTimeout) as err:
            with advisory_lock(mine, name, timeout_s=0.5):
                pass
        assert "a session that is not botfleet's" in str(err.value) and "application by-hand" in str(err.value)
        other.execute("SELECT pg_advisory_unlock_all()")
        with psycopg.connect(url, autocommit=True, application_name="botfleet-provision") as run:
            run.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(name)))
            with pytest.raises(LockTimeout, match="another provision run"):
                with advisory_lock(mine, name, timeout_s=0.5):
                    pass


def test_a_tools_error_is_its_cause_not_its_hint():
    from provisioning.backup import tool_error

    stderr = (b'pg_dump: error: connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
              b"\tIs the server running on that host and accepting TCP/IP connections?\n")
    assert tool_error(stderr, 1) == 'connection to server at "127.0.0.1", port 1 failed: Connection refused'
    assert tool_error(b"", 3) == "exit code 3"


def test_botfleets_database_left_closed_by_a_crash_or_made_by_a_racer_is_finished(tmp_path):
    """botfleet's own database is created closed and opened when it is ready. Concurrent first
    commands on a fresh server all succeed (the losers of the race finish it with the winner,
    one at a time), and one a killed run left closed is finished by the next command."""
    from concurrent.futures import ThreadPoolExecutor

    from provisioning.db import STATE_COMMENT

    root = tmp_path / "fresh"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_TEST_ADMIN_URL")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1")
    server = EmbeddedServer(root / ".botfleet")
    try:
        server.start()

        def add(i: int) -> subprocess.CompletedProcess:
            return subprocess.run([PROVISION, "add-bot", f"racer-{i}", "--no-migrate", "--pool-size", "1",
                                   "--max-overflow", "0"], env=env, capture_output=True, text=True, timeout=180,
                                  stdin=subprocess.DEVNULL)
        with ThreadPoolExecutor(max_workers=4) as pool:
            procs = list(pool.map(add, range(4)))
        assert [p.returncode for p in procs] == [0, 0, 0, 0], [p.stderr.splitlines()[-1:] for p in procs]

        with psycopg.connect(server.admin_url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(STATE_DATABASE)))
            conn.execute(sql.SQL("CREATE DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(STATE_DATABASE)))
        listed = subprocess.run([PROVISION, "list", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert sorted(b["bot"] for b in json.loads(listed.stdout)) == [f"racer-{i}" for i in range(4)]
        with psycopg.connect(server.admin_url(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT datallowconn, shobj_description(oid, 'pg_database'), has_database_privilege('public', oid, "
                "'CONNECT') FROM pg_database WHERE datname = %s", (STATE_DATABASE,)).fetchone()
        assert row == (True, STATE_COMMENT, False)
    finally:
        server.destroy()
