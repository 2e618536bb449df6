"""Per-bot guards on the bot's role (issue 18): temp_file_limit, work_mem, lock_timeout,
idle_session_timeout, from fleet.toml's [defaults] and per-bot overrides, kept by add-bot,
apply and doctor like the timeouts. Each guard is hit by a real login as the bot, which gets
PostgreSQL's own error, while another bot is unaffected; the superuser-only guard
(temp_file_limit) cannot be lifted by the bot."""

from __future__ import annotations

import json
import threading
import time
import tomllib

import psycopg
import pytest
from psycopg import sql


from .conftest import RUN_ID, _fleet, db, login, role, snapshot

# A sort that spills well past 1MB of temp files when work_mem is 64kB.
BIG_SORT = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 300000) g ORDER BY g DESC) s"


def role_settings(admin, name: str) -> dict[str, str]:
    row = admin.execute("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                        "WHERE r.rolname = %s AND s.setdatabase = 0", (role(name),)).fetchone()
    return dict(item.split("=", 1) for item in (row[0] if row else []))


@pytest.fixture(scope="module")
def guarded(pg, tmp_path_factory):
    """Two bots: ``strict`` with every guard (work_mem from [defaults]), ``free`` with none
    but its own work_mem."""
    for fleet in _fleet(pg, tmp_path_factory.mktemp("guards")):
        (fleet.root / "fleet.toml").write_text('version = 1\n\n[defaults]\nwork_mem = "64kB"\n')
        strict, free = fleet.name("strict"), fleet.name("free")
        fleet.add(strict, "--temp-file-limit", "1MB", "--lock-timeout", "200ms", "--idle-session-timeout", "300ms")
        fleet.add(free, "--work-mem", "4MB")
        yield fleet, strict, free


def test_guards_are_set_on_the_role_from_defaults_and_overrides(guarded, admin):
    fleet, strict, free = guarded
    guards = ("temp_file_limit", "work_mem", "lock_timeout", "idle_session_timeout")
    assert {k: v for k, v in role_settings(admin, strict).items() if k in guards} == {
        "temp_file_limit": "1MB", "work_mem": "64kB", "lock_timeout": "200ms", "idle_session_timeout": "300ms"}
    assert {k: v for k, v in role_settings(admin, free).items() if k in guards} == {"work_mem": "4MB"}
    bots = tomllib.loads((fleet.root / "fleet.toml").read_text())["bots"]
    assert bots[strict]["temp_file_limit"] == "1MB" and "work_mem" not in bots[strict]  # the default is not copied
    with login(fleet, strict) as conn:
        assert conn.execute("SHOW work_mem").fetchone()[0] == "64kB"


def test_a_sort_beyond_temp_file_limit_gets_postgres_error_and_the_other_bot_sorts(guarded):
    fleet, strict, free = guarded
    with login(fleet, strict) as conn:
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="temp_file_limit"):
            conn.execute(BIG_SORT)
    with login(fleet, free) as conn:
        assert conn.execute("SHOW temp_file_limit").fetchone()[0] == "-1"
        assert conn.execute(BIG_SORT).fetchone()[0] == 300000


def test_the_bot_cannot_lift_its_superuser_only_guard(guarded, admin):
    """temp_file_limit is PGC_SUSET: set on the role by a superuser, the bot can neither SET it
    in its session nor change or reset it on its role, in its database or on its database."""
    fleet, strict, _free = guarded
    me, mine = sql.Identifier(role(strict)), sql.Identifier(db(strict))
    attempts = [
        sql.SQL("SET temp_file_limit = -1"),
        sql.SQL("SET SESSION temp_file_limit = -1"),
        sql.SQL("ALTER ROLE {} SET temp_file_limit = -1").format(me),
        sql.SQL("ALTER ROLE {} RESET temp_file_limit").format(me),
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET temp_file_limit = -1").format(me, mine),
        sql.SQL("ALTER DATABASE {} SET temp_file_limit = -1").format(mine),
    ]
    with login(fleet, strict) as conn:
        for stmt in attempts:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
        conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(me))  # resets what it may: its USERSET guards
    assert role_settings(admin, strict)["temp_file_limit"] == "1MB"
    with login(fleet, strict) as conn:
        assert conn.execute("SHOW temp_file_limit").fetchone()[0] == "1MB"
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute(BIG_SORT)
    # What it could reset (its USERSET guards and timeouts) is found and put back.
    report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    found = [f["message"] for f in report["remaining"] if f["bot"] == strict]
    assert f"role {role(strict)} work_mem is unset, the registry says 64kB" in found, found
    assert fleet.run("doctor", "--fix", "--ignore-stray", "*").returncode == 0
    assert role_settings(admin, strict)["lock_timeout"] == "200ms" and role_settings(admin, strict)["work_mem"] == "64kB"


def test_a_lock_wait_beyond_lock_timeout_fails_and_the_other_bot_waits(guarded):
    fleet, strict, free = guarded
    for name in (strict, free):
        with login(fleet, name) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS held (id int)")
    with login(fleet, strict) as holder, login(fleet, strict) as waiter:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE held")
        with pytest.raises(psycopg.errors.LockNotAvailable, match="lock timeout"), waiter.transaction():
            waiter.execute("LOCK TABLE held")
        holder.execute("ROLLBACK")
    with login(fleet, free) as holder, login(fleet, free) as waiter:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE held")
        release = threading.Timer(0.8, lambda: holder.execute("ROLLBACK"))  # well past strict's 200ms
        release.start()
        try:
            with waiter.transaction():
                waiter.execute("LOCK TABLE held")  # waits for the holder, then gets it
        finally:
            release.join()
        assert waiter.execute("SHOW lock_timeout").fetchone()[0] == "0"


def test_an_idle_session_is_ended_by_idle_session_timeout_and_the_other_bot_stays(guarded, admin):
    if admin.info.server_version < 140000:
        pytest.skip("idle_session_timeout is PostgreSQL 14+ (botfleet skips it there with a note)")
    fleet, strict, free = guarded
    with login(fleet, strict) as idle, login(fleet, free) as other:
        time.sleep(1.2)  # idle, past strict's 300ms
        with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
            idle.execute("SELECT 1")
        assert other.execute("SELECT 1").fetchone()[0] == 1


def test_a_guard_dropped_from_fleet_toml_is_reset_on_the_role_by_apply(fleet, admin):
    name = fleet.name("drop")
    (fleet.root / "fleet.toml").write_text('version = 1\n\n[defaults]\nlock_timeout = "3s"\n')
    fleet.add(name)
    assert role_settings(admin, name)["lock_timeout"] == "3s"
    text = (fleet.root / "fleet.toml").read_text()
    (fleet.root / "fleet.toml").write_text(text.replace('[defaults]\nlock_timeout = "3s"\n', ""))
    plan = fleet.run("plan", "--no-migrate", "--ignore-stray", "*")
    assert "role lock_timeout 3s -> unset" in plan.stdout, plan.stdout + plan.stderr
    assert fleet.run("apply", "--no-migrate", "--ignore-stray", "*").returncode == 0
    assert "lock_timeout" not in role_settings(admin, name)


def test_a_non_superuser_admin_reports_the_superuser_only_guard_in_one_line(fleet, admin, pg):
    from provisioning.db import parse_url
    from psycopg.conninfo import make_conninfo

    name = fleet.name("delegated")
    ops = f"t{RUN_ID}_guardops_{len(fleet.names)}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(sql.Identifier(ops)))
    try:
        params = parse_url(pg.url)
        params["user"] = ops
        env = fleet.env(ADMIN_DATABASE_URL=make_conninfo(**params))
        proc = fleet.run("add-bot", name, "--temp-file-limit", "1MB", "--work-mem", "1MB", env=env)
        assert proc.returncode == 0, proc.stderr
        notes = [line for line in proc.stderr.splitlines() if "temp_file_limit" in line]
        assert notes == [f"note: {name}: temp_file_limit = 1MB not applied: only a superuser may set temp_file_limit "
                         f"(PGC_SUSET) and the admin role {ops} is not one (skipped: ask a superuser to run this "
                         f"command, or GRANT SET ON PARAMETER temp_file_limit TO {ops} on PostgreSQL 15+)"]
        settings = role_settings(admin, name)
        assert settings["work_mem"] == "1MB" and "temp_file_limit" not in settings
        report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*", env=env).stdout)
        assert [f for f in report["remaining"] if f["bot"] == name and "temp_file_limit" in f["message"]] == []
        assert any("temp_file_limit = 1MB not applied" in n for n in report["notes"]), report["notes"]
        assert fleet.run("remove-bot", name, "--yes", "--no-backup", env=env).returncode == 0
    finally:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ops)))


@pytest.mark.parametrize(("args", "message"), [
    (("--work-mem", "10"), "--work-mem must look like 64MB, 1GB or 512kB"),
    (("--work-mem", "32kB"), "--work-mem '32kB' is out of PostgreSQL's range"),
    (("--temp-file-limit", "4TB"), "--temp-file-limit '4TB' is more than PostgreSQL allows"),
    (("--lock-timeout", "soon"), "--lock-timeout must look like 30s"),
    (("--idle-session-timeout", "30d"), "--idle-session-timeout must look like 30s"),
    (("--max-size", "2gb"), "--max-size must look like 64MB, 1GB or 512kB"),
])
def test_a_bad_guard_is_one_line_exit_2_and_nothing_changes(fleet, admin, args, message):
    before = snapshot(admin)
    proc = fleet.run("add-bot", fleet.name("bad"), *args)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert snapshot(admin) == before and not (fleet.root / "fleet.toml").exists()


@pytest.mark.parametrize(("table", "message"), [
    ('[defaults]\nwork_mem = "lots"\n', "[defaults] work_mem must look like 64MB"),
    ('[defaults]\nmax_sise = "1GB"\n', "[defaults] has an unknown key 'max_sise'"),
    ('[bots.x-bot]\nlock_timeout = 5\n', "lock_timeout must be a string"),
])
def test_a_bad_guard_in_fleet_toml_is_refused_at_load(fleet, table, message):
    (fleet.root / "fleet.toml").write_text(f"version = 1\n\n{table}")
    proc = fleet.run("list")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
