"""`--db-host` / `--db-port`: how the host reaches a bot's server, and the way back (issue 15 item 7).

They set only the DATABASE_URL of the bot's env file (a bot run on the host for
development); `--db-host default` / `--db-port default` return it to its server's endpoint.
Where the bot runs in the compose stack does not follow them: a bot on the default server is
always rendered against the stack's postgres.
"""

from __future__ import annotations

import tomllib

from provisioning import compose_check

from .conftest import snapshot, tree


def entry(fleet, name: str) -> dict:
    return tomllib.loads((fleet.root / "fleet.toml").read_text())["bots"][name]


def test_db_host_and_port_default_undo_an_override(fleet):
    name = fleet.name("dbh")
    fleet.add(name, "--db-host", "127.0.0.1", "--db-port", "5433")
    assert "@127.0.0.1:5433/" in fleet.env_file(name).read_text()

    proc = fleet.run("add-bot", name, "--db-host", "default", "--db-port", "default")
    assert proc.returncode == 0, proc.stderr
    assert "@postgres:5432/" in fleet.env_file(name).read_text(), "back to the server's endpoint ([server] bot_host)"
    assert (entry(fleet, name)["db_host"], entry(fleet, name)["db_port"]) == ("", 0)
    again = fleet.run("add-bot", name)
    assert again.returncode == 0 and "@postgres:5432/" in fleet.env_file(name).read_text(), "a rerun keeps the default"


def test_db_port_default_and_a_bad_port_is_refused_and_changes_nothing(fleet, admin):
    name = fleet.name("dbp")
    fleet.add(name, "--db-port", "6000")
    assert fleet.run("add-bot", name, "--db-port", "default").returncode == 0
    assert "@postgres:5432/" in fleet.env_file(name).read_text()
    fleet.add(name, "--db-port", "6000")
    before, files, text = snapshot(admin), tree(fleet.root), fleet.env_file(name).read_text()
    for port in ("0", "70000", "defaults", "-1"):
        proc = fleet.run("add-bot", name, "--db-port", port)
        assert proc.returncode == 2, (port, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "--db-port" in errors[0], (port, proc.stderr)
    assert snapshot(admin) == before and tree(fleet.root) == files and fleet.env_file(name).read_text() == text


def test_a_bot_run_on_the_host_stays_in_the_stack(code_fleet):
    name = code_fleet.name("onhost")
    code_fleet.add(name, "--code", "chat-bot", "--no-migrate", "--db-host", "127.0.0.1", "--db-port", "54329")
    proc = code_fleet.run("render")
    assert proc.returncode == 0, proc.stderr

    services = compose_check.load_yaml((code_fleet.root / "compose.yaml").read_text())["services"]
    assert name in services, "a bot whose env file points at the host still runs in the stack"
    url = (code_fleet.root / "secrets" / f"{name}.url").read_text()
    assert "@postgres:5432/" in url, "in the stack it reaches the stack's postgres"
    assert "@127.0.0.1:54329/" in code_fleet.env_file(name).read_text(), "its env file keeps the host's address"
