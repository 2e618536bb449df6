"""A read-only command in a folder without fleet.toml (issue 15 item 11): it says there is no
fleet here, in one line with the folder and how to start one, and creates nothing (no
.botfleet/, no embedded cluster, no PostgreSQL left running)."""

from __future__ import annotations

import pytest

from provisioning.embedded import EmbeddedServer

READ_ONLY = (("list",), ("list", "--json"), ("plan",), ("doctor",), ("current",), ("budget",), ("backups",))


@pytest.fixture
def empty(tmp_path):
    """An empty folder; whatever a command wrongly starts there is destroyed afterwards."""
    root = tmp_path / "not-a-fleet"
    root.mkdir()
    yield root
    if (root / ".botfleet").exists():
        EmbeddedServer(root / ".botfleet").destroy()


def no_admin_url(fleet, root) -> dict[str, str]:
    """The user's environment: no ADMIN_DATABASE_URL, so the embedded server would be used."""
    env = fleet.env(BOTFLEET_HOME=str(root))
    del env["ADMIN_DATABASE_URL"]
    return env


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(a))
def test_a_read_only_command_outside_a_fleet_says_so_and_creates_nothing(fleet, empty, args):
    proc = fleet.run(*args, env=no_admin_url(fleet, empty))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: no fleet here: {empty} has no fleet.toml")
    assert "provision add-bot NAME" in lines[0] and "--project-dir" in lines[0]
    assert list(empty.iterdir()) == [], "nothing is created in the folder"
    assert not EmbeddedServer(empty / ".botfleet").status().running


def test_the_same_folder_once_it_holds_a_fleet_starts_its_server_on_demand(fleet, empty):
    """The refusal is about the missing fleet.toml only: once the folder holds a fleet (empty
    here), `list` starts its embedded server as before."""
    env = no_admin_url(fleet, empty)
    refused = fleet.run("list", "--json", env=env)
    assert refused.returncode == 2 and "no fleet here" in refused.stderr
    assert '"error"' in refused.stdout  # under --json the error is a JSON object on stdout too
    assert list(empty.iterdir()) == []
    (empty / "fleet.toml").write_text("version = 1\n")
    proc = fleet.run("list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "(from embedded)" in proc.stderr and proc.stdout.strip() == "[]"
    assert EmbeddedServer(empty / ".botfleet").status().running
