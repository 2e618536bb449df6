"""The stack's metrics exporter reads the server as its own monitoring role, and only reads.

A fleet is rendered with ``--exporter``; the rendered postgresql.conf, pg_hba.conf and TLS pair run
on a throwaway cluster (Debian's binaries: the stack's TLS), the way test_stack_server_access does.
The monitoring role is made by the code the stack's provision service runs, then ``provision
metrics`` reads the server through the URL file render wrote (its host and certificate path
turned into this machine's), as the exporter's container does. The e2e suite runs the service.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning import monitoring, passwords
from provisioning.compose import PG_HBA
from provisioning.db import STATE_DATABASE

from .conftest import provision, rendered_stack_cluster
from .test_compose import FAKE, all_passwords, make_project, run

ADMIN_PASSWORD = "admin-" + passwords.generate()
BOT, DB = "hello_bot_user", "hello_bot_db"


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """(root, port, files, admin connection in botfleet's database) of a rendered stack with an exporter."""
    base = tmp_path_factory.mktemp("exporter")
    root = make_project(base / "fleet")
    proc = run(root, "render", "--exporter", "--exporter-publish", "127.0.0.1:19187")
    assert proc.returncode == 0, proc.stderr
    server, port, files = rendered_stack_cluster(base, root, ADMIN_PASSWORD, (BOT, FAKE["hello-bot"], DB))
    admin = connect(port, files, "postgres", ADMIN_PASSWORD, STATE_DATABASE)
    try:
        yield root, port, files, admin
    finally:
        admin.close()
        server.destroy()


def connect(port: int, files: Path, user: str, password: str, dbname: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname,
                           sslmode="verify-full", sslrootcert=str(files / "postgres-tls.crt"), connect_timeout=10,
                           autocommit=True)


def host_url_file(root: Path, port: int, files: Path) -> Path:
    """The URL file render wrote, with the stack's host and certificate path turned into this machine's."""
    text = (root / monitoring.URL_FILE).read_text()
    text = text.replace("@postgres:5432/", f"@127.0.0.1:{port}/").replace(
        "/etc/botfleet/postgres-ca.crt", str(files / "postgres-tls.crt"))
    path = root / "secrets" / "monitor-host.url"
    path.write_text(text)
    return path


def test_render_makes_the_monitoring_secret_once_and_keeps_it(monitored):
    root, *_ = monitored
    url = root / monitoring.URL_FILE
    assert oct(url.stat().st_mode & 0o777) == "0o444" and oct((root / "secrets").stat().st_mode & 0o777) == "0o700"
    before = url.read_text()
    found = monitoring.read_url_file(url)
    assert found is not None and len(found.password) >= 40 and f"{monitoring.ROLE}:" in before
    assert run(root, "render").returncode == 0
    assert url.read_text() == before  # the password survives a render
    hba = (root / PG_HBA).read_text()
    assert f"hostssl   {STATE_DATABASE}" in hba and monitoring.ROLE in hba
    compose = (root / "compose.yaml").read_text()
    assert '"127.0.0.1:19187:9187"' in compose and found.password not in compose


def test_the_monitoring_role_is_made_with_pg_monitor_only_and_converges(monitored):
    root, port, files, admin = monitored
    password = monitoring.read_url_file(root / monitoring.URL_FILE).password
    first = monitoring.converge(admin, password)
    assert "created" in first and "pg_monitor" in first
    assert monitoring.converge(admin, password) == []  # again: nothing to change
    row = admin.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolconnlimit, "
                        "pg_has_role(rolname, 'pg_monitor', 'MEMBER') FROM pg_roles WHERE rolname = %s",
                        (monitoring.ROLE,)).fetchone()
    assert row == (False, False, False, False, False, monitoring.CONNECTION_LIMIT, True)
    # Drift is put back: a raised limit and a changed password.
    admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 50 PASSWORD 'something-else'").format(
        sql.Identifier(monitoring.ROLE)))
    assert monitoring.converge(admin, password) == ["attributes", "password"]
    with connect(port, files, monitoring.ROLE, password, STATE_DATABASE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (monitoring.ROLE,)


def test_the_monitoring_role_reads_statistics_and_nothing_else(monitored):
    root, port, files, admin = monitored
    password = monitoring.read_url_file(root / monitoring.URL_FILE).password
    monitoring.converge(admin, password)
    admin.execute("CREATE TABLE IF NOT EXISTS exporter_probe (secret text)")
    with connect(port, files, monitoring.ROLE, password, STATE_DATABASE) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM exporter_probe")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE mine (x int)")
    # pg_hba: not the maintenance databases; CONNECT: not a bot's database.
    for db in ("postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
            connect(port, files, monitoring.ROLE, password, db)
    with pytest.raises(psycopg.OperationalError, match="permission denied|not permitted"):
        connect(port, files, monitoring.ROLE, password, DB)


def test_provision_metrics_reads_the_server_as_the_monitoring_role(monitored):
    from prometheus_client.parser import text_string_to_metric_families

    root, port, files, admin = monitored
    password = monitoring.read_url_file(root / monitoring.URL_FILE).password
    monitoring.converge(admin, password)
    with connect(port, files, BOT, FAKE["hello-bot"], DB) as bot:
        bot.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        bot.execute("INSERT INTO t SELECT generate_series(1, 25)")
    # (its statistics reach the server when its session ends)
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1", BOTFLEET_MONITOR_URL_FILE=str(host_url_file(root, port, files)))
    proc = provision(["metrics", "hello-bot"], env)
    assert proc.returncode == 0, proc.stderr
    families = {f.name: f for f in text_string_to_metric_families(proc.stdout)}
    assert [s.value for s in families["botfleet_up"].samples] == [1.0]
    inserted = [s for s in families["botfleet_bot_rows_inserted"].samples if s.labels.get("bot") == "hello-bot"]
    assert inserted and inserted[0].value >= 25
    limits = [s for s in families["botfleet_bot_connection_limit"].samples if s.labels.get("bot") == "hello-bot"]
    assert limits, proc.stdout
    # It read as botfleet_monitor, and closed its one connection (the backend ends a moment later).
    for _ in range(100):
        sessions = admin.execute("SELECT application_name FROM pg_stat_activity WHERE usename = %s",
                                 (monitoring.ROLE,)).fetchall()
        if not sessions:
            break
        time.sleep(0.05)
    assert sessions == [], sessions
    for secret in [password, ADMIN_PASSWORD, *all_passwords()]:
        assert secret not in proc.stdout + proc.stderr


def test_a_missing_monitoring_url_file_is_one_clear_line(monitored):
    root, *_ = monitored
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1", BOTFLEET_MONITOR_URL_FILE=str(root / "nope.url"))
    proc = provision(["metrics"], env)
    assert proc.returncode != 0 and "BOTFLEET_MONITOR_URL_FILE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_bad_exporter_address_is_one_line_and_changes_nothing(tmp_path):
    root = make_project(tmp_path / "fleet")
    registry = (root / "fleet.toml").read_text()
    proc = run(root, "render", "--exporter", "--exporter-publish", "not-an-address")
    assert proc.returncode == 2, proc.stderr
    assert "exporter_publish must be ADDRESS:PORT" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (root / "fleet.toml").read_text() == registry
    assert not (root / monitoring.URL_FILE).exists() and not (root / "compose.yaml").exists()
