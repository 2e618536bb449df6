"""Per-bot Alembic migrations run by `provision`, on a real PostgreSQL, as each bot's role."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import psycopg
import pytest

from provisioning.db import lock_key, with_database
from provisioning.migrate import MIGRATION_LOCK_SPACE

from .conftest import PROVISION, snapshot, tree

CODES = {"hello-bot": {"users"}, "chat-bot": {"conversations", "messages", "file_metadata"},
         "feishu-bot": None}  # feishu: whatever its models define


def db_of(name: str) -> str:
    return name.replace("-", "_") + "_db"


def role_of(name: str) -> str:
    return name.replace("-", "_") + "_user"


def tables(pg, name: str) -> dict[str, str]:
    """table -> owner in the bot's database (public schema)."""
    with pg.connect(db_of(name)) as conn:
        return dict(conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())


def version(pg, name: str) -> str | None:
    with pg.connect(db_of(name)) as conn:
        if not conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def head(fleet, package: str) -> str:
    from alembic.script import ScriptDirectory
    from provisioning.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config(fleet.root, package)).get_current_head()


def add_code_bots(fleet, *codes: str, migrate: bool = False) -> list[str]:
    names = []
    for code in codes:
        name = fleet.name(code.split("-")[0])
        fleet.add(name, "--code", code, *([] if migrate else ["--no-migrate"]))
        names.append(name)
    return names


def migrate_json(fleet, *args: str) -> tuple[int, dict[str, dict], str]:
    proc = fleet.run("migrate", *args, "--json")
    return proc.returncode, {o["bot"]: o for o in json.loads(proc.stdout or "[]")}, proc.stderr


def test_fleet_migrate_with_jobs_upgrades_every_bot_as_its_own_role(code_fleet, pg):
    names = add_code_bots(code_fleet, "hello-bot", "chat-bot", "feishu-bot", "hello-bot")
    code, results, err = migrate_json(code_fleet, "--all", "--jobs", "3")
    assert code == 0, err
    assert {results[n]["status"] for n in names} == {"upgraded"}
    for name, code_name in zip(names, ("hello-bot", "chat-bot", "feishu-bot", "hello-bot")):
        owned = tables(pg, name)
        expected = CODES[code_name]
        if expected:
            assert expected <= set(owned), owned
        assert "alembic_version" in owned  # the version table lives in the bot's own database
        assert set(owned.values()) == {role_of(name)}, f"{name}: every object owned by the bot: {owned}"
        assert version(pg, name) == head(code_fleet, code_name.replace("-", "_"))
        assert results[name]["from_rev"] is None and results[name]["to_rev"] == version(pg, name)

    code, results, err = migrate_json(code_fleet, "--all")  # converges
    assert code == 0, err
    assert {results[n]["status"] for n in names} == {"up to date"}

    proc = code_fleet.run("current")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("at head") == len(names)


def test_add_bot_migrates_to_head_and_no_migrate_skips(code_fleet, pg):
    skipped = code_fleet.name("skip")
    proc = code_fleet.run("add-bot", skipped, "--code", "chat-bot", "--no-migrate")
    assert proc.returncode == 0, proc.stderr
    assert version(pg, skipped) is None and tables(pg, skipped) == {}

    name = code_fleet.name("chat")
    proc = code_fleet.run("add-bot", name, "--code", "chat-bot")
    assert proc.returncode == 0, proc.stderr
    assert "schema            upgraded: base -> " in proc.stdout
    assert version(pg, name) == head(code_fleet, "chat_bot")
    assert set(tables(pg, name).values()) == {role_of(name)}


def _write_revision(fleet, package: str, rev: str, down: str | None, body: str) -> None:
    path = fleet.root / "migrations" / package / "versions" / f"{rev}_test.py"
    upgrade = textwrap.indent(textwrap.dedent(body).strip() or "pass", "    ")
    path.write_text(
        f'"""test revision {rev}"""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n{upgrade}\n\n\ndef downgrade():\n    pass\n"
    )


def _clone_code(fleet, source: str, package: str) -> None:
    shutil.copytree(fleet.root / "bots" / source, fleet.root / "bots" / package)
    shutil.copytree(fleet.root / "migrations" / source, fleet.root / "migrations" / package)


def test_a_broken_migration_fails_alone_and_leaves_its_bot_unchanged(code_fleet, pg):
    _clone_code(code_fleet, "hello_bot", "broken_bot")
    base_rev = head(code_fleet, "broken_bot")
    # Creates a table, then fails: the table must not survive (transactional DDL).
    _write_revision(code_fleet, "broken_bot", "b0rken000001", base_rev, """
        op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
        op.execute("SELECT no_such_function()")
    """)
    good = add_code_bots(code_fleet, "hello-bot", "chat-bot")
    broken = code_fleet.name("broken")
    proc = code_fleet.run("add-bot", broken, "--code", "broken-bot")
    assert proc.returncode == 1
    assert "provisioned but its migrations failed" in proc.stderr and "b0rken000001" in proc.stderr
    assert version(pg, broken) is None and tables(pg, broken) == {}

    code, results, err = migrate_json(code_fleet, "--all", "--jobs", "2")
    assert code == 1
    for name in good:
        assert results[name]["status"] == "upgraded", err
    failure = results[broken]
    assert failure["status"] == "failed"
    for part in (broken, "revision b0rken000001", "test revision b0rken000001", "no_such_function", "still at base"):
        assert part in failure["error"], failure["error"]
    assert version(pg, broken) is None and "half_done" not in tables(pg, broken)

    # Now from a migrated state: the failing step rolls back to the previous revision.
    (code_fleet.root / "migrations" / "broken_bot" / "versions" / "b0rken000001_test.py").rename(
        code_fleet.root / "b0rken.py.off")
    assert code_fleet.run("migrate", broken).returncode == 0
    assert version(pg, broken) == base_rev
    (code_fleet.root / "b0rken.py.off").rename(code_fleet.root / "migrations" / "broken_bot" / "versions" / "b0rken000001_test.py")
    proc = code_fleet.run("migrate", broken)
    assert proc.returncode == 1 and f"still at {base_rev}" in proc.stderr
    assert version(pg, broken) == base_rev and "half_done" not in tables(pg, broken)
    assert tables(pg, broken).keys() == {"alembic_version", "users"}


def test_concurrent_migrators_of_one_bot_never_interleave(code_fleet, pg):
    (name,) = add_code_bots(code_fleet, "chat-bot")
    # Someone else holds the bot's migration lock.
    with pg.connect(db_of(name)) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (MIGRATION_LOCK_SPACE, lock_key(db_of(name))))
        proc = code_fleet.run("migrate", name, "--lock-wait", "0")
        assert proc.returncode == 1 and "is being migrated by another process right now" in proc.stderr
        proc = code_fleet.run("migrate", name, "--lock-wait", "1")
        assert proc.returncode == 1 and "gave up waiting" in proc.stderr
        assert version(pg, name) is None
    # Two real migrators at once: one upgrades, the other waits and finds it done.
    procs = [subprocess.Popen([PROVISION, "migrate", name, "--json"],
                              env=code_fleet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    statuses = sorted(json.loads(out)[0]["status"] for out, _ in outputs)
    assert statuses == ["up to date", "upgraded"]
    assert version(pg, name) == head(code_fleet, "chat_bot")


def test_a_lock_wait_longer_than_the_roles_statement_timeout_is_waited_in_full(code_fleet, pg):
    """The wait for the bot's migration lock is --lock-wait's: the role's own statement_timeout
    (1s here) neither ends it early nor limits the migration."""
    import threading

    name = code_fleet.name("patient")
    code_fleet.add(name, "--code", "chat-bot", "--no-migrate", "--statement-timeout", "1s")
    holder = pg.connect(db_of(name))
    holder.execute("SELECT pg_advisory_lock(%s, %s)", (MIGRATION_LOCK_SPACE, lock_key(db_of(name))))
    release = threading.Timer(3.0, holder.close)  # the other migrator finishes after 3 s
    release.start()
    try:
        proc = code_fleet.run("migrate", name, "--lock-wait", "30")
    finally:
        release.join()
    assert proc.returncode == 0, proc.stderr
    assert version(pg, name) == head(code_fleet, "chat_bot")


def test_downgrade_asks_backs_up_and_reupgrades(code_fleet, pg):
    (name,) = add_code_bots(code_fleet, "chat-bot", migrate=True)
    with psycopg.connect(with_database(pg.url, db_of(name), pin=False), autocommit=True) as conn:
        conn.execute(f"SET ROLE {role_of(name)}")
        conn.execute("INSERT INTO conversations (id, title) VALUES ('c1', 'kept in the backup')")
    before = tree(code_fleet.root)
    proc = code_fleet.run("downgrade", name, "base")  # no tty, no --yes
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert tree(code_fleet.root) == before and version(pg, name) is not None

    proc = code_fleet.run("downgrade", name, "base", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert version(pg, name) is None
    assert set(tables(pg, name)) == {"alembic_version"}
    dumps = list((code_fleet.root / "backups" / name).glob("*.dump"))
    assert len(dumps) == 1 and dumps[0].stat().st_size > 0

    proc = code_fleet.run("migrate", name)
    assert proc.returncode == 0, proc.stderr
    assert {"conversations", "messages"} <= set(tables(pg, name))


def test_check_catches_a_model_change_without_a_migration(code_fleet, pg):
    _clone_code(code_fleet, "hello_bot", "drift_bot")
    (name,) = add_code_bots(code_fleet, "drift-bot", migrate=True)
    proc = code_fleet.run("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    models = code_fleet.root / "bots" / "drift_bot" / "models.py"
    models.write_text(models.read_text().replace(
        "    language_code: Mapped[str | None] = mapped_column(String(10))\n",
        "    language_code: Mapped[str | None] = mapped_column(String(10))\n"
        "    bio: Mapped[str | None] = mapped_column(String(500))\n"))
    proc = code_fleet.run("check")
    assert proc.returncode == 1
    assert "code drift_bot: models differ from migrations: add_column users bio" in proc.stdout
    assert "provision revision drift_bot" in proc.stdout

    proc = code_fleet.run("revision", "drift-bot", "-m", "add users.bio", "--autogenerate")
    assert proc.returncode == 0, proc.stderr
    written = list((code_fleet.root / "migrations" / "drift_bot" / "versions").glob("*add_users_bio.py"))
    assert len(written) == 1 and "op.add_column('users'" in written[0].read_text()
    proc = code_fleet.run("check")  # models match again, but the bot is behind
    assert proc.returncode == 1 and f"bot {name}: database at" in proc.stdout
    assert code_fleet.run("migrate", name).returncode == 0
    proc = code_fleet.run("check")
    assert proc.returncode == 0, proc.stdout
    proc = code_fleet.run("revision", "drift-bot", "-m", "nothing", "--autogenerate")
    assert proc.returncode == 0 and "no revision written" in proc.stdout
    with pg.connect() as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'botfleet_scratch_%'").fetchone()[0]
    assert left == 0, "scratch databases are dropped"


def test_new_bot_scaffold_provisions_and_migrates(code_fleet, pg):
    code = f"weather{code_fleet.name('w')[1:7]}"  # a code name unique to this run
    proc = code_fleet.run("new-bot", code)
    assert proc.returncode == 0, proc.stderr
    package = code_fleet.root / "bots" / code
    assert {p.name for p in package.iterdir()} >= {"__init__.py", "models.py", "repository.py", "__main__.py"}
    assert f"[{code}]" in (code_fleet.root / "migrations" / "alembic.ini").read_text()
    again = code_fleet.run("new-bot", code)
    assert again.returncode == 0 and "already scaffolded" in again.stdout

    instance = code_fleet.name("wx")
    proc = code_fleet.run("add-bot", instance, "--code", code, *reachable(pg))
    assert proc.returncode == 0, proc.stderr
    assert tables(pg, instance) == {"alembic_version": role_of(instance), "notes": role_of(instance)}
    proc = code_fleet.run("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The scaffolded bot runs against its database, as its role.
    env = {**code_fleet.env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(code_fleet.root), os.environ.get("PYTHONPATH")]))}
    script = textwrap.dedent(f"""
        import asyncio
        from provisioning.envfile import EnvFile
        from shared import Database
        from bots.{code}.repository import NoteRepository

        async def main():
            db = Database.from_env("{code}", env=EnvFile.read(__import__("pathlib").Path("{code_fleet.env_file(instance)}")).values)
            async with db.unit_of_work() as s:
                await NoteRepository(s).put("k", "v")
            async with db.unit_of_work() as s:
                print((await NoteRepository(s).get("k")).value)
            await db.dispose()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=code_fleet.root)
    assert out.returncode == 0 and out.stdout.strip() == "v", out.stderr[-500:]


def reachable(pg) -> list[str]:
    """add-bot options that make the bot's DATABASE_URL reach the test server from here."""
    from provisioning.db import parse_url

    if pg.embedded is not None:
        return ["--db-host", "127.0.0.1", "--db-port", str(pg.embedded.status().port)]
    params = parse_url(pg.url)
    return ["--db-host", params.get("host") or "127.0.0.1", "--db-port", params.get("port") or "5432"]


@pytest.mark.parametrize("hostile", ["Bad", "1bot", "x" * 41, "a b", "postgres", "hello;drop"])
def test_new_bot_refuses_bad_names_and_writes_nothing(code_fleet, hostile):
    before = tree(code_fleet.root)
    proc = code_fleet.run("new-bot", hostile)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert tree(code_fleet.root) == before


def test_clear_errors_and_no_change(code_fleet, pg, admin):
    proc = code_fleet.run("migrate", "no-such-bot")
    assert proc.returncode == 2 and "not in the fleet registry: no-such-bot" in proc.stderr
    assert code_fleet.run("migrate").returncode == 2  # neither names nor --all

    # A bot whose code has no migrations: an error when named, a note under --all.
    shutil.copytree(code_fleet.root / "bots" / "hello_bot", code_fleet.root / "bots" / "bare_bot")
    (bare,) = add_code_bots(code_fleet, "bare-bot")
    proc = code_fleet.run("migrate", bare)
    assert proc.returncode == 1 and "has no migrations" in proc.stderr
    code, results, _ = migrate_json(code_fleet, "--all")
    assert code == 0 and results[bare]["status"] == "skipped"

    # Multiple heads.
    _clone_code(code_fleet, "hello_bot", "forked_bot")
    base_rev = head(code_fleet, "forked_bot")
    for rev in ("f0000000000a", "f0000000000b"):
        _write_revision(code_fleet, "forked_bot", rev, base_rev, "pass")
    (forked,) = add_code_bots(code_fleet, "forked-bot")
    proc = code_fleet.run("migrate", forked)
    assert proc.returncode == 1 and "has 2 heads (f0000000000a, f0000000000b)" in proc.stderr
    assert version(pg, forked) is None

    # A database ahead of the scripts.
    (ahead,) = add_code_bots(code_fleet, "hello-bot", migrate=True)
    with pg.connect(db_of(ahead)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'fffffffffff0'")
    snap = snapshot(admin)
    proc = code_fleet.run("migrate", ahead)
    assert proc.returncode == 1 and "at revision fffffffffff0, which code hello_bot's migrations do not know" in proc.stderr
    assert version(pg, ahead) == "fffffffffff0" and snapshot(admin) == snap


def test_sql_prints_the_ddl_and_changes_nothing(code_fleet, pg):
    (name,) = add_code_bots(code_fleet, "chat-bot")
    proc = code_fleet.run("migrate", name, "--sql")
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE conversations" in proc.stdout and "INSERT INTO alembic_version" in proc.stdout
    assert version(pg, name) is None and tables(pg, name) == {}


def test_project_path_with_percent_sign(pg, tmp_path):
    """`%` breaks ConfigParser interpolation: paths are escaped, URLs never go through ini options."""
    from .conftest import REPO, Fleet, drop_bot_objects

    root = tmp_path / "100%project"
    root.mkdir()
    for folder in ("bots", "migrations"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    fleet = Fleet(pg, root)
    try:
        (name,) = add_code_bots(fleet, "hello-bot", migrate=True)
        assert version(pg, name) == head(fleet, "hello_bot")
    finally:
        with pg.connect() as conn:
            drop_bot_objects(conn, fleet.names)


def test_plain_alembic_with_the_shared_env_on_sqlite(tmp_path):
    """The shell-loop path: `alembic -n <code> upgrade head` with DATABASE_URL (env.py runs asyncio itself)."""
    db = tmp_path / "dev.sqlite"
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{db}"}
    alembic = str(__import__("pathlib").Path(sys.executable).with_name("alembic"))
    from .conftest import REPO

    proc = subprocess.run([alembic, "-c", str(REPO / "migrations" / "alembic.ini"), "-n", "chat_bot", "upgrade", "head"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import sqlite3

    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "file_metadata", "alembic_version"} <= names


def _sessions(pg, database: str, at_least: int = 0) -> int:
    """pg_stat_database.sessions (PostgreSQL 14+): how many sessions ever opened ``database``,
    once the ones that ended have reported (a backend reports as it exits)."""
    import time

    deadline = time.monotonic() + 10
    with pg.connect("postgres") as conn:
        conn.autocommit = True
        while True:
            n = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()[0]
            if n >= at_least or time.monotonic() > deadline:
                time.sleep(0.3)  # and nothing more trickles in
                return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s",
                                    (database,)).fetchone()[0]
            time.sleep(0.05)


def test_a_bot_costs_one_connection_and_one_at_head_costs_no_engine(code_fleet, pg):
    """The migrator opens ONE connection per bot: a bot at head is answered by one plain query on
    it (no SQLAlchemy engine, no migration context), a bot behind is migrated on that same one."""
    (name,) = add_code_bots(code_fleet, "chat-bot")
    script = textwrap.dedent("""
        import json, os, sys
        from pathlib import Path
        from provisioning.migrate import migrate_one, plan_targets
        from provisioning.project import Project
        targets, _ = plan_targets(Project(Path(os.environ["BOTFLEET_HOME"])), [sys.argv[1]], all_bots=False,
                                  admin_url=os.environ["ADMIN_DATABASE_URL"])
        outcome = migrate_one(targets[0])
        print(json.dumps({"status": outcome.status, "engine": "sqlalchemy.ext.asyncio" in sys.modules}))
    """)

    def migrate_one_in_a_new_process() -> dict:
        proc = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True,
                              env=code_fleet.env(), cwd=code_fleet.root, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    before = _sessions(pg, db_of(name))
    assert migrate_one_in_a_new_process() == {"status": "upgraded", "engine": True}
    assert _sessions(pg, db_of(name), before + 1) == before + 1
    assert version(pg, name) == head(code_fleet, "chat_bot")  # (a session of the test's own)
    before = _sessions(pg, db_of(name), before + 2)
    assert migrate_one_in_a_new_process() == {"status": "up to date", "engine": False}
    assert _sessions(pg, db_of(name), before + 1) == before + 1
