"""The production path, end to end, on a real Docker engine with Compose v2.

As an operator would: a fleet of the three example bots developed against the embedded
server (`provision add-bot`, `provision config set`), `provision render`, then
`docker compose up -d --wait` from an empty volume. The project's own rendered files and
Dockerfile are used unchanged; the one override file (OVERRIDE below) only gives image
builds the host's network, which pip needs in this sandbox.

Needs the engine of e2e/engine.sh (`bash e2e/engine.sh up`); a missing engine is a
failure, not a skip. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[1]
PROVISION = str(Path(os.sys.executable).with_name("provision"))
RUN = secrets.token_hex(3)
BOTS = {"chat-bot": "chat-bot", "feishu-bot": "feishu-bot", "hello-bot": "hello-bot"}
FEISHU_TOKEN = "e2e-verification-" + secrets.token_hex(8)
BOT_TOKEN = "123456789:AAE2eFakeTokenForTheStack" + secrets.token_hex(4)
# The budget's assumption: a bot's resident memory after start-up stays below this share of its limit.
MEMORY_HEADROOM = 0.75
# Each override, and why (the rest is the project's own compose.yaml, unchanged):
# - build.network host: pip inside a build reaches PyPI only through the host's network here.
OVERRIDE_WHY = "build.network: host (pip in the image build needs the host's network in this sandbox)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "e2e" / "engine.sh"), "env"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    env = dict(os.environ)
    for part in out.stdout.replace("\n", ";").split(";"):
        part = part.strip().removeprefix("export ").strip()
        if "=" in part:
            key, value = part.split("=", 1)
            env[key] = value
    env.update(DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0", NO_COLOR="1", COLUMNS="200")
    env.pop("ADMIN_DATABASE_URL", None)
    env.pop("BOTFLEET_TEST_ADMIN_URL", None)
    return env


class Stack:
    """A fleet folder (a copy of the botfleet checkout, as an operator clones it) and its stack."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = {**env, "BOTFLEET_HOME": str(root)}
        self.ports: dict[str, int] = {}

    def provision(self, *args: str, admin: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if admin:  # the stack's own postgres, through its published port and the rendered passfile
            env["ADMIN_DATABASE_URL"] = (f"postgresql://postgres@127.0.0.1:{self.ports['postgres']}/postgres"
                                         f"?passfile={self.root / 'secrets' / 'postgres.pgpass'}")
        proc = subprocess.run([PROVISION, *args], capture_output=True, text=True, env=env, cwd=self.root,
                              timeout=300, stdin=subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, f"provision {' '.join(args)}: {proc.stderr}"
        return proc

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-f", "compose.yaml", "-f", "e2e.override.yaml", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, f"docker compose {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc

    def write_override(self) -> None:
        from provisioning.compose_check import load_yaml

        compose = load_yaml((self.root / "compose.yaml").read_text())
        services = [name for name, svc in compose["services"].items() if "build" in svc]
        assert services, "the rendered compose.yaml builds no image"
        text = f"# e2e only: {OVERRIDE_WHY}\nservices:\n" + "".join(
            f"  {s}:\n    build:\n      network: host\n" for s in services)
        (self.root / "e2e.override.yaml").write_text(text)

    def containers(self) -> dict[str, dict]:
        out = self.compose("ps", "--all", "--format", "json").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
        if len(rows) == 0 and out.strip().startswith("["):
            rows = json.loads(out)
        return {r["Service"]: r for r in rows}

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        password = (self.root / "secrets" / "postgres-password").read_text().strip()
        return psycopg.connect(host="127.0.0.1", port=self.ports["postgres"], user="postgres", password=password,
                               dbname=dbname, autocommit=True, connect_timeout=10)

    def http(self, bot: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[bot]}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def up(self) -> None:
        self.compose("up", "-d", "--wait", "--wait-timeout", "300", timeout=900)

    def build_and_up(self, healthy: tuple[str, ...], running: tuple[str, ...] = ()) -> None:
        """What the README's stack flow does after render (build the images, `up --wait`), then
        checks it: postgres healthy, the provision service exited 0, each of ``healthy`` running
        and healthy, each of ``running`` (services without a health check) running."""
        self.write_override()
        self.compose("build", timeout=1800)
        self.up()
        ps = self.containers()
        assert ps["postgres"]["Health"] == "healthy", ps["postgres"]
        assert ps["provision"]["State"] == "exited" and ps["provision"]["ExitCode"] == 0, self.logs()
        for service in running:
            assert ps[service]["State"] == "running", (service, ps[service], self.logs())
        for service in healthy:
            assert ps[service]["State"] == "running" and ps[service]["Health"] == "healthy", (
                service, ps[service], self.logs())

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout


PROJECT = "botfleet"  # [server] project_name's default: the README's volume names start with it


def clear_leftovers(env: dict[str, str]) -> None:
    """Remove what an earlier, interrupted run left of the project on this test-only engine.

    A `botfleet_pgdata` volume kept from a killed run holds a server initialised with that run's
    admin password: this run's stack would then fail to log in to it (seen in CI). The engine of
    e2e/engine.sh serves these tests only, so nothing of a user's is touched.
    """
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind, listing in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"]),
                          ("network", ["network", "ls", "-q"])):
        ids = subprocess.run(["docker", *listing, "--filter", label], capture_output=True, text=True, env=env,
                             timeout=60).stdout.split()
        if ids:
            print(f"e2e: removing {len(ids)} {kind}(s) an earlier run left of project {PROJECT!r}")
            rm = ["rm", "-f", "-v"] if kind == "container" else [kind, "rm", "-f"] if kind == "volume" else [kind, "rm"]
            subprocess.run(["docker", *rm, *ids], capture_output=True, text=True, env=env, timeout=300, check=True)


def fleet_folder(request, ports: tuple[str, ...]):
    """A fleet folder on the e2e engine (a copy of the checkout, as an operator clones it), a free
    loopback port for each name in ``ports``; at the end its stack is taken down with its volumes
    and its embedded server stopped (the stack's logs printed first when a test failed)."""
    env = engine_env()
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, env=env, timeout=30)
    assert version.returncode == 0 and "v2." in version.stdout, (
        f"Compose v2 on the e2e engine is required (bash e2e/engine.sh up): {version.stdout}{version.stderr}")
    ping = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert ping.returncode == 0, f"the e2e Docker engine does not answer (bash e2e/engine.sh up): {ping.stderr}"

    clear_leftovers(env)
    root = Path(tempfile.mkdtemp(prefix=f"botfleet-e2e-{RUN}-"))
    root.chmod(0o755)  # the embedded server's OS user traverses it
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for rel in (f.decode() for f in files if f):
        if rel.startswith(("tests/", "bench/", ".ci/")):
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    s = Stack(root, env)
    s.ports = {name: free_port() for name in ports}
    try:
        yield s
    finally:
        if request.session.testsfailed and (root / "compose.yaml").exists():
            print(s.logs())
        if (root / "compose.yaml").exists():
            s.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
        # and the anonymous volumes of one-off containers (the image's VOLUME): the engine is the tests' own
        s.docker("volume", "prune", "-f", check=False)
        s.provision("server", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(request):
    yield from fleet_folder(request, ("postgres", "chat-bot", "feishu-bot", "acme-chat", "exporter"))


def test_01_a_fleet_developed_on_the_embedded_server_comes_up_from_an_empty_volume(stack: Stack):
    # The developer's flow: bots on the embedded server, settings, one render.
    stack.provision("add-bot", "chat-bot", "--publish", f"127.0.0.1:{stack.ports['chat-bot']}")
    stack.provision("add-bot", "feishu-bot", "--publish", f"127.0.0.1:{stack.ports['feishu-bot']}")
    stack.provision("add-bot", "hello-bot")
    stack.provision("config", "set", "hello-bot", f"BOT_TOKEN={BOT_TOKEN}")
    stack.provision("config", "set", "feishu-bot", f"FEISHU_VERIFICATION_TOKEN={FEISHU_TOKEN}")
    stack.provision("render", "--publish", f"127.0.0.1:{stack.ports['postgres']}", "--exporter",
                    "--exporter-publish", f"127.0.0.1:{stack.ports['exporter']}", "--archive")
    stack.build_and_up(healthy=(*BOTS, "exporter", "archive"))


def test_02_the_bots_answer_through_their_published_ports_and_write_their_own_databases(stack: Stack):
    code, conv = stack.http("chat-bot", "POST", "/conversations", {"title": "e2e"})
    assert code == 201, conv
    for i, role in enumerate(("user", "assistant", "user")):
        code, msg = stack.http("chat-bot", "POST", f"/conversations/{conv['id']}/messages",
                               {"role": role, "content": f"message {i}"})
        assert code == 201, msg
    code, context = stack.http("chat-bot", "GET", f"/conversations/{conv['id']}/context?limit=2")
    assert code == 200 and [m["content"] for m in context] == ["message 1", "message 2"], context

    code, body = stack.http("feishu-bot", "POST", "/webhook/event",
                            {"type": "url_verification", "challenge": "e2e-challenge", "token": FEISHU_TOKEN})
    assert code == 200 and body == {"challenge": "e2e-challenge"}
    event = {"uuid": f"e2e-{RUN}", "token": FEISHU_TOKEN, "type": "event_callback",
             "event": {"type": "p2p_chat_create", "open_id": "ou_e2e"}}
    assert stack.http("feishu-bot", "POST", "/webhook/event", event) == (200, {"ok": True, "duplicate": False})
    assert stack.http("feishu-bot", "POST", "/webhook/event", event) == (200, {"ok": True, "duplicate": True})

    with stack.admin("chat_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'messages'").fetchone()[0] == "chat_bot_user"
    with stack.admin("feishu_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE event_id = %s", (f"e2e-{RUN}",)).fetchone()[0] == 1
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'events'").fetchone()[0] == "feishu_bot_user"


def test_03_a_bot_cannot_open_another_bots_database_from_its_container(stack: Stack):
    script = ("import psycopg, sys; from shared.settings import DatabaseSettings as S; "
              "u = S.from_env('chat-bot').url; "
              "kw = dict(host=u.host, port=u.port, user=u.username, password=u.password); "
              "psycopg.connect(dbname='chat_bot_db', **kw).close(); print('own ok'); "
              "\ntry:\n    psycopg.connect(dbname='feishu_bot_db', **kw)\n"
              "except psycopg.OperationalError as e:\n    print('refused:', str(e).splitlines()[0]); sys.exit(0)\n"
              "sys.exit(1)")
    proc = stack.compose("exec", "-T", "chat-bot", "python", "-c", script, check=False)
    assert proc.returncode == 0 and "own ok" in proc.stdout and "refused:" in proc.stdout, proc.stdout + proc.stderr
    assert "permission denied" in proc.stdout or "not permitted" in proc.stdout or "CONNECT" in proc.stdout, proc.stdout


def test_04_no_password_in_any_containers_environment_or_command(stack: Stack):
    passwords = []
    for bot in BOTS:
        passwords.append(bot_password(stack, bot))
    passwords += [BOT_TOKEN, FEISHU_TOKEN, (stack.root / "secrets" / "postgres-password").read_text().strip(),
                  monitor_password(stack)]
    for service, row in stack.containers().items():
        inspect = json.loads(stack.docker("inspect", row["ID"]).stdout)[0]
        shown = json.dumps({"env": inspect["Config"]["Env"], "cmd": inspect["Config"]["Cmd"],
                            "args": inspect.get("Args"), "entrypoint": inspect["Config"]["Entrypoint"]})
        leaked = [i for i, pw in enumerate(passwords) if pw and pw in shown]
        assert leaked == [], f"{service}: a secret is in its environment or command"


def bot_password(stack: Stack, bot: str) -> str:
    env_text = (stack.root / "secrets" / f"{bot}.env").read_text()
    url = next(line for line in env_text.splitlines() if line.startswith("DATABASE_URL="))
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def test_04b_the_stacks_postgres_takes_tls_and_passwords_only_and_logs_who_connects(stack: Stack):
    assert stack.http("chat-bot", "GET", "/conversations/1/context?limit=1")[0] in (200, 404)  # a pooled connection
    with stack.admin() as conn:
        rows = conn.execute("SELECT a.usename, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                            "WHERE a.backend_type = 'client backend' AND a.usename <> 'postgres'").fetchall()
        assert ("chat_bot_user", True) in rows and all(ssl for _, ssl in rows), rows
        assert conn.execute("SHOW auth_delay.milliseconds").fetchone()[0] in ("500", "500ms")
        assert conn.execute("SHOW log_connections").fetchone()[0] != "off"
    port, admin_pw = stack.ports["postgres"], (stack.root / "secrets" / "postgres-password").read_text().strip()
    cert = stack.root / "deploy" / "postgres-tls.crt"
    # The operator, through the published port: verified TLS by the certificate render made ...
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=admin_pw, dbname="postgres",
                         sslmode="verify-full", sslrootcert=str(cert), connect_timeout=10) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    # ... and nothing in the clear, the right password or not.
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=admin_pw, dbname="postgres",
                        sslmode="disable", connect_timeout=10)
    # A bot's role cannot open the maintenance databases.
    for db in ("postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match="rejects connection|permission denied"):
            psycopg.connect(host="127.0.0.1", port=port, user="chat_bot_user", password=bot_password(stack, "chat-bot"),
                            dbname=db, connect_timeout=10)
    # Inside the postgres container: no password-free login on its socket, but for the postgres OS user.
    proc = stack.compose("exec", "-T", "postgres", "psql", "-U", "chat_bot_user", "-d", "chat_bot_db", "-c", "SELECT 1",
                         check=False)
    assert proc.returncode != 0 and "rejects connection" in proc.stderr, proc.stdout + proc.stderr
    # Who connected is logged; no password is, anywhere in the log.
    logs = stack.compose("logs", "--no-color", "postgres").stdout
    assert "connection authorized: user=chat_bot_user database=chat_bot_db" in logs and "SSL enabled" in logs
    assert "disconnection: session time" in logs
    for secret in [admin_pw, *(bot_password(stack, b) for b in BOTS)]:
        assert secret not in logs


def monitor_password(stack: Stack) -> str:
    from provisioning import monitoring

    found = monitoring.read_url_file(stack.root / monitoring.URL_FILE)
    assert found is not None, "render wrote no monitoring URL file"
    return found.password


def scrape(stack: Stack) -> dict:
    """The exporter's /metrics through its published port, parsed by Prometheus's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['exporter']}/metrics", timeout=15) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def by_bot(family) -> dict[str, float]:
    return {s.labels["bot"]: s.value for s in family.samples if "bot" in s.labels}


def test_04c_the_exporter_serves_each_bots_figures_as_its_own_monitoring_role(stack: Stack):
    assert stack.http("chat-bot", "GET", "/conversations/1/context?limit=1")[0] in (200, 404)
    families = scrape(stack)
    assert [s.value for s in families["botfleet_up"].samples] == [1.0]
    assert set(by_bot(families["botfleet_bot_connection_limit"])) == set(BOTS)
    assert by_bot(families["botfleet_bot_transactions"])["chat-bot"] > 0
    assert by_bot(families["botfleet_bot_database_size_bytes"])["chat-bot"] > 1_000_000
    # As botfleet_monitor (pg_monitor), over verified TLS; the container is not root.
    with stack.admin() as conn:
        rows = conn.execute("SELECT a.usename, a.application_name, s.ssl FROM pg_stat_activity a "
                            "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'botfleet_monitor'").fetchall()
        assert rows == [("botfleet_monitor", "botfleet-exporter", True)], rows
        assert conn.execute("SELECT rolsuper, pg_has_role('botfleet_monitor', 'pg_monitor', 'MEMBER') "
                            "FROM pg_roles WHERE rolname = 'botfleet_monitor'").fetchone() == (False, True)
    uid = stack.compose("exec", "-T", "exporter", "id", "-u").stdout.strip()
    assert uid == "10001", uid
    # Its role reaches no bot's database, even from inside the stack.
    script = ("import psycopg, sys\ntry:\n    psycopg.connect(open('/run/secrets/monitor_url').read().strip()"
              ".replace('/botfleet?', '/chat_bot_db?'))\nexcept psycopg.OperationalError as e:\n"
              "    print('refused:', str(e).splitlines()[0]); sys.exit(0)\nsys.exit(1)")
    proc = stack.compose("exec", "-T", "exporter", "python", "-c", script, check=False)
    assert proc.returncode == 0 and "refused:" in proc.stdout, proc.stdout + proc.stderr


def barman(stack: Stack, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """barman in the archive service's container, as its barman user, with the rendered configuration."""
    return stack.compose("exec", "-T", "archive", "setpriv", "--reuid=barman", "--regid=barman", "--init-groups",
                         "barman", "-c", "/etc/botfleet/barman.conf", *args, check=check, timeout=timeout)


def done_backups(stack: Stack) -> list[dict]:
    rows = json.loads(barman(stack, "-f", "json", "list-backups", "default").stdout)["default"]
    return [r for r in rows if r["status"] == "DONE"]


def test_04d_the_archive_streams_every_write_and_has_a_base_backup_as_its_own_replication_role(stack: Stack):
    # Healthy (up --wait waited for it): barman check passed, so a base backup exists and WAL arrives.
    assert len(done_backups(stack)) >= 1
    with stack.admin() as conn:
        rows = conn.execute("SELECT r.usename, r.application_name, r.state, s.ssl FROM pg_stat_replication r "
                            "JOIN pg_stat_ssl s USING (pid)").fetchall()
        assert ("botfleet_backup", "barman_receive_wal", "streaming", True) in rows, rows
        assert conn.execute("SELECT rolsuper, rolreplication, rolcreatedb, rolcreaterole FROM pg_roles "
                            "WHERE rolname = 'botfleet_backup'").fetchone() == (False, True, False, False)
        assert conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'botfleet_barman'").fetchone() == (True,)
        lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    # What is written now reaches the archive's volume within seconds (pg_receivewal writes it at once and
    # fsyncs it when its segment ends: the stack archives asynchronously).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with stack.admin() as conn:
            flushed = conn.execute("SELECT write_lsn >= %s::pg_lsn FROM pg_stat_replication "
                                   "WHERE application_name = 'barman_receive_wal'", (lsn,)).fetchone()
        if flushed == (True,):
            break
        time.sleep(1)
    assert flushed == (True,)
    # The service runs as barman, never root; its role reaches no bot's database.
    assert stack.compose("exec", "-T", "archive", "stat", "-c", "%U", "/proc/1").stdout.strip() == "barman"
    proc = stack.compose("exec", "-T", "archive", "setpriv", "--reuid=barman", "--regid=barman", "--init-groups", "psql",
                         "host=postgres user=botfleet_backup dbname=chat_bot_db passfile=/run/barman/pgpass "
                         "sslmode=verify-full sslrootcert=/etc/botfleet/postgres-ca.crt", "-c", "SELECT 1", check=False)
    assert proc.returncode != 0 and "pg_hba.conf rejects" in proc.stderr, proc.stdout + proc.stderr
    # provision list and doctor, from the host through the published port, see it stream.
    listed = stack.provision("list", admin=True)
    assert "archive: streaming" in listed.stdout, listed.stdout
    doctor = stack.provision("doctor", "--json", admin=True, check=False)
    assert [f for f in json.loads(doctor.stdout)["remaining"] if f["check"] == "archive"] == [], doctor.stdout


def test_05_a_bot_added_later_comes_up_without_recreating_the_others(stack: Stack):
    before = {s: r["ID"] for s, r in stack.containers().items() if s in BOTS or s == "postgres"}
    stack.provision("add-bot", "acme-chat", "--code", "chat-bot", "--publish", f"127.0.0.1:{stack.ports['acme-chat']}")
    stack.provision("render")
    stack.write_override()
    stack.up()
    ps = stack.containers()
    assert ps["acme-chat"]["Health"] == "healthy", stack.logs()
    assert {s: ps[s]["ID"] for s in before} == before, "running services were recreated"
    code, conv = stack.http("acme-chat", "POST", "/conversations", {"title": "acme"})
    assert code == 201, conv
    # The exporter follows fleet.toml: recreated with the new registry, it watches the new bot too.
    assert "acme-chat" in by_bot(scrape(stack)["botfleet_bot_connection_limit"])
    with stack.admin("acme_chat_db") as conn:
        assert conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == 1


def test_06_a_rotated_password_reaches_the_bot_and_the_old_one_is_refused(stack: Stack):
    env_file = stack.root / "secrets" / "chat-bot.env"
    old = next(l for l in env_file.read_text().splitlines() if l.startswith("DATABASE_URL=")).split(":")[2].split("@")[0]
    rotated = stack.provision("rotate-password", "chat-bot", admin=True)
    stack.provision("render")
    recreate = next(l.strip() for l in rotated.stdout.splitlines() if l.strip().startswith("docker compose up"))
    assert recreate == "docker compose up -d --force-recreate chat-bot"
    stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--force-recreate", "chat-bot", timeout=600)
    assert stack.containers()["chat-bot"]["Health"] == "healthy", stack.logs()
    code, conv = stack.http("chat-bot", "POST", "/conversations", {"title": "after rotation"})
    assert code == 201, conv
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=stack.ports["postgres"], user="chat_bot_user", password=old,
                        dbname="chat_bot_db", connect_timeout=10).close()


def test_07_down_then_up_keeps_every_row_and_down_v_provisions_again_from_nothing(stack: Stack):
    with stack.admin("chat_bot_db") as conn:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    stack.compose("down", timeout=300)
    stack.up()
    with stack.admin("chat_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == rows
    stack.compose("down", "-v", timeout=300)
    stack.up()
    ps = stack.containers()
    assert all(ps[b]["Health"] == "healthy" for b in (*BOTS, "acme-chat")), stack.logs()
    with stack.admin("chat_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # a new volume: migrated, empty
        assert conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                            "WHERE datname = 'chat_bot_db'").fetchone()[0] == "botfleet bot chat-bot"


def test_08_each_bot_fits_its_memory_limit_with_the_budgets_headroom(stack: Stack):
    ps = stack.containers()
    ids = [ps[b]["ID"] for b in (*BOTS, "acme-chat")]
    out = stack.docker("stats", "--no-stream", "--format", "{{json .}}", *ids).stdout
    figures = []
    for line in out.splitlines():
        row = json.loads(line)
        used, limit = (part.strip() for part in row["MemUsage"].split("/"))
        figures.append((row["Name"], used, limit, row["MemPerc"]))
    print("\nbot memory after start-up (docker stats):")
    for name, used, limit, perc in figures:
        print(f"  {name:<40} {used:>10} of {limit:<10} {perc}")
    for name, used, limit, perc in figures:
        assert float(perc.rstrip("%")) < MEMORY_HEADROOM * 100, f"{name}: {used} of {limit} ({perc})"
    # The health check reads each bot's heartbeat (shared.health): no second interpreter with
    # SQLAlchemy inside the limit above (it once pushed hello-bot past it), no login of its own.
    for cid in ids:
        health = json.loads(stack.docker("inspect", "--format", "{{json .State.Health}}", cid).stdout)
        last = health["Log"][-1]
        assert last["ExitCode"] == 0 and "through the bot's pool" in last["Output"], (cid, last)


def test_09_the_stack_file_loads_with_docker_stack_config(stack: Stack):
    proc = subprocess.run(["docker", "stack", "config", "-c", "compose.stack.yaml"], capture_output=True, text=True,
                          env=stack.env, cwd=stack.root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "unsupported" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert "services:" in proc.stdout


def test_10_the_stacks_server_recovers_to_a_time_from_the_archive_service_as_the_readme_says(stack: Stack):
    # (After test_07's down -v the archive started again from nothing: its first base backup is taken.)
    assert done_backups(stack)
    code, conv = stack.http("chat-bot", "POST", "/conversations", {"title": "kept"})
    assert code == 201, conv
    for i in range(5):
        assert stack.http("chat-bot", "POST", f"/conversations/{conv['id']}/messages",
                          {"role": "user", "content": f"kept {i}"})[0] == 201
    with stack.admin("chat_bot_db") as conn:
        kept = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        target = conn.execute("SELECT now()::text").fetchone()[0]
    time.sleep(1.5)
    for i in range(5):
        assert stack.http("chat-bot", "POST", f"/conversations/{conv['id']}/messages",
                          {"role": "user", "content": f"lost {i}"})[0] == 201
    with stack.admin("chat_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == kept + 5
    barman(stack, "switch-wal", "--force", "--archive", "--archive-timeout", "60", "default")
    # The README's flow: stop, keep a copy of the volume, recover into it (at the path postgres sees), start.
    stack.compose("stop", timeout=300)
    volume = ["botfleet_pgdata"]  # [server] project_name + "_pgdata", as the README says
    stack.docker("volume", "inspect", volume[0])
    data = "/var/lib/postgresql/data"
    (stack.root / "backups").mkdir(exist_ok=True)
    stack.compose("run", "--rm", "--no-deps", "-u", "0", "--entrypoint", "tar", "-v", f"{volume[0]}:{data}",
                  "-v", f"{stack.root / 'backups'}:/out", "archive", "czf", "/out/pgdata-before-recovery.tgz",
                  "-C", data, ".", timeout=600)
    assert (stack.root / "backups" / "pgdata-before-recovery.tgz").stat().st_size > 1_000_000
    proc = stack.compose("run", "--rm", "--no-deps", "-u", "0", "--entrypoint", "python3", "-v", f"{volume[0]}:{data}",
                         "archive", "/etc/botfleet/archive-service.py", "recover", target, data, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stdout + proc.stderr  # refused: nothing changed
    proc = stack.compose("run", "--rm", "--no-deps", "-u", "0", "--entrypoint", "python3", "-v", f"{volume[0]}:{data}",
                         "archive", "/etc/botfleet/archive-service.py", "recover", "2001-01-01 00:00:00+00", data,
                         "--replace", check=False)
    assert proc.returncode == 2 and "outside the archive's window" in proc.stderr, proc.stdout + proc.stderr
    stack.compose("run", "--rm", "--no-deps", "-u", "0", "--entrypoint", "python3", "-v", f"{volume[0]}:{data}",
                  "archive", "/etc/botfleet/archive-service.py", "recover", target, data, "--replace", timeout=900)
    stack.up()
    with stack.admin("chat_bot_db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == kept
        assert conn.execute("SELECT count(*) FROM messages WHERE content LIKE 'lost %'").fetchone()[0] == 0
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    ps = stack.containers()
    assert all(ps[s]["Health"] == "healthy" for s in (*BOTS, "archive")), stack.logs()
    # The archive took a base backup of the new timeline as it started (healthy: its first round is done).
    assert len(done_backups(stack)) >= 2
