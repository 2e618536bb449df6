"""The declarative fleet: fleet.toml edited by hand, `provision plan` and `provision apply`,
on a real PostgreSQL."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from .conftest import snapshot, tree


def stem(name: str) -> str:
    return name.replace("-", "_")


def role_facts(admin, name: str) -> tuple[int, dict[str, str]] | None:
    row = admin.execute(
        "SELECT r.rolconnlimit, s.setconfig FROM pg_roles r "
        "LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0 WHERE r.rolname = %s",
        (f"{stem(name)}_user",)).fetchone()
    if row is None:
        return None
    return row[0], dict(item.split("=", 1) for item in (row[1] or []))


def db_exists(admin, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"{stem(name)}_db",)).fetchone() is not None


def append_bot(fleet, name: str, **values) -> None:
    """Add a [bots.NAME] table to fleet.toml by hand, as an operator would."""
    lines = [f"\n[bots.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = fleet.root / "fleet.toml"
    path.write_text((path.read_text() if path.exists() else "") + "\n".join(lines) + "\n")


def edit(fleet, old: str, new: str) -> None:
    path = fleet.root / "fleet.toml"
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))


def one_error(proc) -> str:
    """The command's error: exactly one line (the rest of stderr is progress)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def plan(fleet, *args: str) -> dict:
    proc = fleet.run("plan", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def steps(result: dict) -> dict[tuple[str, str], list[str]]:
    return {(s["action"], s["subject"]): s["details"] for s in result["steps"]}


def test_bots_added_by_hand_are_created_migrated_and_then_nothing_is_left_to_do(code_fleet, admin, pg):
    coded, bare = code_fleet.name("coded"), code_fleet.name("bare")
    append_bot(code_fleet, coded, code="hello-bot", pool_size=3, max_overflow=1)
    append_bot(code_fleet, bare)  # only its table: database, role and code derive from the name
    before = snapshot(admin)
    p = plan(code_fleet)
    assert snapshot(admin) == before, "plan changes nothing"
    s = steps(p)
    assert ("create", coded) in s and ("create", bare) in s
    assert f"role {stem(coded)}_user (connection limit 5)" in s[("create", coded)]
    assert s[("migrate", coded)] == ["base -> def31b97a6a7 (code hello_bot)"]
    assert ("migrate", bare) not in s  # no code yet: database and role only
    assert code_fleet.run("plan", "--detailed-exitcode").returncode == 3

    proc = code_fleet.run("apply")
    assert proc.returncode == 0, proc.stderr
    assert f"create  {coded}  created" in proc.stdout and f"migrate {coded}  upgraded: base -> def31b97a6a7" in proc.stdout
    assert role_facts(admin, coded)[0] == 5 and role_facts(admin, bare)[0] == 6
    with pg.connect(f"{stem(coded)}_db") as conn:
        owners = dict(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())
    assert owners == {"alembic_version": f"{stem(coded)}_user", "users": f"{stem(coded)}_user"}
    for name in (coded, bare):
        assert (code_fleet.env_file(name).stat().st_mode & 0o777) == 0o600

    assert plan(code_fleet)["steps"] == []
    assert code_fleet.run("plan", "--detailed-exitcode").returncode == 0
    files, server = tree(code_fleet.root), snapshot(admin)
    passwords = {n: code_fleet.password(n) for n in (coded, bare)}
    proc = code_fleet.run("apply")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr
    assert tree(code_fleet.root) == files and snapshot(admin) == server
    assert {n: code_fleet.password(n) for n in (coded, bare)} == passwords


def test_edited_entries_and_server_drift_are_planned_then_converged_keeping_passwords(fleet, admin):
    name = fleet.name("edit")
    fleet.add(name)
    password = fleet.password(name)
    edit(fleet, "\npool_size = 2\n", "\npool_size = 4\n")
    edit(fleet, "\nreplicas = 1\n", "\nreplicas = 2\n")
    edit(fleet, 'statement_timeout = "30s"', 'statement_timeout = "5s"')
    # ... and someone changed the server by hand.
    admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(f"{stem(name)}_db")))
    admin.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(f"{stem(name)}_user")))

    details = steps(plan(fleet))[("update", name)]
    for expected in ("role attributes (NOCREATEDB)", "role connection limit 6 -> 15", "role statement_timeout 30s -> 5s",
                     "database connection limit 7 -> 16", "revoke PUBLIC access to the database",
                     f"secrets/{name}.env: DB_POOL_SIZE 2 -> 4"):
        assert expected in details, details
    assert not any(password in d for d in details)

    proc = fleet.run("apply")
    assert proc.returncode == 0, proc.stderr
    limit, settings = role_facts(admin, name)
    assert limit == 15 and settings["statement_timeout"] == "5s"
    assert not admin.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = %s", (f"{stem(name)}_user",)).fetchone()[0]
    assert "DB_POOL_SIZE=4" in fleet.env_file(name).read_text()
    assert fleet.password(name) == password, "apply keeps the bot's password"
    assert plan(fleet)["steps"] == []


def test_a_bot_dropped_from_fleet_toml_is_kept_unless_pruned_after_a_backup(fleet, admin):
    keep, gone = fleet.name("keep"), fleet.name("gone")
    fleet.add(keep)
    fleet.add(gone)
    text = (fleet.root / "fleet.toml").read_text()
    start = text.index(f"[bots.{gone}]")
    end = text.find("\n[", start + 1)
    (fleet.root / "fleet.toml").write_text(text[:start] + (text[end + 1:] if end != -1 else ""))

    p = steps(plan(fleet))
    assert p == {("keep", gone): [f"database {stem(gone)}_db", f"role {stem(gone)}_user",
                                  "not in fleet.toml (apply --prune backs it up, then removes it)"]}
    proc = fleet.run("apply")
    assert proc.returncode == 0 and f"kept (not in fleet.toml; --prune removes them): {gone}" in proc.stdout
    assert db_exists(admin, gone)
    # --ignore-stray: a bot this project wants to leave alone is not even listed.
    assert plan(fleet, "--ignore-stray", f"{gone[:-2]}*")["steps"] == []
    # Without its env file, the bot is not this project's (another fleet's on the same server).
    env = fleet.env_file(gone)
    env.rename(fleet.root / "gone.env")
    p = plan(fleet, "--prune")
    assert p["steps"] == [] and gone in p["others"]
    assert fleet.run("apply", "--prune", "--yes").returncode == 0 and db_exists(admin, gone)
    (fleet.root / "gone.env").rename(env)

    before, files = snapshot(admin), tree(fleet.root)
    proc = fleet.run("apply", "--prune")  # no terminal to ask on, no --yes
    assert proc.returncode == 2 and "pass --yes" in one_error(proc)
    assert snapshot(admin) == before and tree(fleet.root) == files

    proc = fleet.run("apply", "--prune", "--yes")
    assert proc.returncode == 0, proc.stderr
    dumps = list((fleet.root / "backups" / gone).glob("*.dump"))
    assert len(dumps) == 1 and dumps[0].stat().st_size > 0
    assert not db_exists(admin, gone) and role_facts(admin, gone) is None
    assert not fleet.env_file(gone).exists()
    assert db_exists(admin, keep)
    assert plan(fleet, "--prune")["steps"] == []


@pytest.mark.parametrize("table, why", [
    ({"pool_size": 0}, "pool_size must be between 1 and 1000"),
    ({"pool_sise": 3}, "unknown key 'pool_sise'"),
    ({"replicas": "2"}, "replicas must be a whole number"),
    ({"statement_timeout": "soon"}, "statement_timeout must look like 30s"),
    ({"database": "other_db"}, "database and role must be"),
])
def test_a_bad_entry_is_refused_in_one_line_and_nothing_changes(fleet, admin, table, why):
    ok, bad = fleet.name("ok"), fleet.name("bad")
    fleet.add(ok)
    append_bot(fleet, ok.replace("-ok-", "-new-"))  # a valid new bot: not created either
    fleet.names.append(ok.replace("-ok-", "-new-"))
    append_bot(fleet, bad, **table)
    before, files = snapshot(admin), tree(fleet.root)
    for command in ("plan", "apply"):
        proc = fleet.run(command)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert why in one_error(proc)
    assert snapshot(admin) == before and tree(fleet.root) == files


def test_an_invalid_name_and_a_foreign_role_are_refused(fleet, admin):
    append_bot(fleet, "Bad_Name")
    proc = fleet.run("plan")
    assert proc.returncode == 2 and "invalid bot name 'Bad_Name'" in one_error(proc)
    (fleet.root / "fleet.toml").unlink()

    name = fleet.name("taken")
    admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(f"{stem(name)}_user")))  # not botfleet's
    append_bot(fleet, name)
    before = snapshot(admin)
    proc = fleet.run("apply")
    assert proc.returncode == 2 and "exists without botfleet's marker" in one_error(proc)
    assert snapshot(admin) == before and not db_exists(admin, name)


def test_the_rendered_stack_follows_fleet_toml_and_the_budget_is_enforced(code_fleet, admin):
    name = code_fleet.name("stack")
    code_fleet.add(name, "--code", "hello-bot", "--no-migrate")
    assert code_fleet.run("config", "set", name, "BOT_TOKEN=123:fake").returncode == 0  # its code requires it
    assert code_fleet.run("render").returncode == 0
    assert plan(code_fleet)["steps"] == [{"action": "migrate", "subject": name, "server": "default",
                                          "details": ["base -> def31b97a6a7 (code hello_bot)"]}]
    assert code_fleet.run("apply").returncode == 0

    edit(code_fleet, 'postgres_memory = "512M"', 'postgres_memory = "1G"')
    s = steps(plan(code_fleet))
    assert set(s) == {("file", "compose.yaml"), ("file", "compose.stack.yaml"), ("file", "deploy/postgresql.conf")}
    conf = (code_fleet.root / "deploy" / "postgresql.conf").read_text()
    assert code_fleet.run("apply").returncode == 0
    assert (code_fleet.root / "deploy" / "postgresql.conf").read_text() != conf
    assert "1G" in (code_fleet.root / "compose.yaml").read_text()
    assert plan(code_fleet)["steps"] == []

    edit(code_fleet, "\nreplicas = 1\n", "\nreplicas = 100\n")
    before, files = snapshot(admin), tree(code_fleet.root)
    proc = code_fleet.run("apply")
    error = one_error(proc)
    assert proc.returncode == 2 and "connections" in error and "nothing was changed" in error
    assert snapshot(admin) == before and tree(code_fleet.root) == files


def test_apply_keeps_a_hand_written_registry_as_the_operator_wrote_it(fleet):
    name = fleet.name("minimal")
    append_bot(fleet, name)
    written = (fleet.root / "fleet.toml").read_text()
    assert fleet.run("apply").returncode == 0
    assert (fleet.root / "fleet.toml").read_text() == written, "nothing to add: the rest derives from the name"
    rows = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout)}
    assert rows[name]["status"] == "ok" and rows[name]["database"] == f"{stem(name)}_db"
    with psycopg.connect(fleet.server.url) as conn:
        assert conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                            (f"{stem(name)}_db",)).fetchone()[0] == f"botfleet bot {name}"
