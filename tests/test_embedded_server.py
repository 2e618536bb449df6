"""The embedded default: started on demand, reused, reported, stopped; data survives."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import psycopg
import pytest

from provisioning.embedded import EmbeddedServer

from .conftest import PROVISION


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "fleet"
    root.mkdir()
    yield root
    EmbeddedServer(root / ".botfleet").destroy()


def run(project, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env["NO_COLOR"] = "1"
    return subprocess.run([PROVISION, *args, "--project-dir", str(project)], capture_output=True, text=True,
                          env=env, timeout=180, stdin=subprocess.DEVNULL)


def test_embedded_server_lifecycle(project):
    status = json.loads(run(project, "server", "status", "--json").stdout)
    assert status["initialized"] is False and status["running"] is False

    proc = run(project, "add-bot", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "(from embedded)" in proc.stderr
    assert json.loads(proc.stdout)["status"] == "created"
    status = json.loads(run(project, "server", "status", "--json").stdout)
    assert status["running"] is True and status["version"] == "18"
    assert status["pgdata"].startswith(str(project / ".botfleet"))
    assert stat.S_IMODE((project / ".botfleet" / "pgdata").stat().st_mode) == 0o700

    # The admin socket is private; bots use TCP with SCRAM passwords.
    server = EmbeddedServer(project / ".botfleet")
    with psycopg.connect(server.admin_url()) as conn:
        hba = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules ORDER BY line_number").fetchall()
    assert ("local", "trust") in hba and ("host", "scram-sha-256") in hba and ("host", "trust") not in hba

    proc = run(project, "server", "stop")
    assert proc.returncode == 0 and "stopped" in proc.stdout
    assert json.loads(run(project, "server", "status", "--json").stdout)["running"] is False

    # The next command starts it again, and the bot is still there.
    proc = run(project, "add-bot", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "already provisioned"
    assert "running" in run(project, "server", "status").stdout
    assert run(project, "server", "stop").returncode == 0
    assert "was not running" in run(project, "server", "stop").stdout


def test_server_start_and_stop_answer_in_json(project):
    started = run(project, "server", "start", "--json")
    assert started.returncode == 0, started.stderr
    first = json.loads(started.stdout)
    assert first["running"] is True and first["moved_from"] is None and first["repoint"] == []
    again = json.loads(run(project, "server", "start", "--json").stdout)
    assert again["port"] == first["port"] and again["pid"] == first["pid"]
    assert json.loads(run(project, "server", "stop", "--json").stdout) == {"running": False, "was_running": True}
    assert json.loads(run(project, "server", "stop", "--json").stdout) == {"running": False, "was_running": False}
