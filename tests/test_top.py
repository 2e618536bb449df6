"""`provision top` (issue 18): the per-bot figures match a workload the test drives on a real
server (sessions by state against the limit, rows written, a session waiting on a lock and the
one blocking it), statement texts only with --queries, one section per server, Ctrl-C ends a live
view with exit 0, and bad input is refused in one line with nothing changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import psycopg
import pytest

from provisioning.db import STATE_DATABASE, as_role

from provisioning.embedded import EmbeddedServer

from .conftest import Fleet, PROVISION, TestServer, _server_folder, db, drop_bot_objects, role, snapshot
from .test_everyday import closed_stdout_run

ROWS = 25
SECRET = "sekrit-literal-in-sql"  # what a bot might put in its SQL: shown only with --queries


def bot_conn(fleet: Fleet, name: str) -> psycopg.Connection:
    return psycopg.connect(as_role(fleet.server.url, role(name), fleet.password(name), db(name)), autocommit=True)


def wait_for(admin: psycopg.Connection, query: str, args: tuple, what: str) -> None:
    """Poll the server until ``query`` returns true (a precondition, not a timed assertion)."""
    for _ in range(200):
        if admin.execute(query, args).fetchone()[0]:
            return
        threading.Event().wait(0.05)
    pytest.fail(f"the server never showed {what}")


@dataclass
class Workload:
    bot: str
    blocker: int
    waiter: int


@pytest.fixture
def workload(fleet, admin) -> Iterator[Workload]:
    """A bot with ROWS rows inserted, 2 idle sessions, 1 idle in a transaction that holds a row
    lock, and 1 active session waiting on that lock (4 of its 6 connections)."""
    name = fleet.name("top")
    fleet.add(name, "--no-migrate")
    with ExitStack() as stack:
        writer = stack.enter_context(bot_conn(fleet, name))
        writer.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        writer.execute("INSERT INTO notes SELECT g, 'x' FROM generate_series(1, %s) g", (ROWS,))
        writer.execute("SELECT pg_stat_force_next_flush()")  # the counters reach pg_stat_database now
        writer.execute("SELECT 1")
        wait_for(admin, "SELECT coalesce(tup_inserted, 0) >= %s FROM pg_stat_database WHERE datname = %s",
                 (ROWS, db(name)), f"{ROWS} rows inserted")
        stack.enter_context(bot_conn(fleet, name)).execute("SELECT 1")  # the second idle session
        blocker = stack.enter_context(bot_conn(fleet, name))
        blocker.autocommit = False
        blocker.execute("UPDATE notes SET body = 'held' WHERE id = 1")  # idle in transaction, holding the row
        waiter = stack.enter_context(bot_conn(fleet, name))
        waiter.execute("SET lock_timeout = 0")
        waiter.execute("SET statement_timeout = 0")
        waiter_pid = waiter.info.backend_pid
        thread = threading.Thread(target=lambda: _quietly(waiter, f"UPDATE notes SET body = '{SECRET}' WHERE id = 1"))
        thread.start()
        wait_for(admin, "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)", (waiter_pid,),
                 "the waiting session")
        try:
            yield Workload(name, blocker.info.backend_pid, waiter_pid)
        finally:
            blocker.rollback()  # the waiter goes on and ends
            thread.join(timeout=30)


def _quietly(conn: psycopg.Connection, query: str) -> None:
    try:
        conn.execute(query)
    except psycopg.Error:
        pass


def test_top_once_json_shows_the_workload(fleet, workload):
    proc = fleet.run("top", workload.bot, "--once", "--json", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout, "a statement's text is shown only with --queries"
    frame = json.loads(proc.stdout)
    assert frame["unreachable"] == {}
    [server] = frame["servers"]
    assert server["server"] == "default" and server["max_connections"] > 0
    [bot] = server["bots"]
    assert bot["bot"] == workload.bot and bot["exists"] is True
    assert bot["connections"] == {"active": 1, "idle": 2, "idle in transaction": 1, "other": 0, "total": 4}
    assert bot["connection_limit"] == 6  # pool 2 + 3, plus one for migrations
    assert bot["counters"]["rows_inserted"] >= ROWS and bot["counters"]["rows_written"] >= ROWS
    assert bot["size_bytes"] > 0 and 0 < bot["counters"]["cache_hit_ratio"] <= 1
    rates = bot["rates"]
    assert rates["seconds"] >= 0.2 and rates["transactions"] >= 0 and rates["rows_written"] >= 0

    [wait] = bot["lock_waits"]
    assert wait["waiting"]["pid"] == workload.waiter and wait["waiting"]["bot"] == workload.bot
    assert wait["waiting"]["wait_event_type"] == "Lock" and wait["lock"] == "transactionid ShareLock"
    [blocker] = wait["blocked_by"]
    assert (blocker["pid"], blocker["bot"], blocker["state"]) == (workload.blocker, workload.bot, "idle in transaction")
    assert blocker["transaction_seconds"] > 0
    assert bot["longest"]["pid"] == workload.waiter and bot["longest"]["state"] == "active"
    assert bot["longest"]["query"] is None
    assert bot["oldest_transaction"]["pid"] in (workload.blocker, workload.waiter)


def test_top_rates_are_the_writes_between_its_two_samples(fleet):
    name = fleet.name("rates")
    fleet.add(name, "--no-migrate")
    stop = threading.Event()
    with bot_conn(fleet, name) as writer:
        writer.execute("CREATE TABLE ticks (n int)")

        def write() -> None:
            while not stop.is_set():
                writer.execute("INSERT INTO ticks SELECT generate_series(1, 10)")
                writer.execute("SELECT pg_stat_force_next_flush()")  # counted now, not at the next idle flush

        thread = threading.Thread(target=write)
        thread.start()
        try:
            proc = fleet.run("top", name, "--once", "--json", "--interval", "1")
        finally:
            stop.set()
            thread.join(timeout=30)
    assert proc.returncode == 0, proc.stderr
    [bot] = json.loads(proc.stdout)["servers"][0]["bots"]
    assert bot["rates"]["rows_written"] > 0 and bot["rates"]["transactions"] > 0
    assert bot["rates"]["rows_written"] * bot["rates"]["seconds"] <= bot["counters"]["rows_written"]


def test_top_shows_statement_texts_only_with_queries(fleet, workload):
    plain = fleet.run("top", workload.bot, "--once", "--interval", "0.1")
    assert plain.returncode == 0, plain.stderr
    assert SECRET not in plain.stdout
    assert f"pid {workload.waiter} waits" in plain.stdout and f"blocked by pid {workload.blocker}" in plain.stdout
    [row] = [line.split() for line in plain.stdout.splitlines() if line.startswith(workload.bot + " ")]
    assert row[1:5] == ["1", "2", "1", "4/6"], plain.stdout  # active, idle, idle in transaction, of the limit

    shown = fleet.run("top", workload.bot, "--once", "--interval", "0.1", "--queries")
    assert shown.returncode == 0, shown.stderr
    assert SECRET in shown.stdout


def test_top_has_one_section_per_server_and_server_picks_one(fleet, other_server):
    (fleet.root / "fleet.toml").write_text(f'[servers.second]\nadmin_url = "{other_server.url}"\nmax_connections = 40\n')
    a, b = fleet.name("top-a"), fleet.name("top-b")
    try:
        fleet.add(a, "--no-migrate", "--server", "second")
        fleet.add(b, "--no-migrate", "--server", "default")
        proc = fleet.run("top", "--once", "--json", "--interval", "0.1")
        assert proc.returncode == 0, proc.stderr
        sections = {s["server"]: [bot["bot"] for bot in s["bots"]] for s in json.loads(proc.stdout)["servers"]}
        assert sections == {"default": [b], "second": [a]}
        text = fleet.run("top", "--once", "--interval", "0.1").stdout
        assert "server default:" in text and "server second:" in text

        proc = fleet.run("top", "--once", "--json", "--interval", "0.1", "--server", "second")
        assert proc.returncode == 0, proc.stderr
        assert [(s["server"], [x["bot"] for x in s["bots"]]) for s in json.loads(proc.stdout)["servers"]] == [("second", [a])]
        for args, why in ((["--server", "nowhere"], "no server 'nowhere' in fleet.toml"),
                          ([b, "--server", "second"], f"not on server second: {b}")):
            refused = fleet.run("metrics", *args)
            assert refused.returncode == 2 and refused.stderr.startswith(f"error: {why}"), refused.stderr
    finally:
        with other_server.connect() as conn:
            drop_bot_objects(conn, [a])


@pytest.fixture(scope="module")
def statements_server() -> Iterator[TestServer]:
    """A private embedded cluster that preloads pg_stat_statements, as the rendered stack's does
    (the shared test servers do not, and their settings are not ours to change)."""
    for folder in _server_folder("statements"):
        server = EmbeddedServer(folder / ".botfleet")
        server.init()
        with open(server.pgdata / "postgresql.conf", "a") as conf:
            conf.write("\nshared_preload_libraries = 'pg_stat_statements'\n")
        try:
            server.start()
            yield TestServer(server.admin_url(), "embedded", server)
        finally:
            server.destroy()


def test_top_and_metrics_show_pg_stat_statements_where_the_server_has_it(statements_server, tmp_path):
    fleet = Fleet(statements_server, tmp_path)
    name = fleet.name("stmts")
    fleet.add(name, "--no-migrate")
    before = json.loads(fleet.run("top", "--once", "--json", "--interval", "0.1").stdout)["servers"][0]
    assert before["statements_available"] is False and before["bots"][0]["statements"] is None
    with statements_server.connect(STATE_DATABASE) as conn:  # botfleet's own database, where the admin session is
        conn.execute("CREATE EXTENSION pg_stat_statements")
    with bot_conn(fleet, name) as conn:
        for _ in range(3):
            conn.execute("SELECT count(*) FROM pg_class")

    proc = fleet.run("top", "--once", "--json", "--interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    [server] = json.loads(proc.stdout)["servers"]
    assert server["statements_available"] is True
    assert server["bots"][0]["statements"]["calls"] >= 3
    assert server["bots"][0]["rates"]["statement_calls"] >= 0 and server["bots"][0]["rates"]["statement_seconds"] >= 0
    text = fleet.run("top", "--once", "--interval", "0.1").stdout
    assert "pg_stat_statements on" in text and "CALLS/S" in text
    metrics = fleet.run("metrics").stdout
    assert f'botfleet_bot_statement_calls_total{{server="default",bot="{name}"}}' in metrics


def test_a_live_top_refreshes_until_ctrl_c_and_exits_0(fleet):
    name = fleet.name("live")
    fleet.add(name, "--no-migrate")
    proc = subprocess.Popen([PROVISION, "top", "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=fleet.env())
    try:
        headers = 0
        for line in proc.stdout:  # no terminal: plain frames one after another
            headers += line.startswith("provision top ")
            if headers == 2:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert headers == 2, err
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err
    assert "\x1b[" not in out, "no screen control codes when stdout is not a terminal"


@pytest.mark.parametrize("args, why", [
    (["top", "t-no-such-bot"], "not in the fleet registry: t-no-such-bot"),
    (["top", "--once", "--interval", "0"], "--interval must be between 0.1 and 3600 seconds"),
    (["top", "--interval", "nan"], "--interval must be between"),
    (["top", "--interval", "soon"], "Invalid value for '--interval'"),
    (["top", "Bad_Name"], "Bad_Name"),
])
def test_top_refuses_bad_input_in_one_line_and_changes_nothing(fleet, admin, args, why):
    fleet.add(fleet.name("bad"), "--no-migrate")
    before, files = snapshot(admin), sorted(p.name for p in fleet.root.rglob("*"))
    proc = fleet.run(*args)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and why in line, line
    assert proc.stdout == ""
    assert snapshot(admin) == before and sorted(p.name for p in fleet.root.rglob("*")) == files

    as_json = fleet.run(*args, "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["exit_code"] == 2


def test_top_into_a_closed_stdout_ends_quietly(fleet):
    fleet.add(fleet.name("pipe"), "--no-migrate")
    proc = closed_stdout_run(["top", "--once", "--interval", "0.1"], fleet.env())
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr


def test_top_in_a_folder_without_a_fleet_is_refused(tmp_path, pg):
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(tmp_path), NO_COLOR="1", COLUMNS="200")
    proc = Fleet(pg, tmp_path).run("top", "--once", env=env)
    assert proc.returncode == 2 and "no fleet here" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_readme_examples_work_as_written(fleet):
    """Each line of the README's block that ends by itself (not the live ones), as written but for
    the bot's name (in this process: the shell adds nothing to these lines)."""
    import shlex

    from .test_everyday import readme_block

    name = fleet.name("readme")
    fleet.add(name, "--no-migrate")
    lines = [line.split("#")[0].strip() for line in readme_block("Watching the shared server per bot: `top` and `metrics`")]
    lines = [line for line in lines if "--once" in line or line == "provision metrics"]
    assert len(lines) >= 4
    for line in lines:
        args = shlex.split(line.replace("hello-bot", name))
        assert args[0] == "provision"
        proc = fleet.run(*args[1:])
        assert proc.returncode == 0, (line, proc.stderr)
        assert name in proc.stdout, line

