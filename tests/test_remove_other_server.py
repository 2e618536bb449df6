"""remove-bot for a bot fleet.toml no longer names (issue 15, item 1): a remove that dropped
nothing keeps the bot's credentials, does not say `removed`, and names the server that holds
it; `--server` then removes it there. Two real servers: the test server and `other_server`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from .conftest import Fleet, TestServer, drop_bot_objects, snapshot


def stem(name: str) -> str:
    return name.replace("-", "_")


def on_server(server: TestServer, name: str) -> tuple[bool, bool]:
    """(database exists, role exists) on ``server``."""
    with server.connect() as conn:
        db = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"{stem(name)}_db",)).fetchone()
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (f"{stem(name)}_user",)).fetchone()
    return db is not None, role is not None


def forget(fleet: Fleet, name: str) -> None:
    """Delete the bot's table from fleet.toml by hand, as an operator editing the file would."""
    path = fleet.root / "fleet.toml"
    text = path.read_text()
    edited = re.sub(rf"\n\[bots\.{re.escape(name)}\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", text)
    assert edited != text and f"[bots.{name}]" not in edited
    path.write_text(edited)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def db2(fleet, other_server) -> Iterator[tuple[Fleet, TestServer]]:
    """A fleet whose fleet.toml names the other server as [servers.db2]."""
    (fleet.root / "fleet.toml").write_text(f'[servers.db2]\nadmin_url = "{other_server.url}"\nmax_connections = 40\n')
    yield fleet, other_server
    with other_server.connect() as conn:
        drop_bot_objects(conn, fleet.names)


def test_removing_a_forgotten_bot_of_another_server_keeps_its_credentials_and_says_where(db2, pg, admin):
    fleet, second = db2
    name = fleet.name("db2-old")
    fleet.add(name, "--server", "db2")
    assert on_server(second, name) == (True, True) and on_server(pg, name) == (False, False)
    forget(fleet, name)
    env_before = fleet.env_file(name).read_bytes()
    registry_before = (fleet.root / "fleet.toml").read_text()
    default_before = snapshot(admin)

    proc = fleet.run("remove-bot", name, "--yes")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "removed" not in proc.stdout and "dropped" not in proc.stdout
    [error] = errors(proc.stderr)
    assert f"provision remove-bot {name} --server db2" in error and "nothing was changed" in error
    assert fleet.env_file(name).read_bytes() == env_before, "the only copy of its password was kept"
    assert on_server(second, name) == (True, True)
    assert (fleet.root / "fleet.toml").read_text() == registry_before and snapshot(admin) == default_before
    assert not (fleet.root / "backups" / name).exists()

    proc = fleet.run("remove-bot", name, "--server", "db2", "--yes", "--no-backup")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}: removed" in proc.stdout
    assert on_server(second, name) == (False, False) and not fleet.env_file(name).exists()
    assert fleet.run("remove-bot", name, "--server", "db2", "--yes").returncode == 0, "a second run is harmless"


def test_a_forgotten_bot_that_no_server_holds_keeps_its_env_file(fleet, pg):
    """Its database and role are on no server of the fleet (a server fleet.toml does not name,
    or a rebuilt one): its credentials are the only copy of its password, so they stay."""
    name = fleet.name("gone")
    fleet.add(name)
    with pg.connect() as conn:
        drop_bot_objects(conn, [name])
    forget(fleet, name)
    env_before = fleet.env_file(name).read_bytes()
    proc = fleet.run("remove-bot", name, "--yes", "--no-backup")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "removed" not in proc.stdout
    [error] = errors(proc.stderr)
    assert "are kept" in error and "--server NAME" in error and "nothing was changed" in error
    assert fleet.env_file(name).read_bytes() == env_before

    # A forgotten bot the default server does hold is removed there, env file and all.
    name = fleet.name("stray")
    fleet.add(name)
    forget(fleet, name)
    proc = fleet.run("remove-bot", name, "--yes", "--no-backup")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}: removed" in proc.stdout and "dropped  env file" in proc.stdout
    assert on_server(pg, name) == (False, False) and not fleet.env_file(name).exists()


def test_a_registry_bot_the_server_reached_does_not_hold_keeps_its_credentials_unless_forgotten(fleet, other_server, pg,
                                                                                                 admin):
    """The wrong server reached (another ADMIN_DATABASE_URL; without one, a new embedded server):
    remove-bot of a bot fleet.toml names finds neither its database nor its role there. It used
    to drop the env file (the only copy of the password of a bot that still lives on its real
    server) and the entry; now it refuses and changes nothing, and --forget is the way to drop a
    bot that is really gone."""
    name = fleet.name("elsewhere")
    fleet.add(name)
    env_before = fleet.env_file(name).read_bytes()
    registry_before = (fleet.root / "fleet.toml").read_text()

    wrong = fleet.run("remove-bot", name, "--yes", env=fleet.env(ADMIN_DATABASE_URL=other_server.url))
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    (error,) = errors(wrong.stderr)
    assert "has no database or role of it" in error and f"{stem(name)}_db" in error, error
    assert "set ADMIN_DATABASE_URL" in error and f"remove-bot {name} --forget" in error and "nothing was changed" in error
    assert "removed" not in wrong.stdout
    assert fleet.env_file(name).read_bytes() == env_before
    assert (fleet.root / "fleet.toml").read_text() == registry_before
    assert on_server(pg, name) == (True, True)

    # Gone for real (dropped by hand on its server): refused the same way, then --forget.
    drop_bot_objects(admin, [name])
    assert fleet.run("remove-bot", name, "--yes").returncode == 2
    assert fleet.env_file(name).read_bytes() == env_before
    forgotten = fleet.run("remove-bot", name, "--yes", "--forget")
    assert forgotten.returncode == 0, forgotten.stderr
    assert not fleet.env_file(name).exists() and f"[bots.{name}]" not in (fleet.root / "fleet.toml").read_text()
    assert fleet.run("remove-bot", name, "--yes").returncode == 0, "a second run is harmless"


def test_a_command_that_makes_a_new_embedded_server_says_the_fleets_bots_are_not_on_it(fleet):
    name = fleet.name("on-pg")
    fleet.add(name)
    env = {k: v for k, v in fleet.env().items() if k != "ADMIN_DATABASE_URL"}
    try:
        first = fleet.run("list", env=env)
        assert first.returncode == 0, first.stderr
        assert ("note: no ADMIN_DATABASE_URL is set, so a NEW embedded server is made in "
                f"{fleet.root / '.botfleet'}: fleet.toml's 1 bot(s) on the default server are not on it") in first.stderr
        assert any(line.split()[:2] == [name, "missing"] for line in first.stdout.splitlines()), first.stdout
        again = fleet.run("list", env=env)  # the server is this folder's now: said once
        assert again.returncode == 0 and "NEW embedded server" not in again.stderr, again.stderr
    finally:
        fleet.run("server", "stop", env=env)
