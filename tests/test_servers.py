"""A fleet on two real PostgreSQL servers (the embedded one and the local one):
placement, and list, budget, render, migrate, doctor, plan/apply, backup across both."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from psycopg import sql

from provisioning.compose_check import load_yaml

from .conftest import Fleet, TestServer, drop_bot_objects, other_fleets, snapshot, tree


def stem(name: str) -> str:
    return name.replace("-", "_")


def has_db(server: TestServer, name: str) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"{stem(name)}_db",)).fetchone() is not None


def tables(server: TestServer, name: str) -> dict[str, str]:
    with server.connect(f"{stem(name)}_db") as conn:
        return dict(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())


def second_endpoint(server: TestServer) -> tuple[str, int]:
    if server.embedded is not None:
        return "127.0.0.1", server.embedded.status().port
    return "127.0.0.1", 5432


@pytest.fixture
def two(code_fleet, other_server) -> Iterator[tuple[Fleet, TestServer]]:
    """A fleet whose fleet.toml names the other server as [servers.second]."""
    (code_fleet.root / "fleet.toml").write_text(
        f'[servers.second]\nadmin_url = "{other_server.url}"\nmax_connections = 40\n')
    yield code_fleet, other_server
    with other_server.connect() as conn:
        drop_bot_objects(conn, code_fleet.names)


def registry(fleet: Fleet) -> dict:
    import tomllib

    return tomllib.loads((fleet.root / "fleet.toml").read_text())


def test_bots_live_on_their_server_and_every_command_spans_both(two, pg):
    fleet, second = two
    a, b = fleet.name("two-a"), fleet.name("two-b")
    host, port = second_endpoint(second)
    proc = fleet.run("add-bot", a, "--code", "hello-bot", "--server", "second")
    assert proc.returncode == 0 and "server second:" in proc.stderr, proc.stderr
    assert fleet.run("config", "set", a, "BOT_TOKEN=123:fake").returncode == 0  # hello-bot's code requires it
    # The default server (512M: max_connections 61) has more headroom than second (40).
    proc = fleet.run("add-bot", b, "--code", "chat-bot")
    assert proc.returncode == 0 and f"placing {b} on server default" in proc.stderr, proc.stderr
    assert registry(fleet)["bots"][a]["server"] == "second" and "server" not in registry(fleet)["bots"][b]
    assert has_db(second, a) and not has_db(pg, a)
    assert has_db(pg, b) and not has_db(second, b)
    assert set(tables(second, a).values()) == {f"{stem(a)}_user"}, "migrated as the bot, on its server"
    assert f"@{host}:{port}/{stem(a)}_db" in fleet.env_file(a).read_text()

    rows = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout) if r["bot"] in (a, b)}
    assert (rows[a]["server"], rows[a]["status"]) == ("second", "ok")
    assert (rows[b]["server"], rows[b]["status"]) == ("default", "ok")
    assert "SERVER" in fleet.run("list").stdout

    budget = json.loads(fleet.run("budget", "--json").stdout)["servers"]
    assert [s["name"] for s in budget["second"]["bots"]] == [a]
    assert budget["second"]["max_connections"] == 40 and budget["second"]["headroom"] == 40 - 5 - 6
    assert [s["name"] for s in budget["default"]["bots"]] == [b]

    proc = fleet.run("migrate", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {o["bot"]: o["status"] for o in json.loads(proc.stdout)} == {a: "up to date", b: "up to date"}
    assert fleet.run("current").stdout.count("at head") == 2

    proc = fleet.run("doctor", *other_fleets(), "--json")
    assert proc.returncode == 0, proc.stdout
    with second.connect() as conn:  # break isolation on the second server only
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(f"{stem(a)}_db")))
    proc = fleet.run("doctor", *other_fleets(), "--json")
    found = json.loads(proc.stdout)["remaining"]
    assert proc.returncode == 1 and [(f["bot"], f["server"], f["check"]) for f in found] == [(a, "second", "access")]
    assert "(server second)" in fleet.run("doctor", *other_fleets()).stdout
    assert fleet.run("doctor", *other_fleets(), "--fix").returncode == 0

    proc = fleet.run("backup", a)
    assert proc.returncode == 0, proc.stderr
    assert len(list((fleet.root / "backups" / a).glob("*.dump"))) == 1

    proc = fleet.run("render")
    assert proc.returncode == 0, proc.stderr
    compose = load_yaml((fleet.root / "compose.yaml").read_text())["services"]
    assert "postgres" not in compose[a].get("depends_on", {}), "a lives on second, not on the stack's postgres"
    assert compose[b]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the stack's provision service converges and migrates the stack's own bots only (a's server is not its own)
    assert {x["source"] for x in compose["provision"]["secrets"]} == {"postgres_pgpass", f"{b}_env"}
    assert "--credentials-only" in compose["provision"]["command"]


def test_placement_budget_refusal_and_no_moves(two, pg, admin):
    fleet, second = two
    a = fleet.name("place")
    # A small default server: the second one now has the most headroom.
    path = fleet.root / "fleet.toml"
    path.write_text(path.read_text() + "\n[server]\nmax_connections = 20\n")
    proc = fleet.run("add-bot", a)
    assert proc.returncode == 0 and f"placing {a} on server second" in proc.stderr, proc.stderr
    assert has_db(second, a) and not has_db(pg, a)

    proc = fleet.run("add-bot", a, "--server", "default")
    assert proc.returncode == 2 and "does not move bots between servers" in proc.stderr

    big = fleet.name("big")
    before_local, before_second, files = snapshot(admin), None, tree(fleet.root)
    with second.connect() as conn:
        before_second = snapshot(conn)
    proc = fleet.run("add-bot", big, "--server", "second", "--replicas", "10")
    assert proc.returncode == 2 and "on server second" in proc.stderr and "max_connections" in proc.stderr, proc.stderr
    assert snapshot(admin) == before_local and tree(fleet.root) == files
    with second.connect() as conn:
        assert snapshot(conn) == before_second

    proc = fleet.run("add-bot", fleet.name("nowhere"), "--server", "third")
    assert proc.returncode == 2 and "no server 'third' in fleet.toml" in proc.stderr


def test_plan_and_apply_span_both_servers(two, pg):
    fleet, second = two
    a, b = fleet.name("pa-a"), fleet.name("pa-b")
    path = fleet.root / "fleet.toml"
    path.write_text(path.read_text() + f'\n[bots.{a}]\ncode = "hello-bot"\nserver = "second"\n\n[bots.{b}]\n')
    p = json.loads(fleet.run("plan", "--json").stdout)
    mine = {(s["action"], s["subject"]): s["server"] for s in p["steps"] if s["subject"] in (a, b)}
    assert mine == {("create", a): "second", ("migrate", a): "second", ("create", b): "default"}
    proc = fleet.run("apply")
    assert proc.returncode == 0, proc.stderr
    assert has_db(second, a) and has_db(pg, b) and "users" in tables(second, a)

    path.write_text(path.read_text().replace(f'[bots.{a}]\ncode = "hello-bot"\nserver = "second"\n', ""))
    p = json.loads(fleet.run("plan", "--json", "--prune").stdout)
    assert [(s["action"], s["subject"], s["server"]) for s in p["steps"]] == [("remove", a, "second")]
    proc = fleet.run("apply", "--prune", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not has_db(second, a) and len(list((fleet.root / "backups" / a).glob("*.dump"))) == 1
    assert has_db(pg, b)
    assert json.loads(fleet.run("plan", "--json", "--prune").stdout)["steps"] == []


@pytest.mark.parametrize("table, why", [
    ('[servers.second]\nadmin_url = "postgresql://postgres:secret@127.0.0.1/postgres"\n', "must not contain a password"),
    ("[servers.default]\nadmin_url = \"postgresql://postgres@127.0.0.1/postgres\"\n", "not 'default'"),
    ("[servers.x]\nmax_connections = 40\n", "needs admin_url"),
    ('[servers.x]\nadmin_url = "postgresql://postgres@127.0.0.1/postgres"\nmax_connections = 5\n',
     "max_connections must be 20-5000"),
    ('[bots.some-bot]\nserver = "nowhere"\n', "server 'nowhere' is not a [servers.NAME] table"),
])
def test_bad_server_tables_are_refused_in_one_line(fleet, admin, table, why):
    (fleet.root / "fleet.toml").write_text(table)
    before = snapshot(admin)
    for args in (("list",), ("plan",), ("add-bot", fleet.name("x"))):
        proc = fleet.run(*args)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
        assert "secret" not in proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error")]) == 1
    assert snapshot(admin) == before
