"""The compose stack's archive service, run on this machine against the stack's rendered server.

A fleet is rendered with ``--archive``; the rendered postgresql.conf, pg_hba.conf and TLS pair run
on a throwaway cluster (Debian's binaries: the stack's TLS), as in test_exporter_role. The backup
role is made by the code the stack's provision service runs; then the rendered service loop
(``deploy/archive-service.py``) runs one round with the rendered barman.conf, its container paths
turned into this machine's (barman from this venv instead of the image's Debian package). The e2e
suite runs the service in its container on a real Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning import archive, budget, passwords
from provisioning.compose import ARCHIVE_CONF, ARCHIVE_PGPASS, ARCHIVE_SERVICE, PG_HBA, POSTGRES_CONF
from provisioning.db import STATE_DATABASE

from .conftest import provision, rendered_stack_cluster, tls_binaries
from .test_compose import FAKE, all_passwords, make_project, run

ADMIN_PASSWORD = "admin-" + passwords.generate()
BOT, DB = "hello_bot_user", "hello_bot_db"
pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("barman").exists(),
                                reason="barman is not installed (pip install -e '.[archive]')")


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """(root, port, files, admin URL, admin connection) of a rendered stack with an archive service."""
    base = tmp_path_factory.mktemp("archive-stack")
    root = make_project(base / "fleet")
    proc = run(root, "render", "--archive")
    assert proc.returncode == 0, proc.stderr
    server, port, files = rendered_stack_cluster(base, root, ADMIN_PASSWORD, (BOT, FAKE["hello-bot"], DB))
    admin_pass = base / "admin.pgpass"
    admin_pass.write_text(f"*:*:*:postgres:{ADMIN_PASSWORD}\n")
    admin_pass.chmod(0o600)
    url = (f"postgresql://postgres@127.0.0.1:{port}/{STATE_DATABASE}?passfile={admin_pass}"
           f"&sslmode=verify-full&sslrootcert={files / 'postgres-tls.crt'}")
    admin = psycopg.connect(url, autocommit=True)
    try:
        yield root, port, files, url, admin
    finally:
        admin.close()
        subprocess.run(["pkill", "-f", "--", f"--directory={base}"], check=False)  # a receiver a failed test left
        server.destroy()


def connect(port: int, files: Path, user: str, password: str, dbname: str, **kw) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname,
                           sslmode="verify-full", sslrootcert=str(files / "postgres-tls.crt"), connect_timeout=10,
                           autocommit=True, **kw)


def backup_password(root: Path) -> str:
    password = archive.read_passfile(root / ARCHIVE_PGPASS)
    assert password is not None and len(password) >= 40
    return password


def test_render_adds_the_archive_settings_hba_line_and_a_passfile_kept_from_render_to_render(archived):
    root, *_ = archived
    pgpass = root / ARCHIVE_PGPASS
    assert oct(pgpass.stat().st_mode & 0o777) == "0o600"
    before = pgpass.read_text()
    assert run(root, "render").returncode == 0
    assert pgpass.read_text() == before  # the password survives a render
    conf = (root / POSTGRES_CONF).read_text()
    assert "wal_level = replica" in conf and f"max_wal_senders = {budget.ARCHIVE_WAL_SENDERS}" in conf
    assert "max_slot_wal_keep_size = 4GB" in conf
    assert re.search(rf"hostssl\s+replication,postgres\s+{archive.ROLE}\s+samenet\s+scram-sha-256", (root / PG_HBA).read_text())
    barman_conf = (root / ARCHIVE_CONF).read_text()
    assert "sslmode=verify-full" in barman_conf and "passfile=/run/barman/pgpass" in barman_conf
    assert "retention_policy = RECOVERY WINDOW OF 7 DAYS" in barman_conf and "last_backup_maximum_age = 2 DAYS" in barman_conf
    for name in ("compose.yaml", "compose.stack.yaml", ARCHIVE_CONF, ARCHIVE_SERVICE, POSTGRES_CONF):
        text = (root / name).read_text()
        assert backup_password(root) not in text and all(p not in text for p in all_passwords())


def test_the_budget_counts_the_archive(archived):
    root, *_ = archived
    on = json.loads(run(root, "budget", "--json").stdout)
    default = on if "reserve" in on else on["default"]
    assert default["archive_connections"] == budget.ARCHIVE_CONNECTIONS
    assert default["memory"]["wal_senders"] == budget.ARCHIVE_WAL_SENDERS
    assert default["reserve"] >= budget.ARCHIVE_CONNECTIONS + 3


def test_the_backup_role_is_made_with_replication_only_and_converges(archived):
    root, port, files, url, admin = archived
    password = backup_password(root)
    first = archive.converge_role(admin, url, password, 15)
    assert "created" in first and "pg_read_all_settings" in first
    assert archive.converge_role(admin, url, password, 15) == []  # again: nothing to change
    row = admin.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolconnlimit "
                        "FROM pg_roles WHERE rolname = %s", (archive.ROLE,)).fetchone()
    assert row == (False, False, False, True, False, archive.CONNECTION_LIMIT)
    admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 50 CREATEDB PASSWORD 'something-else'").format(
        sql.Identifier(archive.ROLE)))
    assert archive.converge_role(admin, url, password, 15) == ["attributes", "password"]
    # It reaches the postgres database and the replication protocol, nothing else.
    with connect(port, files, archive.ROLE, password, "postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (archive.ROLE,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE mine (x int)")
    with connect(port, files, archive.ROLE, password, "postgres", replication="true") as conn:
        assert conn.pgconn.status == psycopg.pq.ConnStatus.OK
    for db in (STATE_DATABASE, "template1", DB):
        with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
            connect(port, files, archive.ROLE, password, db)


def host_copy(root: Path, port: int, files: Path, home: Path) -> tuple[Path, Path]:
    """The rendered barman.conf and the passfile with the container's paths turned into this machine's."""
    home.mkdir(mode=0o700, exist_ok=True)
    passfile = home.parent / "backup.pgpass"
    passfile.write_text((root / ARCHIVE_PGPASS).read_text())
    passfile.chmod(0o600)
    import getpass

    text = (root / ARCHIVE_CONF).read_text()
    for old, new in (("host=postgres port=5432", f"host=127.0.0.1 port={port}"), ("/run/barman/pgpass", str(passfile)),
                     ("/etc/botfleet/postgres-ca.crt", str(files / "postgres-tls.crt")),
                     ("barman_home = /var/lib/barman", f"barman_home = {home}"),
                     ("barman_user = barman", f"barman_user = {getpass.getuser()}"),
                     ("log_file = /dev/stderr", f"log_file = {home.parent / 'barman.log'}"),
                     ("path_prefix = /usr/lib/postgresql/17/bin", f"path_prefix = {tls_binaries()}")):
        assert old in text, old
        text = text.replace(old, new)
    conf = home.parent / "barman.conf"
    conf.write_text(text)
    return conf, passfile


def run_service(root: Path, conf: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ.update(BOTFLEET_BARMAN_CONFIG=str(conf), BOTFLEET_BARMAN_HOME=str(home), BOTFLEET_ARCHIVE_ROUNDS="1",
                   BOTFLEET_ARCHIVE_HEALTH=str(home.parent / "healthy"),
                   PATH=f"{Path(sys.executable).parent}:{environ.get('PATH', '')}", **env)
    return subprocess.run([sys.executable, str(root / ARCHIVE_SERVICE)], capture_output=True, text=True, env=environ,
                          timeout=600, stdin=subprocess.DEVNULL)


def list_backups(conf: Path) -> list[dict]:
    proc = subprocess.run([str(Path(sys.executable).with_name("barman")), "-c", str(conf), "-f", "json", "list-backups",
                           "default"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [b for b in json.loads(proc.stdout)["default"] if b["status"] == "DONE"]


def test_the_service_loop_streams_backs_up_on_its_schedule_and_reports_health(archived):
    root, port, files, url, admin = archived
    archive.converge_role(admin, url, backup_password(root), 15)
    home = root.parent / "barman-home"
    conf, _ = host_copy(root, port, files, home)
    first = run_service(root, conf, home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "base backup done" in first.stdout and "every check passed" in first.stdout, first.stdout
    assert (home.parent / "healthy").exists()
    assert len(list_backups(conf)) == 1
    slot = admin.execute("SELECT slot_type FROM pg_replication_slots WHERE slot_name = %s", (archive.SLOT,)).fetchone()
    assert slot == ("physical",)
    # Again within base_every: streams and checks, no new base backup.
    again = run_service(root, conf, home)
    assert again.returncode == 0 and "taking a base backup" not in again.stdout, again.stdout
    assert len(list_backups(conf)) == 1
    # A recovery asks for a base backup at once (the marker recover leaves), within base_every.
    marker = home / "default" / "botfleet-backup-now"
    marker.touch()
    asked = run_service(root, conf, home)
    assert asked.returncode == 0 and "base backup done" in asked.stdout, asked.stdout
    assert len(list_backups(conf)) == 2 and not marker.exists()
    # A base backup is due at once with base_every 0.
    due = run_service(root, conf, home, BOTFLEET_BASE_EVERY="0")
    assert due.returncode == 0 and "base backup done" in due.stdout, due.stdout
    assert len(list_backups(conf)) == 3
    for secret in [backup_password(root), ADMIN_PASSWORD, *all_passwords()]:
        for proc in (first, again, asked, due):
            assert secret not in proc.stdout + proc.stderr


def test_doctor_and_list_report_a_stack_archive_that_does_not_stream(archived):
    root, port, files, url, admin = archived
    # After the service's runs the slot exists and nothing streams from it (the loop stopped its receiver).
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1", ADMIN_DATABASE_URL=url)
    if admin.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (archive.SLOT,)).fetchone() is None:
        admin.execute("SELECT pg_create_physical_replication_slot(%s, true)", (archive.SLOT,))
    doctor = provision(["doctor", "--json"], env)
    findings = [f for f in json.loads(doctor.stdout)["remaining"] if f["check"] == "archive"]
    assert any("does not stream" in f["message"] and archive.SLOT in f["message"] for f in findings), findings
    listed = provision(["list"], env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"archive: .*not streaming", listed.stdout), listed.stdout
    assert ADMIN_PASSWORD not in doctor.stdout + doctor.stderr + listed.stdout + listed.stderr


def test_a_bad_base_every_or_max_wal_kept_is_one_line_and_changes_nothing(tmp_path):
    root = make_project(tmp_path / "fleet")
    for bad in ('base_every = "sometimes"', 'max_wal_kept = "lots"'):
        registry = (root / "fleet.toml").read_text().replace("[backup]\n", "") + f"\n[backup]\n{bad}\n"
        (root / "fleet.toml").write_text(registry)
        proc = run(root, "render", "--archive")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and bad.split()[0] in proc.stderr, proc.stderr
        assert (root / "fleet.toml").read_text() == registry
        assert not (root / ARCHIVE_PGPASS).exists() and not (root / "compose.yaml").exists()
        (root / "fleet.toml").write_text(registry.replace(f"\n[backup]\n{bad}\n", ""))
