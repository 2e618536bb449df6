"""Isolation on a cluster that really checks passwords (scram-sha-256 in pg_hba)."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import psycopg
import pytest
from psycopg import sql


def _bot_dsn(fleet, name, *, password=None, database=None):
    stem = name.replace("-", "_")
    pw = password if password is not None else fleet.password(name)
    port = fleet.server.embedded.status().port
    return f"postgresql://{stem}_user:{pw}@127.0.0.1:{port}/{database or stem + '_db'}"


@pytest.fixture(scope="module")
def two_bots(module_scram_fleet):
    """Two bots provisioned once for the module: its tests only read them (or add and
    drop objects of their own)."""
    fleet = module_scram_fleet
    a, b = fleet.name("iso-a"), fleet.name("iso-b")
    port = str(fleet.server.embedded.status().port)
    for bot in (a, b):
        fleet.add(bot, "--db-host", "127.0.0.1", "--db-port", port)
    return fleet, a, b


def test_bot_connects_to_its_own_database_with_its_env_file_url(two_bots):
    fleet, a, _ = two_bots
    env = fleet.env_file(a).read_text()
    url = next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("DATABASE_URL="))

    async def probe():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchrow("SELECT current_user, current_database(), current_setting('statement_timeout')")
        finally:
            await conn.close()

    user, db, timeout = asyncio.run(probe())
    stem = a.replace("-", "_")
    assert (user, db, timeout) == (f"{stem}_user", f"{stem}_db", "30s")
    with psycopg.connect(_bot_dsn(fleet, a)) as conn:
        conn.execute("CREATE TABLE notes (id int)")  # the owner can build its schema
        conn.rollback()  # (the bots are shared by the module's tests: leave nothing behind)


def test_bot_cannot_connect_to_another_bots_database(two_bots):
    fleet, a, b = two_bots
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(_bot_dsn(fleet, a, database=b.replace("-", "_") + "_db"))


def test_wrong_password_is_refused(two_bots):
    fleet, a, b = two_bots
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_bot_dsn(fleet, a, password="not-the-password"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_bot_dsn(fleet, a, password=fleet.password(b)))


def test_bot_role_cannot_create_databases_or_roles(two_bots):
    fleet, a, _ = two_bots
    with psycopg.connect(_bot_dsn(fleet, a), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE DATABASE sneaky")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE sneaky")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER ROLE current_user CONNECTION LIMIT -1")


def test_public_has_no_connect_on_any_bot_database(two_bots):
    fleet, a, b = two_bots
    with fleet.server.connect() as admin:
        for bot in (a, b):
            db = bot.replace("-", "_") + "_db"
            assert admin.execute("SELECT has_database_privilege('public', %s, 'CONNECT')", (db,)).fetchone()[0] is False
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(f"{bot}_probe")))
            try:
                ok = admin.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')", (f"{bot}_probe", db)).fetchone()[0]
            finally:
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(f"{bot}_probe")))
            assert ok is False


def test_role_connection_limit_is_enforced(two_bots):
    fleet, a, _ = two_bots
    limit = json.loads(fleet.run("list", "--json").stdout)
    limit = next(r for r in limit if r["bot"] == a)["connection_limit"]
    conns = [psycopg.connect(_bot_dsn(fleet, a)) for _ in range(limit)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(_bot_dsn(fleet, a))
    finally:
        for conn in conns:
            conn.close()
