"""The compose stack behind PgBouncer (`provision render --pgbouncer`), end to end on the e2e
engine: the bots reach their databases only through PgBouncer (transaction pooling, asyncpg's
prepared statements), PgBouncer reaches postgres over verified TLS, and the server sees each
bot's sessions coming from PgBouncer alone.

PgBouncer here is e2e/images/pgbouncer: Debian trixie's pgbouncer 1.24 as uid 70, a stand-in
for the edoburu/pgbouncer image the stack names (see e2e/README.md). Needs `bash e2e/engine.sh up`.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from test_stack import BOT_TOKEN, Stack, fleet_folder

BOTS = ("chat-bot", "hello-bot")


@pytest.fixture(scope="module")
def pgb(request):
    yield from fleet_folder(request, ("postgres", "chat-bot"))


def test_p1_a_fleet_behind_pgbouncer_comes_up(pgb: Stack):
    pgb.provision("add-bot", "chat-bot", "--publish", f"127.0.0.1:{pgb.ports['chat-bot']}")
    pgb.provision("add-bot", "hello-bot")
    pgb.provision("config", "set", "hello-bot", f"BOT_TOKEN={BOT_TOKEN}")
    pgb.provision("render", "--pgbouncer", "--publish", f"127.0.0.1:{pgb.ports['postgres']}")
    pgb.build_and_up(healthy=BOTS, running=("pgbouncer",))


def test_p2_the_bots_write_through_pgbouncer_and_postgres_sees_only_pgbouncer(pgb: Stack):
    code, conv = pgb.http("chat-bot", "POST", "/conversations", {"title": "behind pgbouncer"})
    assert code == 201, conv
    for i in range(3):
        code, msg = pgb.http("chat-bot", "POST", f"/conversations/{conv['id']}/messages",
                             {"role": "user", "content": f"pooled {i}"})
        assert code == 201, msg
    code, context = pgb.http("chat-bot", "GET", f"/conversations/{conv['id']}/context?limit=2")
    assert code == 200 and [m["content"] for m in context] == ["pooled 1", "pooled 2"], context

    # Where the bot's DATABASE_URL points (printed without its password), from inside its container.
    script = ("from shared.settings import DatabaseSettings as S; u = S.from_env('chat-bot').url; "
              "print(f'{u.host}:{u.port}/{u.database}')")
    proc = pgb.compose("exec", "-T", "chat-bot", "python", "-c", script)
    assert proc.stdout.strip() == "pgbouncer:6432/chat_bot_db", proc.stdout

    containers = pgb.containers()
    inspect = {s: json.loads(pgb.docker("inspect", containers[s]["ID"]).stdout)[0] for s in ("pgbouncer", "chat-bot")}
    networks = {s: i["NetworkSettings"]["Networks"] for s, i in inspect.items()}
    db_net = next(n for n in networks["pgbouncer"] if n.endswith("_db"))
    assert db_net not in networks["chat-bot"], "a bot behind PgBouncer is not on postgres's network"
    pgbouncer_ip = networks["pgbouncer"][db_net]["IPAddress"]
    with pgb.admin() as conn:
        rows = conn.execute("SELECT DISTINCT host(a.client_addr), s.ssl FROM pg_stat_activity a "
                            "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'chat_bot_user'").fetchall()
    assert rows == [(pgbouncer_ip, True)], (rows, pgbouncer_ip)
    # PgBouncer itself: not root, as the image's postgres user
    top = pgb.compose("top", "pgbouncer").stdout
    assert "pgbouncer" in top and not any(line.split()[:1] == ["root"] for line in top.splitlines()
                                          if "pgbouncer" in line), top


STORM = """
import sys, time, psycopg
from shared.settings import DatabaseSettings as S
u = S.from_env('chat-bot').url
held, refused = [], []
for _ in range(int(sys.argv[1])):
    try:
        held.append(psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                                    dbname=u.database, connect_timeout=10))
    except psycopg.OperationalError as e:
        refused.append(str(e).strip().splitlines()[-1])
print(f"held {len(held)} refused {len(refused)}", flush=True)
print("reason", refused[0] if refused else "-", flush=True)
time.sleep(float(sys.argv[2]))
"""
PROBE = """
import psycopg
from shared.settings import DatabaseSettings as S
u = S.from_env('hello-bot').url
with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
                     connect_timeout=10) as c:
    print("hello-bot in:", c.execute("SELECT current_user").fetchone()[0])
"""


def test_p3_one_bots_connection_storm_is_capped_at_its_own_limit_and_the_others_get_in(pgb: Stack):
    ini = (pgb.root / "deploy" / "pgbouncer.ini").read_text()
    cap = int(next(line for line in ini.splitlines() if line.startswith("chat_bot_user ="))
              .split("max_user_client_connections=")[1].split()[0])
    # The storm, from inside chat-bot's container (its own credentials): twice its cap, held 20 s.
    storm = subprocess.Popen(["docker", "compose", "-f", "compose.yaml", "-f", "e2e.override.yaml", "exec", "-T",
                              "chat-bot", "python", "-c", STORM, str(2 * cap), "20"], cwd=pgb.root, env=pgb.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert storm.stdout is not None
        first = storm.stdout.readline()  # the storm holds what it got from here on
        reason = storm.stdout.readline()
        held, refused = int(first.split()[1]), int(first.split()[3])
        assert 0 < held <= cap and held + refused == 2 * cap, (first, cap)
        assert "max_user_client_connections" in reason or "no more connections allowed" in reason, reason
        probe = pgb.compose("exec", "-T", "hello-bot", "python", "-c", PROBE, check=False)
        assert probe.returncode == 0 and "hello-bot in: hello_bot_user" in probe.stdout, probe.stdout + probe.stderr
    finally:
        storm.kill()
        storm.wait(timeout=60)
    # once the storm is gone, the bot itself is served again
    deadline = time.monotonic() + 60
    while pgb.http("chat-bot", "GET", "/health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(1)
    code, conv = pgb.http("chat-bot", "POST", "/conversations", {"title": "after the storm"})
    assert code == 201, conv
