"""A bot's connection storm through the rendered PgBouncer does not lock the other bots out (issue 18, case 4).

- the rendered limits hold together: every bot's client cap (max_user_client_connections) at
  least its pools, max_client_conn above all those caps together and above a storm of
  STORM clients from one bot plus every other bot's cap, and the container's open-file limit
  (compose ``ulimits: nofile``, both compose files) covering max_client_conn and every server
  connection;
- a real PgBouncer (this machine's, or $BOTFLEET_PGBOUNCER, started on the ini botfleet renders,
  pointed at the test server) with one role holding STORM client connections at once still lets another role in
  and run a query. The machine's PgBouncer may be older than 1.24, which lacks the per-bot
  cap (then only max_client_conn's headroom keeps the other bot in); on 1.24 the storming
  role is also refused past its own cap.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import tomllib
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from ruamel.yaml import YAML

from provisioning import compose, passwords

from .conftest import RUN_ID
from .test_compose import make_project, run

STORM = 150  # bench_noisy's case 4: the noisy bot's connections at once


def ini_settings(text: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """[pgbouncer]'s settings, and [users]' per-role settings."""
    section, main, users = "", {}, {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        if section == "pgbouncer":
            main[key] = value
        elif section == "users":
            users[key] = dict(item.split("=", 1) for item in value.split())
    return main, users


def test_rendered_pgbouncer_limits_hold_together(tmp_path):
    root = make_project(tmp_path / "fleet", pgbouncer=True)
    proc = run(root, "render")
    assert proc.returncode == 0, proc.stderr
    main, users = ini_settings((root / "deploy/pgbouncer.ini").read_text())
    fleet = tomllib.loads((root / "fleet.toml").read_text())["bots"].values()
    pooled = {b["role"]: b for b in fleet if (root / "bots" / b["code"].replace("-", "_")).is_dir()}
    assert set(users) == set(pooled)
    caps = {role: int(u["max_user_client_connections"]) for role, u in users.items()}
    server = {role: int(u["max_user_connections"]) for role, u in users.items()}
    for role, b in pooled.items():
        pools = (b.get("pool_size", 2) + b.get("max_overflow", 3)) * b.get("replicas", 1)
        assert caps[role] >= pools + compose.PGBOUNCER_CLIENT_ALLOWANCE, role
    max_client_conn = int(main["max_client_conn"])
    assert max_client_conn >= sum(caps.values()) + compose.PGBOUNCER_CLIENT_HEADROOM
    for role in caps:  # one bot's storm, with no per-bot cap (PgBouncer < 1.24), and every other bot's clients
        assert STORM + sum(c for r, c in caps.items() if r != role) <= max_client_conn
    for rel in ("compose.yaml", "compose.stack.yaml"):
        service = YAML(typ="safe").load((root / rel).read_text())["services"]["pgbouncer"]
        nofile = service["ulimits"]["nofile"]
        assert nofile["soft"] == nofile["hard"], rel
        assert nofile["soft"] >= max_client_conn + sum(server.values()) + 10, rel  # PgBouncer's own estimate's +10


@pytest.mark.parametrize("image, refused", [("edoburu/pgbouncer:v1.22.1-p0", True), ("pgbouncer/pgbouncer:1.23.1", True),
                                           ("edoburu/pgbouncer:v1.24.1-p1", False), ("registry.local:5000/pgbouncer:latest", False)])
def test_a_pgbouncer_image_older_than_the_rendered_ini_needs_is_refused(tmp_path, image, refused):
    """PgBouncer < 1.24 does not start on the rendered [users] lines: render says so, in one line, and writes nothing."""
    root = make_project(tmp_path / "fleet", pgbouncer=True)
    text = (root / "fleet.toml").read_text()
    (root / "fleet.toml").write_text(text.replace("pgbouncer = true", f"pgbouncer = true\npgbouncer_image = \"{image}\""))
    proc = run(root, "render")
    if refused:
        assert proc.returncode == 2, proc.stdout
        assert "needs 1.24 or newer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (root / "deploy/pgbouncer.ini").exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert f'image: "{image}"' in (root / "compose.yaml").read_text()


@pytest.fixture
def two_bots(pg):
    """Two roles with a password and a database each on the test server (unique names, dropped after)."""
    tag = f"t{RUN_ID}_storm{secrets.token_hex(2)}"  # the session's prefix: other sessions' snapshots leave them out
    bots = [{"role": f"{tag}_{n}_user", "database": f"{tag}_{n}_db", "password": secrets.token_urlsafe(24)}
            for n in ("noisy", "good")]
    with pg.connect() as admin:
        try:
            for b in bots:
                verifier = passwords.scram_verifier(admin, b["password"], b["role"])  # the server sees no plaintext
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(b["role"]), sql.Literal(verifier)))
                admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(b["database"]), sql.Identifier(b["role"])))
            yield bots
        finally:
            for b in bots:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(b["database"])))
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(b["role"])))


@pytest.fixture
def bouncer_folder():
    """A folder PgBouncer can reach when it runs as the embedded server's user (pytest's tmp_path
    is root's alone): under /tmp, removed after."""
    folder = Path(tempfile.mkdtemp(prefix="botfleet-test-pgbouncer-"))
    try:
        folder.chmod(0o711)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not (os.environ.get("BOTFLEET_PGBOUNCER") or shutil.which("pgbouncer")),
                    reason="pgbouncer is not installed (apt-get install -y pgbouncer, or BOTFLEET_PGBOUNCER=PATH)")
def test_one_bots_connection_storm_leaves_room_for_the_others(pg, two_bots, bouncer_folder):
    from bench import _pgbouncer as pgbouncers

    port = psycopg.conninfo.conninfo_to_dict(pg.url).get("port") or 5432
    host = psycopg.conninfo.conninfo_to_dict(pg.url).get("host") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip("the test server is not on this machine's loopback")
    noisy, good = two_bots
    pools = 5  # bench_noisy's pool of 2 + 3, one replica
    ini = pgbouncers.render_ini([{"database": b["database"], "role": b["role"], "clients": pools, "server_pool": 1}
                                 for b in two_bots], 1)
    main, users = ini_settings(ini)
    assert STORM > 2 * pools + 2 * compose.PGBOUNCER_CLIENT_ALLOWANCE  # more than the fleet's own clients
    userlist = "".join(f'"{b["role"]}" "{b["password"]}"\n' for b in two_bots)
    path, bport = pgbouncers.write_config(bouncer_folder / "pgbouncer", ini, userlist, int(port))
    has_cap = pgbouncers.version() >= (1, 24)

    def url(b: dict) -> str:
        return psycopg.conninfo.make_conninfo(host="127.0.0.1", port=bport, user=b["role"], password=b["password"],
                                              dbname=b["database"], connect_timeout=10)

    bouncer = pgbouncers.start(path, bport)
    held: list[psycopg.Connection] = []
    refused: list[str] = []
    try:
        for _ in range(STORM):
            try:
                held.append(psycopg.connect(url(noisy), autocommit=True))
            except psycopg.OperationalError as err:
                refused.append(str(err))
        with psycopg.connect(url(good), autocommit=True) as conn:  # while the storm holds its clients
            assert conn.execute("SELECT current_user").fetchone()[0] == good["role"]
        assert all("max_client_conn" not in e for e in refused), refused[:1]
        if has_cap:
            cap = int(users[noisy["role"]]["max_user_client_connections"])
            assert len(held) == cap and all("max_user_client_connections" in e for e in refused)
        else:
            assert len(held) == STORM and not refused
        assert len(held) <= int(main["max_client_conn"])
    finally:
        for conn in held:
            conn.close()
        pgbouncers.stop(bouncer)
    log = (bouncer_folder / "pgbouncer" / "pgbouncer.log").read_text(errors="replace")
    assert not re.search(r"no more connections allowed|too many open files", log, re.I)
    for b in two_bots:
        assert b["password"] not in log
