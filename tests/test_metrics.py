"""`provision metrics` (issue 18): each bot's figures in Prometheus's text format, read by
prometheus-client's own parser, matching a workload the test drives on a real server; served over
HTTP with --listen (a scrape answered, Ctrl-C ends it with exit 0); bad input refused in one line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PROVISION, drop_bot_objects, snapshot
from .test_top import ROWS, bot_conn, db, wait_for


def families(text: str) -> dict[str, object]:
    """Every family parsed; each must be typed (a sample without its HELP/TYPE parses as untyped)."""
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    untyped = [name for name, f in parsed.items() if f.type == "unknown" or f.type == "untyped"]
    assert untyped == [], f"samples outside a declared family: {untyped}"
    return parsed


def value(parsed: dict, sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total")
    found = [s.value for s in parsed[family].samples
             if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample_name}{labels}: {found}"
    return found[0]


@pytest.fixture
def busy_bot(fleet, admin) -> Iterator[str]:
    """A bot with ROWS rows inserted and one idle session."""
    name = fleet.name("metrics")
    fleet.add(name, "--no-migrate")
    with bot_conn(fleet, name) as conn:
        conn.execute("CREATE TABLE events (id int PRIMARY KEY)")
        conn.execute("INSERT INTO events SELECT generate_series(1, %s)", (ROWS,))
        conn.execute("DELETE FROM events WHERE id <= 5")
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")
        wait_for(admin, "SELECT coalesce(tup_deleted, 0) >= 5 FROM pg_stat_database WHERE datname = %s",
                 (db(name),), "the rows written")
        yield name


def test_metrics_parse_and_match_the_workload(fleet, busy_bot):
    proc = fleet.run("metrics")
    assert proc.returncode == 0, proc.stderr
    parsed = families(proc.stdout)
    bot = {"server": "default", "bot": busy_bot}
    assert value(parsed, "botfleet_up", server="default") == 1
    assert value(parsed, "botfleet_bot_rows_inserted_total", **bot) >= ROWS
    assert value(parsed, "botfleet_bot_rows_deleted_total", **bot) >= 5
    assert value(parsed, "botfleet_bot_rows_written_total", **bot) >= ROWS + 5
    assert value(parsed, "botfleet_bot_transactions_total", **bot) >= 3
    assert value(parsed, "botfleet_bot_connections", **bot, state="idle") == 1
    assert value(parsed, "botfleet_bot_connections", **bot, state="active") == 0
    assert value(parsed, "botfleet_bot_connection_limit", **bot) == 6
    assert value(parsed, "botfleet_bot_database_size_bytes", **bot) > 0
    assert value(parsed, "botfleet_bot_lock_waiting_sessions", **bot) == 0
    assert parsed["botfleet_bot_rows_inserted"].type == "counter"
    assert parsed["botfleet_bot_database_size_bytes"].type == "gauge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_listen_answers_a_scrape_and_ends_on_ctrl_c(fleet, busy_bot):
    port = free_port()
    proc = subprocess.Popen([PROVISION, "metrics", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=fleet.env())
    try:
        for line in proc.stderr:  # the server's banner, then the address it serves
            if line.startswith("serving "):
                break
        assert line.strip() == f"serving http://127.0.0.1:{port}/metrics (Ctrl-C to stop)"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            parsed = families(answer.read().decode())
        assert value(parsed, "botfleet_bot_rows_inserted_total", server="default", bot=busy_bot) >= ROWS
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
        assert missing.value.code == 404
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err


def test_metrics_lists_every_server_of_the_fleet(fleet, other_server):
    (fleet.root / "fleet.toml").write_text(f'[servers.second]\nadmin_url = "{other_server.url}"\nmax_connections = 40\n')
    name = fleet.name("metrics-2")
    try:
        fleet.add(name, "--no-migrate", "--server", "second")
        proc = fleet.run("metrics")
        assert proc.returncode == 0, proc.stderr
        parsed = families(proc.stdout)
        assert value(parsed, "botfleet_up", server="second") == 1
        assert value(parsed, "botfleet_bot_connection_limit", server="second", bot=name) == 6
    finally:
        with other_server.connect() as conn:
            drop_bot_objects(conn, [name])


@pytest.mark.parametrize("args, why", [
    (["metrics", "t-no-such-bot"], "not in the fleet registry: t-no-such-bot"),
    (["metrics", "--listen", "9187"], "--listen must be ADDRESS:PORT"),
    (["metrics", "--listen", "example.com:9187"], "--listen must be ADDRESS:PORT"),
    (["metrics", "--listen", "127.0.0.1:99999"], "--listen must be ADDRESS:PORT"),
])
def test_metrics_refuse_bad_input_in_one_line_and_change_nothing(fleet, admin, args, why):
    fleet.add(fleet.name("bad"), "--no-migrate")
    before = snapshot(admin)
    proc = fleet.run(*args)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and why in line, line
    assert proc.stdout == "" and snapshot(admin) == before


def test_a_port_in_use_is_one_line(fleet):
    fleet.add(fleet.name("busy"), "--no-migrate")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = fleet.run("metrics", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_server_that_does_not_answer_is_up_0_and_the_others_are_still_read(fleet, busy_bot):
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text()
                    + '\n[servers.down]\nadmin_url = "postgresql://postgres@127.0.0.1:1/postgres"\nmax_connections = 40\n')
    proc = fleet.run("metrics")
    assert proc.returncode == 1  # printed all the same, and the exit code says a server was not read
    parsed = families(proc.stdout)
    assert value(parsed, "botfleet_up", server="down") == 0 and value(parsed, "botfleet_up", server="default") == 1
    assert value(parsed, "botfleet_bot_rows_inserted_total", server="default", bot=busy_bot) >= ROWS
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        "error: server down not read: cannot reach PostgreSQL at postgres@127.0.0.1:1/postgres: connection refused "
        "(is the server running and listening there?)"]

    top = fleet.run("top", "--once", "--json", "--interval", "0.1")
    assert top.returncode == 1
    frame = json.loads(top.stdout)
    assert list(frame["unreachable"]) == ["down"] and [s["server"] for s in frame["servers"]] == ["default"]
