"""Concurrent provision runs, admins without superuser, and admins that cannot provision."""

from __future__ import annotations

import json
import subprocess
import tomllib

from psycopg import sql

from .conftest import PROVISION, RUN_ID, assert_matches_server


def test_two_concurrent_add_bot_end_with_one_bot(fleet, admin):
    name = fleet.name("race")
    stem = name.replace("-", "_")
    procs = [
        subprocess.Popen([PROVISION, "add-bot", name, "--json"], env=fleet.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for *_, rc in results] == [0, 0, 0], [err for _, err, _ in results]
    statuses = sorted(json.loads(out)["status"] for out, _, _ in results)
    assert statuses == ["already provisioned", "already provisioned", "created"]
    assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (f"{stem}_user",)).fetchone()[0] == 1
    assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (f"{stem}_db",)).fetchone()[0] == 1
    verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (f"{stem}_user",)).fetchone()[0]
    assert_matches_server(fleet.password(name), verifier)


def test_concurrent_add_of_different_bots_keeps_every_registry_entry(fleet):
    names = [fleet.name(f"par{i}") for i in range(4)]
    procs = [subprocess.Popen([PROVISION, "add-bot", n], env=fleet.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for n in names]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    registry = tomllib.loads((fleet.root / "fleet.toml").read_text())
    assert sorted(registry["bots"]) == sorted(names)


def _admin_role(admin, fleet, suffix, *attrs):
    role = f"t{RUN_ID}_{suffix}_{len(fleet.names)}"
    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN " + " ".join(attrs)).format(sql.Identifier(role)))  # attrs are constants
    return role


def test_createdb_createrole_admin_can_provision_and_remove(fleet, admin, pg):
    from provisioning.db import parse_url
    from psycopg.conninfo import make_conninfo

    name = fleet.name("delegated")
    role = _admin_role(admin, fleet, "ops", "CREATEDB", "CREATEROLE")
    try:
        params = parse_url(pg.url)
        params["user"] = role
        env = fleet.env(ADMIN_DATABASE_URL=make_conninfo(**params))
        proc = fleet.run("add-bot", name, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["status"] == "created"
        stem = name.replace("-", "_")
        owner = admin.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (f"{stem}_db",)).fetchone()
        assert owner == (f"{stem}_user",)
        proc = fleet.run("add-bot", name, "--json", env=env)
        assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "already provisioned", proc.stderr
        proc = fleet.run("remove-bot", name, "--yes", env=env)
        assert proc.returncode == 0, proc.stderr
        assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (f"{stem}_user",)).fetchone() is None
    finally:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_admin_without_privileges_is_refused_in_one_line(fleet, admin, pg):
    from provisioning.db import parse_url
    from psycopg.conninfo import make_conninfo

    from .conftest import snapshot

    role = _admin_role(admin, fleet, "weak", "CREATEDB")
    try:
        params = parse_url(pg.url)
        params["user"] = role
        before = snapshot(admin)
        proc = fleet.run("add-bot", fleet.name("weak"), env=fleet.env(ADMIN_DATABASE_URL=make_conninfo(**params)))
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: role {role!r} cannot provision bots: it needs SUPERUSER, or CREATEDB and CREATEROLE"]
        assert snapshot(admin) == before
    finally:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_unreachable_server_is_one_line_exit_1(fleet):
    """The real console script: a connection failure is exit status 1 and one line."""
    proc = fleet.run_process("list", env=fleet.env(ADMIN_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres"))
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: cannot reach PostgreSQL at postgres@127.0.0.1:1/postgres: connection refused "
        "(is the server running and listening there?)"
    ]
