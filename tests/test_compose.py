"""The compose stack: golden files, schema and semantic validation, the budget and its refusals.

Rendering needs no server; the budget refusals of add-bot run against the real
test server, and the rendered postgresql.conf is read by a real PostgreSQL.

Regenerate the golden files on purpose with BOTFLEET_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from provisioning import compose_check
from provisioning.registry import Registry

from .conftest import assert_no_leak, provision, snapshot, tls_binaries, tree

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("BOTFLEET_REGEN_GOLDEN") == "1"
# Fixed, fake credentials: the golden files must not depend on random passwords.
FAKE = {"hello-bot": "HelloFakePassw0rd-golden-aaaaaaaaaaaaaaaaaa", "chat-bot": "ChatFakePassw0rd-golden-bbbbbbbbbbbbbbbbbbbb",
        "acme-support": "AcmeFakePassw0rd-golden-cccccccccccccccccccc"}
ADMIN_FAKE = "AdminFakePassw0rd-golden-dddddddddddddddddddd"

REGISTRY = """\
version = 1

[server]
bot_host = "{host}"
bot_port = {port}
pgbouncer = {pgbouncer}

[bots.hello-bot]
code = "hello-bot"
database = "hello_bot_db"
role = "hello_bot_user"
env_file = "secrets/hello-bot.env"

[bots.chat-bot]
code = "chat-bot"
database = "chat_bot_db"
role = "chat_bot_user"
pool_size = 3
max_overflow = 2
replicas = 2
env_file = "secrets/chat-bot.env"

[bots.acme-support]
code = "hello-bot"
database = "acme_support_db"
role = "acme_support_user"
env_file = "secrets/acme-support.env"

[bots.no-code-yet]
code = "no-code-yet"
database = "no_code_yet_db"
role = "no_code_yet_user"
env_file = "secrets/no-code-yet.env"
"""


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`provision ARGS` for the fleet folder ``root``, no admin server named (in this process: see conftest)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1", COLUMNS="200")
    return provision(args, env)


def write_env(root: Path, bot: str, host: str, port: int) -> None:
    role, db = bot.replace("-", "_") + "_user", bot.replace("-", "_") + "_db"
    path = root / "secrets" / f"{bot}.env"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(f"DATABASE_URL=postgresql+asyncpg://{role}:{FAKE[bot]}@{host}:{port}/{db}\n"
                    "DB_POOL_SIZE=2\nDB_MAX_OVERFLOW=3\n")
    path.chmod(0o600)


def make_project(root: Path, *, pgbouncer: bool = False) -> Path:
    """A fleet folder as add-bot leaves it (registry, env files, bot code), with fixed fake secrets."""
    host, port = ("pgbouncer", 6432) if pgbouncer else ("postgres", 5432)
    root.mkdir(parents=True, exist_ok=True)
    (root / "fleet.toml").write_text(REGISTRY.format(host=host, port=port, pgbouncer=str(pgbouncer).lower()))
    for code in ("hello_bot", "chat_bot"):
        (root / "bots" / code).mkdir(parents=True, exist_ok=True)
    (root / "migrations" / "hello_bot" / "versions").mkdir(parents=True, exist_ok=True)
    for bot in ("hello-bot", "chat-bot", "acme-support"):
        write_env(root, bot, host, port)
    (root / "secrets" / "postgres-password").write_text(ADMIN_FAKE + "\n")
    # A fixed TLS pair (a test key, made for these golden files), so the output is the same every time.
    (root / "deploy").mkdir(exist_ok=True)
    shutil.copyfile(GOLDEN / "tls" / "postgres-tls.crt", root / "deploy" / "postgres-tls.crt")
    key = root / "secrets" / "postgres-tls.key"
    shutil.copyfile(GOLDEN / "tls" / "postgres-tls.key", key)
    key.chmod(0o600)
    return root


def all_passwords() -> list[str]:
    return [*FAKE.values(), ADMIN_FAKE]


def check_golden(root: Path, rel: str, name: str) -> None:
    text = (root / rel).read_text()
    golden = GOLDEN / name
    if REGEN:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: run with BOTFLEET_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"{rel} differs from {golden} (regenerate on purpose with BOTFLEET_REGEN_GOLDEN=1)"


@pytest.mark.parametrize("pgbouncer", [False, True], ids=["direct", "pgbouncer"])
def test_render_matches_golden_files(tmp_path, pgbouncer):
    root = make_project(tmp_path / "fleet", pgbouncer=pgbouncer)
    proc = run(root, "render")
    assert proc.returncode == 0, proc.stderr
    suffix = "-pgbouncer" if pgbouncer else ""
    check_golden(root, "compose.yaml", f"compose{suffix}.yaml")
    check_golden(root, "compose.stack.yaml", f"compose{suffix}.stack.yaml")
    check_golden(root, "deploy/postgresql.conf", "postgresql.conf")
    check_golden(root, "deploy/pg_hba.conf", "pg_hba.conf")
    if pgbouncer:
        check_golden(root, "deploy/pgbouncer.ini", "pgbouncer.ini")
    assert "not in the stack: no-code-yet: no code under bots/ yet" in proc.stdout
    for rel in ("compose.yaml", "compose.stack.yaml", "deploy/postgresql.conf"):
        assert (root / rel).read_text().startswith("# generated by botfleet")


def test_rendered_files_pass_schema_and_semantic_checks(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    fleet = Registry(root).load()
    for rel, stack in (("compose.yaml", False), ("compose.stack.yaml", True)):
        doc = compose_check.load_yaml((root / rel).read_text())
        assert compose_check.schema_errors(doc) == []
        assert compose_check.semantic_errors(doc, fleet, ["acme-support", "chat-bot", "hello-bot"], stack=stack,
                                             publish="127.0.0.1:15432") == []
    compose = compose_check.load_yaml((root / "compose.yaml").read_text())
    assert compose["name"] == "botfleet"  # the project, and so the volume, whatever the folder is called
    bot = compose["services"]["acme-support"]
    # another instance of hello-bot's code, which starts only once its schema is at its code's head
    assert bot["command"] == ["sh", "-c", "provision migrate --self --check --project-dir /app && exec python -m bots.hello_bot"]
    assert compose["services"]["chat-bot"]["command"] == ["python", "-m", "bots.chat_bot"]  # no migrations in this project
    assert "env_file" not in bot and bot["secrets"] == [{"source": "acme-support_database_url", "target": "database_url"}]
    assert bot["environment"]["DATABASE_URL_FILE"] == "/run/secrets/database_url"
    assert bot["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert bot["depends_on"]["provision"] == {"condition": "service_completed_successfully"}
    assert bot["read_only"] is True and bot["cap_drop"] == ["ALL"] and bot["security_opt"] == ["no-new-privileges:true"]
    assert bot["deploy"]["resources"]["limits"] == {"memory": "256M", "cpus": "0.5", "pids": 128}
    assert compose["services"]["chat-bot"]["deploy"]["replicas"] == 2
    assert compose["services"]["postgres"]["ports"] == ["127.0.0.1:15432:5432"]
    # provision: converges the server from each bot's own credentials file, as the admin through a passfile
    provision = compose["services"]["provision"]
    assert provision["command"] == ["provision", "apply", "--credentials-only", "--owns-server", "--project-dir", "/app"]
    assert {s["source"] for s in provision["secrets"]} == {"postgres_pgpass", "acme-support_env", "chat-bot_env",
                                                           "hello-bot_env"}
    assert "passfile=/run/secrets/postgres_pgpass" in provision["environment"]["ADMIN_DATABASE_URL"]


def test_schema_is_strict_and_semantics_catch_what_it_cannot(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    fleet = Registry(root).load()
    doc = compose_check.load_yaml((root / "compose.yaml").read_text())
    doc["services"]["hello-bot"]["depends_on"]["postgres"]["condition"] = "healthy"  # not a compose condition
    doc["services"]["hello-bot"]["memory"] = "128M"  # not a service key
    errors = compose_check.schema_errors(doc)
    assert any("depends_on" in e for e in errors) and any("memory" in e for e in errors), errors

    doc = compose_check.load_yaml((root / "compose.yaml").read_text())
    svc = doc["services"]["hello-bot"]
    del svc["healthcheck"], svc["deploy"]["resources"]
    svc["env_file"] = ["./secrets/chat-bot.env"]
    svc["environment"]["DATABASE_URL"] = "postgresql://x:y@postgres/db"
    doc["services"]["chat-bot"]["secrets"] = ["postgres_password"]
    doc["services"]["postgres"]["ports"] = ["5432:5432"]
    assert compose_check.schema_errors(doc) == []  # all schema-valid...
    errors = " | ".join(compose_check.semantic_errors(doc, fleet, ["hello-bot", "chat-bot"], stack=False,
                                                      publish="127.0.0.1:15432"))
    for expected in ("hello-bot: no memory limit", "bot hello-bot: the healthcheck",
                     "bot hello-bot: must get its own DATABASE_URL_FILE secret",
                     "hello-bot: environment DATABASE_URL would hold a secret inline", "chat-bot: only postgres may see the admin password",
                     "postgres: ports must be"):
        assert expected in errors

    stack = compose_check.load_yaml((root / "compose.stack.yaml").read_text())
    stack["services"]["hello-bot"]["depends_on"] = ["postgres"]
    stack["services"]["postgres"]["ports"] = ["127.0.0.1:5432:5432"]
    del stack["secrets"]["postgres_password"]["name"]
    errors = " | ".join(compose_check.semantic_errors(stack, fleet, ["hello-bot"], stack=True))
    for expected in ("hello-bot: depends_on is not for docker stack deploy", "postgres: a swarm cannot publish",
                     "secret postgres_password: needs a name"):
        assert expected in errors


def test_render_is_deterministic_and_idempotent(tmp_path):
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "b")
    assert run(a, "render").returncode == 0
    assert run(b, "render").returncode == 0
    for rel in ("compose.yaml", "compose.stack.yaml", "deploy/postgresql.conf"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (a / "compose.yaml", a / "compose.stack.yaml")}
    again = run(a, "render", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["written"] == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_secrets_stay_out_of_rendered_files_and_output(tmp_path):
    root = make_project(tmp_path / "fleet", pgbouncer=True)
    proc = run(root, "render")
    assert proc.returncode == 0, proc.stderr
    for rel in ("compose.yaml", "compose.stack.yaml", "deploy/postgresql.conf", "deploy/pgbouncer.ini", "fleet.toml"):
        text = (root / rel).read_text()
        for pw in all_passwords():
            assert_no_leak(pw, text, where=rel)
    for pw in all_passwords():
        assert_no_leak(pw, proc.stdout, proc.stderr, where="render output")
    for rel in ("secrets/postgres-password", "secrets/postgres.pgpass"):
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o600, rel
    # what a container reads as its non-root user through a bind mount (a bot its URL, PgBouncer
    # as uid 70 its userlist) is readable in the file's mode; the 0700 secrets/ folder keeps the
    # host's other users out
    for rel in ("secrets/hello-bot.url", "secrets/pgbouncer-userlist.txt"):
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o444, rel
    assert stat.S_IMODE((root / "secrets").stat().st_mode) == 0o700
    # the swarm secret behind DATABASE_URL_FILE holds exactly the bot's URL
    from shared.settings import DatabaseSettings

    settings = DatabaseSettings.from_env("hello-bot", {"DATABASE_URL_FILE": str(root / "secrets/hello-bot.url")})
    assert settings.url.username == "hello_bot_user" and settings.url.host == "pgbouncer" and settings.url.port == 6432


def test_render_never_overwrites_files_it_does_not_own(tmp_path):
    root = make_project(tmp_path / "fleet")
    (root / "compose.yaml").write_text("services: {mine: {image: busybox}}\n")
    before = tree(root)
    proc = run(root, "render")
    assert proc.returncode == 2
    assert "compose.yaml exist(s) and were not written by botfleet" in proc.stderr
    assert (root / "compose.yaml").read_text() == "services: {mine: {image: busybox}}\n"
    assert [p for p in tree(root) if not p.startswith(".botfleet")] == before  # (.botfleet/ holds the render lock)


def test_pgbouncer_switch_needs_no_new_env_files(tmp_path):
    """The stack's bots get URLs rendered for the stack (PgBouncer or postgres), with the password
    of their env file whatever host that file names: switching PgBouncer on is one render."""
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    env_before = {bot: (root / "secrets" / f"{bot}.env").read_text() for bot in ("hello-bot", "chat-bot", "acme-support")}
    proc = run(root, "render", "--pgbouncer")
    assert proc.returncode == 0, proc.stderr
    server = tomllib.loads((root / "fleet.toml").read_text())["server"]
    assert server["pgbouncer"] is True and (server["bot_host"], server["bot_port"]) == ("pgbouncer", 6432)
    assert {bot: (root / "secrets" / f"{bot}.env").read_text() for bot in env_before} == env_before
    url = (root / "secrets/hello-bot.url").read_text()
    assert url == f"postgresql+asyncpg://hello_bot_user:{FAKE['hello-bot']}@pgbouncer:6432/hello_bot_db\n"
    ini = (root / "deploy/pgbouncer.ini").read_text()
    assert "chat_bot_db = host=postgres port=5432 dbname=chat_bot_db pool_size=1 max_db_connections=1" in ini
    assert "pool_mode = transaction" in ini and "max_prepared_statements = 200" in ini
    compose = compose_check.load_yaml((root / "compose.yaml").read_text())
    assert compose["services"]["hello-bot"]["networks"] == ["fleet"]  # cannot reach postgres around PgBouncer
    assert "postgres" not in [s for s, v in compose["services"].items() if "fleet" in v["networks"]]
    # migrations bypass the pooler: the provision service migrates, on postgres's own network
    assert compose["services"]["provision"]["networks"] == ["db"]

    for bot in ("hello-bot", "chat-bot", "acme-support"):
        write_env(root, bot, "postgres", 5432)
    proc = run(root, "render", "--no-pgbouncer")
    assert proc.returncode == 0, proc.stderr
    assert "removed    deploy/pgbouncer.ini" in proc.stdout
    assert not (root / "deploy/pgbouncer.ini").exists() and not (root / "secrets/pgbouncer-userlist.txt").exists()


def test_budget_prints_the_numbers(tmp_path):
    root = make_project(tmp_path / "fleet")
    proc = run(root, "budget")
    assert proc.returncode == 0, proc.stderr
    assert "max_connections 61 (derived from the memory)" in proc.stdout
    assert "chat-bot      3+2   2         10       11" in proc.stdout
    data = json.loads(run(root, "budget", "--json").stdout)
    assert data["total"] == 6 + 11 + 6 + 6 and data["reserve"] == 5 and data["headroom"] == 61 - 5 - 29
    assert data["memory"]["estimate_mb"] <= data["memory"]["limit_mb"]
    proc = run(root, "budget", "--max-connections", "30")
    assert proc.returncode == 2
    assert "needs 34 connections (29 for 4 bots + 5 reserved) but max_connections is 30: 4 too many" in proc.stderr
    proc = run(root, "budget", "--max-connections", "200")
    assert proc.returncode == 2 and "but postgres has 512MB" in proc.stderr
    assert "fits" in run(root, "budget", "--postgres-memory", "1G", "--max-connections", "80").stdout


def test_render_refuses_an_over_budget_fleet_and_changes_nothing(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for args in (["--max-connections", "25"], ["--postgres-memory", "128M"], ["--postgres-memory", "5X"],
                 ["--publish", "localhost:5432"], ["--postgres-major", "9"]):
        proc = run(root, "render", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".botfleet" not in p.parts} == \
        {p: b for p, b in before.items() if ".botfleet" not in p.parts}
    proc = run(root, "render", "--max-connections", "25")
    assert "raise the memory" in proc.stderr and "enable" not in proc.stderr
    assert "provision render --pgbouncer" in proc.stderr and "--pool-size 1" in proc.stderr


def test_postgresql_conf_is_read_by_a_real_postgres(tmp_path):
    """The rendered config, as a real PostgreSQL reads it (postgres -C: 8kB pages, kB): the derived numbers."""
    from provisioning.embedded import EmbeddedServer

    root = make_project(tmp_path / "fleet")
    assert run(root, "render", "--postgres-memory", "1G").returncode == 0
    server = EmbeddedServer(tmp_path / "pg" / ".botfleet", bin_dir=tls_binaries())  # the conf turns TLS on
    server.init()
    conf = server.state_dir / "rendered.conf"
    conf.write_text((root / "deploy/postgresql.conf").read_text())
    server._chown(conf)
    values = {}
    for name in ("max_connections", "shared_buffers", "work_mem", "effective_cache_size", "maintenance_work_mem"):
        proc = server._run("postgres", "-D", str(server.pgdata), "-c", f"config_file={conf}", "-C", name)
        values[name] = proc.stdout.strip()
    assert values == {"max_connections": "139", "shared_buffers": "32768", "work_mem": "4096",
                      "effective_cache_size": "65536", "maintenance_work_mem": "65536"}


# -- add-bot and remove-bot keep a rendered stack in step (real server) -------------------------

def test_add_bot_refuses_a_bot_that_does_not_fit(fleet, admin):
    a, b, c = fleet.name("fit"), fleet.name("fit"), fleet.name("over")
    for name in (a, b, c):
        (fleet.root / "bots" / name.replace("-", "_")).mkdir(parents=True)
    fleet.add(a)
    fleet.add(b)
    proc = fleet.run("render", "--postgres-memory", "256M", "--max-connections", "20")  # 5 reserved + 6 + 6 fit
    assert proc.returncode == 0, proc.stderr
    compose = compose_check.load_yaml((fleet.root / "compose.yaml").read_text())
    assert {a, b} <= set(compose["services"])

    before_server, before_files = snapshot(admin), tree(fleet.root)
    registry = (fleet.root / "fleet.toml").read_text()
    proc = fleet.run("add-bot", c)
    assert proc.returncode == 2
    assert f"adding {c} needs 23 connections (18 for 3 bots + 5 reserved) but max_connections is 20: 3 too many" in proc.stderr
    assert "nothing was changed" in proc.stderr and "--pgbouncer" in proc.stderr
    assert snapshot(admin) == before_server
    assert tree(fleet.root) == before_files and (fleet.root / "fleet.toml").read_text() == registry

    # A smaller pool fits: add-bot re-renders the stack with the new bot.
    proc = fleet.run("add-bot", c, "--pool-size", "1", "--max-overflow", "0")
    assert proc.returncode == 0, proc.stderr
    compose = compose_check.load_yaml((fleet.root / "compose.yaml").read_text())
    assert c in compose["services"]
    # A rerun of an existing bot (no more connections) is never refused.
    assert fleet.run("add-bot", a).returncode == 0

    proc = fleet.run("remove-bot", b, "--yes", "--no-backup")
    assert proc.returncode == 0, proc.stderr
    compose = compose_check.load_yaml((fleet.root / "compose.yaml").read_text())
    assert b not in compose["services"] and not (fleet.root / "secrets" / f"{b}.url").exists()


def test_render_refuses_a_bot_that_lacks_a_required_setting_and_settings_reach_bots_as_files(tmp_path):
    root = make_project(tmp_path / "fleet")
    (root / "bots" / "hello_bot" / "__init__.py").write_text('REQUIRED_SETTINGS = ("BOT_TOKEN",)\n')
    before = [p for p in tree(root) if not p.startswith(".botfleet")]
    proc = run(root, "render")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "acme-support needs BOT_TOKEN (provision config set acme-support BOT_TOKEN=...)" in errors[0]
    assert "hello-bot needs BOT_TOKEN" in errors[0] and "--allow-missing-config" in errors[0]
    assert [p for p in tree(root) if not p.startswith(".botfleet")] == before, "a refused render writes nothing"
    assert run(root, "render", "--allow-missing-config").returncode == 0

    token = "123456:FakeTokenForTheGoldenProject"
    for bot in ("hello-bot", "acme-support"):
        with open(root / "secrets" / f"{bot}.env", "a") as fh:
            fh.write(f"BOT_TOKEN={token}\n")
    proc = run(root, "render")
    assert proc.returncode == 0, proc.stderr
    compose = compose_check.load_yaml((root / "compose.yaml").read_text())
    svc = compose["services"]["hello-bot"]
    assert {"source": "hello-bot_bot_token", "target": "BOT_TOKEN"} in svc["secrets"]
    assert svc["environment"]["BOT_TOKEN_FILE"] == "/run/secrets/BOT_TOKEN"
    assert (root / "secrets" / "hello-bot.settings" / "BOT_TOKEN").read_text() == token + "\n"
    for rel in ("compose.yaml", "compose.stack.yaml"):
        assert_no_leak(token, (root / rel).read_text(), where=rel)
    assert_no_leak(token, proc.stdout, proc.stderr, where="render output")
    chat = compose["services"]["chat-bot"]
    assert [s["source"] for s in chat["secrets"]] == ["chat-bot_database_url"], "each bot gets its own settings only"


def test_render_says_when_the_published_port_is_already_taken(tmp_path):
    import socket

    root = make_project(tmp_path / "fleet")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(root, "render", "--publish", f"127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    assert f"note: 127.0.0.1:{port} already answers" in proc.stderr
    proc = run(root, "render", "--publish", "")
    assert proc.returncode == 0 and "already answers" not in proc.stderr
    assert "ports" not in compose_check.load_yaml((root / "compose.yaml").read_text())["services"]["postgres"]


def test_a_second_render_keeps_the_modes_it_wrote(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    (root / "secrets" / "postgres.pgpass").chmod(0o644)  # someone loosened it
    assert run(root, "render").returncode == 0  # nothing to rewrite: every file unchanged
    assert stat.S_IMODE((root / "secrets" / "hello-bot.url").stat().st_mode) == 0o444  # a bot's own, read as uid 10001
    assert stat.S_IMODE((root / "secrets" / "postgres.pgpass").stat().st_mode) == 0o600


def test_the_budget_counts_the_bots_memory_per_code_and_override(tmp_path):
    root = make_project(tmp_path / "fleet")
    budget = json.loads(run(root, "budget", "--json").stdout)
    # hello-bot and acme-support run hello_bot's code (256M), chat-bot chat_bot's (192M) in 2 replicas;
    # no-code-yet has no code, its code's name is unknown to the table: the default 256M
    assert budget["memory"]["bots_mb"] == 256 + 256 + 2 * 192 + 256
    text = (root / "fleet.toml").read_text().replace('[bots.chat-bot]\n', '[bots.chat-bot]\nmemory = "512M"\n')
    (root / "fleet.toml").write_text(text)
    assert json.loads(run(root, "budget", "--json").stdout)["memory"]["bots_mb"] == 256 + 256 + 2 * 512 + 256
    assert "bot memory" in run(root, "budget").stdout
