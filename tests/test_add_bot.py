"""`provision add-bot` against a real server: what it creates, and that reruns converge."""

from __future__ import annotations

import json
import stat
import tomllib

import pytest

from psycopg import sql

from .conftest import assert_matches_server, assert_no_leak, assert_same_secret, masked


def role_row(conn, role):
    return conn.execute(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolconnlimit,"
        " (SELECT setconfig FROM pg_db_role_setting WHERE setrole = r.oid AND setdatabase = 0)"
        " FROM pg_roles r WHERE rolname = %s",
        (role,),
    ).fetchone()


def db_row(conn, db):
    return conn.execute(
        "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datconnlimit,"
        " datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(datacl) WHERE grantee = 0)"
        " FROM pg_database WHERE datname = %s",
        (db,),
    ).fetchone()


def verifier(conn, role):
    return conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()[0]


def public_schema_open(pg, db):
    with pg.connect(db) as conn:
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a"
            " WHERE n.nspname = 'public' AND a.grantee = 0)"
        ).fetchone()[0]


def test_add_bot_creates_a_locked_down_database_and_role(fleet, admin, pg):
    name = fleet.name("hello")
    proc = fleet.add(name, "--json")
    out = json.loads(proc.stdout)
    stem = name.replace("-", "_")
    assert out["status"] == "created"
    assert (out["database"], out["role"]) == (f"{stem}_db", f"{stem}_user")
    assert out["connection_limit"] == 2 + 3 + 1  # pool + overflow + migration margin
    assert "server:" in proc.stderr and "from ADMIN_DATABASE_URL" in proc.stderr

    login, superuser, createdb, createrole, replication, bypassrls, limit, settings = role_row(admin, f"{stem}_user")
    assert login and not (superuser or createdb or createrole or replication or bypassrls)
    assert limit == 6
    assert sorted(settings) == ["idle_in_transaction_session_timeout=60s", "statement_timeout=30s"]

    owner, encoding, db_limit, public_access = db_row(admin, f"{stem}_db")
    assert (owner, encoding, db_limit, public_access) == (f"{stem}_user", "UTF8", 7, False)
    assert public_schema_open(pg, f"{stem}_db") is False

    env_file = fleet.env_file(name)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700
    password = fleet.password(name)
    text = masked(env_file.read_text(), password)
    assert f"DATABASE_URL=postgresql+asyncpg://{stem}_user:" in text
    assert f"@postgres:5432/{stem}_db" in text
    assert "DB_POOL_SIZE=2" in text and "DB_MAX_OVERFLOW=3" in text
    assert f"{stem}_user:<password>@" in text
    long_enough = len(password) >= 43  # 32 random bytes, base64url
    assert long_enough
    stored = verifier(admin, f"{stem}_user")
    assert stored.startswith("SCRAM-SHA-256$")
    assert_matches_server(password, stored)
    assert_no_leak(password, proc.stdout, proc.stderr)

    registry = tomllib.loads((fleet.root / "fleet.toml").read_text())
    entry = registry["bots"][name]
    assert entry["pool_size"] == 2 and entry["max_overflow"] == 3
    # the database, role and env file derive from the name: fleet.toml does not store them
    assert not {"database", "role", "env_file", "connection_limit"} & set(entry)
    assert (out["database"], out["role"]) == (f"{stem}_db", f"{stem}_user")
    assert_no_leak(password, (fleet.root / "fleet.toml").read_text(), where="registry")
    assert out["has_code"] is False


def test_rerun_reports_already_provisioned_and_keeps_the_password(fleet, admin):
    name = fleet.name()
    fleet.add(name)
    before = fleet.env_file(name).read_text()
    stored = verifier(admin, name.replace("-", "_") + "_user")
    proc = fleet.add(name)
    assert "already provisioned" in proc.stdout
    assert_same_secret(fleet.env_file(name).read_text(), before)
    assert verifier(admin, name.replace("-", "_") + "_user") == stored


def test_rerun_repairs_drift(fleet, admin, pg):
    name = fleet.name("drift")
    fleet.add(name)
    password = fleet.password(name)
    stem = name.replace("-", "_")
    role, db = sql.Identifier(f"{stem}_user"), sql.Identifier(f"{stem}_db")
    admin.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(db))
    admin.execute(sql.SQL("ALTER ROLE {} CREATEDB CREATEROLE CONNECTION LIMIT 99").format(role))
    admin.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = 0").format(role))
    admin.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT -1").format(db))
    with pg.connect(f"{stem}_db") as conn:
        conn.execute("GRANT ALL ON SCHEMA public TO PUBLIC")

    out = json.loads(fleet.add(name, "--json").stdout)
    assert out["status"] == "repaired"
    assert any("NOCREATEDB" in c for c in out["changes"])
    _, _, createdb, createrole, _, _, limit, settings = role_row(admin, f"{stem}_user")
    assert (createdb, createrole, limit) == (False, False, 6)
    assert "statement_timeout=30s" in settings
    assert db_row(admin, f"{stem}_db")[2:] == (7, False)
    assert public_schema_open(pg, f"{stem}_db") is False
    assert_same_secret(fleet.password(name), password)  # drift repair never changes the password
    assert json.loads(fleet.add(name, "--json").stdout)["status"] == "already provisioned"


def test_half_done_bot_is_completed_by_a_rerun(fleet, admin):
    """A crash after the role was created leaves no database and no env file."""
    name = fleet.name("half")
    stem = name.replace("-", "_")
    fleet.add(name)
    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(f"{stem}_db")))
    fleet.env_file(name).unlink()
    (fleet.root / "fleet.toml").unlink()

    out = json.loads(fleet.add(name, "--json").stdout)
    assert out["status"] == "repaired"
    assert "created the missing database" in out["changes"]
    assert out["password_changed"] is True
    assert db_row(admin, f"{stem}_db")[0] == f"{stem}_user"
    assert_matches_server(fleet.password(name), verifier(admin, f"{stem}_user"))


def test_env_file_password_wins_over_server_drift(fleet, admin):
    name = fleet.name("pwdrift")
    role = name.replace("-", "_") + "_user"
    fleet.add(name)
    password = fleet.password(name)
    admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal("SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5")))
    out = json.loads(fleet.add(name, "--json").stdout)
    assert out["status"] == "repaired" and out["password_changed"] is False
    assert_matches_server(password, verifier(admin, role))


def test_rotate_password(fleet, admin):
    name = fleet.name("rot")
    role = name.replace("-", "_") + "_user"
    fleet.add(name)
    old = fleet.password(name)
    proc = fleet.add(name, "--rotate-password")
    new = fleet.password(name)
    assert_same_secret(new, old, same=False)
    assert "(new password)" in proc.stdout
    assert_matches_server(new, verifier(admin, role))
    with pytest.raises(AssertionError):
        assert_matches_server(old, verifier(admin, role))
    assert_no_leak(new, proc.stdout, proc.stderr)


def test_pool_options_set_the_connection_limit_and_are_remembered(fleet, admin):
    name = fleet.name("pool")
    stem = name.replace("-", "_")
    out = json.loads(fleet.add(name, "--pool-size", "4", "--max-overflow", "1", "--replicas", "2", "--json").stdout)
    assert out["connection_limit"] == (4 + 1) * 2 + 1
    assert role_row(admin, f"{stem}_user")[6] == 11
    assert db_row(admin, f"{stem}_db")[2] == 12
    assert "DB_POOL_SIZE=4" in fleet.env_file(name).read_text()
    # A rerun without options keeps what the registry says instead of resetting to defaults.
    out = json.loads(fleet.add(name, "--json").stdout)
    assert out["status"] == "already provisioned" and out["connection_limit"] == 11


def test_code_option_deploys_another_instance_of_existing_code(fleet, admin):
    (fleet.root / "bots" / "echo").mkdir(parents=True)
    name = fleet.name("white")
    out = json.loads(fleet.add(name, "--code", "echo", "--json").stdout)
    assert out["code"] == "echo" and out["has_code"] is True
    registry = tomllib.loads((fleet.root / "fleet.toml").read_text())
    assert registry["bots"][name]["code"] == "echo"

    missing = fleet.run("add-bot", fleet.name("nocode"), "--code", "does-not-exist")
    assert missing.returncode == 2 and "no such bot code" in missing.stderr


def test_bot_without_code_says_so(fleet):
    proc = fleet.add(fleet.name("bare"))
    assert "none yet: database and role only" in proc.stdout


def test_db_host_and_port_go_into_the_url(fleet):
    name = fleet.name("host")
    fleet.add(name, "--db-host", "db.internal", "--db-port", "6543")
    assert "@db.internal:6543/" in fleet.env_file(name).read_text()


def test_refuses_to_take_over_objects_it_did_not_create(fleet, admin):
    name = fleet.name("foreign")
    stem = name.replace("-", "_")
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(f"{stem}_user")))
    proc = fleet.run("add-bot", name)
    assert proc.returncode == 1
    assert "was not created by botfleet" in proc.stderr
    assert db_row(admin, f"{stem}_db") is None
    assert not (fleet.root / "fleet.toml").exists()
