"""migrate's replay (issue 16): Alembic migrates the first bot of each code and records the SQL
it runs; the code's other bots that start where that one did run that SQL again, each in one
transaction under its own lock, as its own role. On a real PostgreSQL:

- the replayed bots get exactly the schema Alembic gives (tables, columns, indexes,
  constraints, owners) and its version stamp, and the JSON says which way each bot went;
- a migration that reads the database, whose SQL names the bot it ran for, or that runs outside
  the transaction (an autocommit block), is never replayed: every bot gets Alembic (and so its
  own, correct result);
- a bot starting at another revision gets Alembic; a replay that fails rolls back, names the
  revision and leaves the bot where it was; a replay waits for the bot's migration lock;
- ``--no-replay`` runs Alembic for every bot.
"""

from __future__ import annotations

import json
import subprocess

from provisioning.db import lock_key
from provisioning.migrate import MIGRATION_LOCK_SPACE

from .conftest import PROVISION
from .test_migrate import _clone_code, _write_revision, db_of, head, role_of, tables, version


def migrate(fleet, *args: str) -> tuple[int, dict[str, dict], str]:
    proc = fleet.run("migrate", *args, "--json")
    return proc.returncode, {o["bot"]: o for o in json.loads(proc.stdout or "[]")}, proc.stderr


def schema(pg, name: str) -> dict[str, list]:
    """Everything a migration makes in the bot's public schema, without the database's name."""
    with pg.connect(db_of(name)) as conn:
        def rows(query: str) -> list:
            return [tuple(r) for r in conn.execute(query).fetchall()]
        return {
            "columns": rows("SELECT table_name, column_name, data_type, is_nullable, column_default, "
                            "character_maximum_length FROM information_schema.columns "
                            "WHERE table_schema = 'public' ORDER BY 1, 2"),
            "indexes": rows("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"),
            "constraints": rows("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                                "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"),
            "comments": rows("SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
                             "WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1"),
            "versions": rows("SELECT version_num FROM alembic_version"),
        }


def add(fleet, stem: str, code: str, n: int) -> list[str]:
    names = []
    for _ in range(n):
        name = fleet.name(stem)
        fleet.add(name, "--code", code, "--no-migrate")
        names.append(name)
    return sorted(names)


def _two_step_code(fleet, package: str) -> tuple[str, str, str]:
    """A copy of hello-bot with two revisions on top of its own: (its base head, rev 1, rev 2)."""
    _clone_code(fleet, "hello_bot", package)
    base = head(fleet, package)
    _write_revision(fleet, package, f"{package[:6]}00001", base, """
        op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("body", sa.Text, nullable=False, server_default="it's 100%"))
        op.create_index("ix_notes_body", "notes", ["body"])
        op.bulk_insert(sa.table("notes", sa.column("id", sa.Integer), sa.column("body", sa.Text)),
                       [{"id": 1, "body": "first"}, {"id": 2, "body": "second"}])
    """)
    _write_revision(fleet, package, f"{package[:6]}00002", f"{package[:6]}00001", """
        op.add_column("users", sa.Column("nickname", sa.String(40)))
        op.execute("COMMENT ON TABLE notes IS 'made by revision 2'")
    """)
    return base, f"{package[:6]}00001", f"{package[:6]}00002"


def test_replayed_bots_get_alembics_schema_as_their_own_role(code_fleet, pg):
    _, _, top = _two_step_code(code_fleet, "replay_bot")
    steps = add(code_fleet, "steps", "replay-bot", 4)
    chats = add(code_fleet, "chat", "chat-bot", 3)
    code, results, err = migrate(code_fleet, "--all", "--jobs", "3")
    assert code == 0, err
    for group, package in ((steps, "replay_bot"), (chats, "chat_bot")):
        # the first bot of the code: Alembic; the others: its SQL again
        assert [results[n]["by"] for n in group] == ["alembic"] + ["replay"] * (len(group) - 1), results
        assert {results[n]["status"] for n in group} == {"upgraded"}
        want = schema(pg, group[0])
        assert want["versions"] == [(head(code_fleet, package),)]
        for name in group[1:]:
            assert schema(pg, name) == want, name
            assert set(tables(pg, name).values()) == {role_of(name)}, "every object owned by the bot itself"
            assert results[name]["applied"] == results[group[0]]["applied"]
            assert results[name]["from_rev"] is None and results[name]["to_rev"] == head(code_fleet, package)
    assert results[steps[0]]["applied"][-1] == top and len(results[steps[0]]["applied"]) == 3
    with pg.connect(db_of(steps[-1])) as conn:  # the bulk insert's rows, as the replay ran them
        assert conn.execute("SELECT id, body FROM notes ORDER BY id").fetchall() == [(1, "first"), (2, "second")]

    code, results, err = migrate(code_fleet, "--all")  # converges: nothing pending, nothing replayed
    assert code == 0, err
    assert {r["status"] for r in results.values()} == {"up to date"}


def test_a_migration_that_reads_names_its_bot_or_leaves_the_transaction_is_never_replayed(code_fleet, pg):
    _clone_code(code_fleet, "hello_bot", "reader_bot")
    base = head(code_fleet, "reader_bot")
    # Reads the database to decide: another database could decide otherwise.
    _write_revision(code_fleet, "reader_bot", "reader000001", base, """
        bind = op.get_bind()
        users = bind.exec_driver_sql("SELECT count(*) FROM users").scalar()
        op.create_table(f"t_{users}_users", sa.Column("id", sa.Integer, primary_key=True))
    """)
    _clone_code(code_fleet, "hello_bot", "namer_bot")
    base = head(code_fleet, "namer_bot")
    # Names the bot's own database (learnt from the driver, without a query).
    _write_revision(code_fleet, "namer_bot", "namer0000001", base, """
        dbname = op.get_bind().connection.driver_connection.info.dbname
        op.execute(f"COMMENT ON TABLE users IS '{dbname}'")
    """)
    _clone_code(code_fleet, "hello_bot", "outside_bot")
    base = head(code_fleet, "outside_bot")
    # Runs outside the transaction (an autocommit block): one transaction could not replay it.
    _write_revision(code_fleet, "outside_bot", "outside00001", base, """
        with op.get_context().autocommit_block():
            op.create_index("ix_users_username", "users", ["username"], postgresql_concurrently=True)
    """)
    readers = add(code_fleet, "reader", "reader-bot", 3)
    namers = add(code_fleet, "namer", "namer-bot", 3)
    outsiders = add(code_fleet, "outside", "outside-bot", 3)
    code, results, err = migrate(code_fleet, "--all", "--jobs", "2")
    assert code == 0, err
    assert {results[n]["by"] for n in readers + namers + outsiders} == {"alembic"}, results
    for name in outsiders:
        with pg.connect(db_of(name)) as conn:
            assert conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_users_username'").fetchone()
    for name in namers:
        with pg.connect(db_of(name)) as conn:
            comment = conn.execute("SELECT obj_description('users'::regclass, 'pg_class')").fetchone()[0]
        assert comment == db_of(name), "each bot's migration named its own database"
    for name in readers:
        assert "t_0_users" in tables(pg, name)


def test_a_bot_elsewhere_gets_alembic_and_a_failed_replay_changes_nothing(code_fleet, pg):
    base, first, top = _two_step_code(code_fleet, "mixed_bot")
    leader, ahead, blocked, plain = add(code_fleet, "mixed", "mixed-bot", 4)
    assert code_fleet.run("migrate", ahead, "--to", first).returncode == 0
    # Something the replay's CREATE TABLE collides with, made by the bot itself.
    with pg.connect(db_of(blocked)) as conn:
        conn.execute(f"SET ROLE {role_of(blocked)}")
        conn.execute("CREATE TABLE notes (x int)")
        conn.commit()
    code, results, err = migrate(code_fleet, "--all", "--jobs", "2")
    assert code == 1
    assert results[leader]["by"] == "alembic" and results[plain]["by"] == "replay"
    assert results[ahead]["by"] == "alembic" and results[ahead]["from_rev"] == first  # started elsewhere
    assert version(pg, ahead) == version(pg, plain) == version(pg, leader) == top
    failure = results[blocked]
    assert failure["status"] == "failed"
    for part in (blocked, "revision", first, "already exists", "rolled back, still at base"):
        assert part in failure["error"], failure["error"]
    assert version(pg, blocked) is None and set(tables(pg, blocked)) == {"notes"}, "nothing of the replay is left"
    with pg.connect(db_of(blocked)) as conn:
        conn.execute("DROP TABLE notes")
        conn.commit()
    code, results, err = migrate(code_fleet, "--all")
    assert code == 0 and results[blocked]["status"] == "upgraded" and version(pg, blocked) == top, err


def test_a_replay_takes_the_bots_migration_lock_and_no_replay_is_alembic_for_all(code_fleet, pg):
    names = add(code_fleet, "locked", "chat-bot", 3)
    with pg.connect(db_of(names[2])) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (MIGRATION_LOCK_SPACE, lock_key(db_of(names[2]))))
        code, results, err = migrate(code_fleet, "--all", "--jobs", "1", "--lock-wait", "0")
        assert code == 1
        assert [results[n]["by"] for n in names[:2]] == ["alembic", "replay"]
        assert "is being migrated by another process right now" in results[names[2]]["error"]
        assert version(pg, names[2]) is None
    more = add(code_fleet, "each", "chat-bot", 2)
    proc = subprocess.run([PROVISION, "migrate", "--all", "--no-replay", "--json"], env=code_fleet.env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {o["bot"]: o for o in json.loads(proc.stdout)}
    assert {results[n]["by"] for n in more + names[2:]} == {"alembic"}, results
    assert {version(pg, n) for n in names + more} == {head(code_fleet, "chat_bot")}
