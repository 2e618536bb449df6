"""The generated password never reaches the server's log, the output, or process arguments."""

from __future__ import annotations

import time

import pytest

from .conftest import assert_no_leak, assert_same_secret


@pytest.fixture
def log_all_statements(scram_server):
    with scram_server.connect() as conn:
        conn.execute("ALTER SYSTEM SET log_statement = 'all'")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
    yield scram_server.embedded.log
    with scram_server.connect() as conn:
        conn.execute("ALTER SYSTEM RESET log_statement")
        conn.execute("SELECT pg_reload_conf()")


def test_password_never_reaches_the_server_log(scram_fleet, log_all_statements):
    log = log_all_statements
    start = log.stat().st_size
    name = scram_fleet.name("secret")
    first = scram_fleet.add(name)
    first_password = scram_fleet.password(name)
    rotated = scram_fleet.add(name, "--rotate-password")
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(start)
        logged = fh.read()
    # The log really recorded the DDL (so the absence below means something) ...
    role = name.replace("-", "_") + "_user"
    assert f'CREATE ROLE "{role}"' in logged and "SCRAM-SHA-256$" in logged
    # ... but only the verifier: neither the first nor the rotated password.
    password = scram_fleet.password(name)
    assert_same_secret(password, first_password, same=False)
    for secret in (first_password, password):
        assert_no_leak(secret, logged, where="server log")
        assert_no_leak(secret, first.stdout, first.stderr, rotated.stdout, rotated.stderr)


def test_help_and_errors_never_show_the_password(fleet):
    name = fleet.name("quiet")
    fleet.add(name)
    password = fleet.password(name)
    outputs = [fleet.run_process("--help"), fleet.run_process("add-bot", "--help"),  # the console script's own
               fleet.run("add-bot", name, "--pool-size", "0"), fleet.run("remove-bot", name), fleet.run("list"),
               fleet.run("add-bot", name, "--json")]
    for proc in outputs:
        assert_no_leak(password, proc.stdout, proc.stderr)


def test_admin_password_in_arguments_is_refused(fleet, admin):
    from .conftest import snapshot

    before = snapshot(admin)
    proc = fleet.run("add-bot", fleet.name("argpw"), "--admin-url", "postgresql://postgres:hunter2@127.0.0.1:1/postgres")
    assert proc.returncode == 2
    assert "must not contain a password" in proc.stderr and "hunter2" not in proc.stderr
    assert snapshot(admin) == before


def test_admin_password_never_printed_on_failure(scram_fleet):
    """A wrong admin password (real SCRAM check) is one line, exit 1, and never echoed."""
    port = scram_fleet.server.embedded.status().port
    env = scram_fleet.env(ADMIN_DATABASE_URL=f"postgresql://postgres:s3cr3t-wrong@127.0.0.1:{port}/postgres")
    proc = scram_fleet.run("list", env=env)
    assert proc.returncode == 1
    assert "s3cr3t-wrong" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "authentication failed" in errors[0]
