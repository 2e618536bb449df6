"""A bot owns its database, so it may set that database's defaults for EVERY session there:
``ALTER DATABASE its_db SET search_path = evil, pg_catalog`` (CVE-2018-1058's class), or
``SET role = itself``. botfleet's admin sessions into a bot's database pin those at login
(db.PINNED_SETTINGS), so the bot's look-alikes of built-ins and of the tables botfleet reads
never run as the admin, and every command still gives its usual answer.

The trap: in schema ``evil`` functions and an operator named like built-ins botfleet's admin
queries call (pg_get_userbyid, acldefault, to_regclass, ``=`` on names) and a view named like
the version table botfleet reads (alembic_version), each recording ``current_user`` in a table
the bot owns before doing what the built-in does (so the bot's own sessions still work); a
plain bot's ``public.alembic_version`` is a view that records too.
"""

from __future__ import annotations

import json

import psycopg
from psycopg import sql

from provisioning.db import with_database

from .conftest import db, other_fleets, role

TRAP = """
CREATE SCHEMA evil;
CREATE TABLE public.trap_log (who text NOT NULL, what text NOT NULL);
CREATE FUNCTION evil.trap(text) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ INSERT INTO public.trap_log (who, what) VALUES (CURRENT_USER, $1); SELECT true $$;
CREATE FUNCTION evil.pg_get_userbyid(oid) RETURNS name LANGUAGE sql VOLATILE
    AS $$ SELECT evil.trap('pg_get_userbyid'); SELECT pg_catalog.pg_get_userbyid($1) $$;
CREATE FUNCTION evil.acldefault("char", oid) RETURNS aclitem[] LANGUAGE sql VOLATILE
    AS $$ SELECT evil.trap('acldefault'); SELECT pg_catalog.acldefault($1, $2) $$;
CREATE FUNCTION evil.to_regclass(text) RETURNS regclass LANGUAGE sql VOLATILE
    AS $$ SELECT evil.trap('to_regclass'); SELECT pg_catalog.to_regclass($1) $$;
CREATE FUNCTION evil.name_eq(name, name) RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT evil.trap('='); SELECT pg_catalog.nameeq($1, $2) $$;
CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.name_eq);
"""


def _as_bot(pg, name: str) -> psycopg.Connection:
    conn = pg.connect(db(name))
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role(name))))
    conn.execute("SET search_path = pg_catalog, pg_temp")  # this test's own statements name their schemas
    return conn


def _arm(pg, name: str, *, version_view: bool) -> None:
    """The bot's trap, made as the bot, then its database's default search_path."""
    with _as_bot(pg, name) as conn:
        conn.execute(TRAP)
        if version_view:  # named like the version table botfleet reads unqualified, shown first
            conn.execute("CREATE VIEW evil.alembic_version AS SELECT v.version_num "
                         "FROM public.alembic_version v WHERE evil.trap('evil.alembic_version')")
        else:  # no code: its public.alembic_version is the bot's view, not a table
            conn.execute("CREATE VIEW public.alembic_version AS SELECT 'cafe'::varchar(32) AS version_num "
                         "WHERE evil.trap('public.alembic_version')")
        conn.execute(sql.SQL("ALTER DATABASE {} SET search_path = evil, pg_catalog").format(sql.Identifier(db(name))))


def _rearm(pg, name: str) -> None:
    with _as_bot(pg, name) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET search_path = evil, pg_catalog").format(sql.Identifier(db(name))))


def _log(pg, name: str) -> list[tuple[str, str]]:
    with pg.connect(db(name)) as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        return conn.execute("SELECT who, what FROM public.trap_log ORDER BY 1, 2").fetchall()


def _not_the_bot(pg, name: str) -> list[tuple[str, str]]:
    return [(who, what) for who, what in _log(pg, name) if who != role(name)]


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_bots_search_path_trap_never_runs_as_the_admin(code_fleet, pg):
    coded, plain = code_fleet.name("trapc"), code_fleet.name("trapp")
    code_fleet.add(coded, "--code", "hello-bot")  # migrated: public.alembic_version at head
    code_fleet.add(plain)
    _ok(code_fleet.run("config", "set", coded, "BOT_TOKEN=not-a-real-token"))  # its code needs one
    with pg.connect(db(coded)) as conn:
        head = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()[0]
        # Something for doctor --fix to repair inside the database (as the admin, there): a
        # table the admin owns and schema public opened to PUBLIC.
        conn.execute("CREATE TABLE public.stray_by_admin (id int)")
        conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        # doctor reads inside a bot's database in its login as the bot, or, when it makes none
        # (here: an expiring password, a finding of its own), in the admin's: plain takes that path.
        conn.execute(sql.SQL("ALTER ROLE {} VALID UNTIL '2999-01-01'").format(sql.Identifier(role(plain))))
    _arm(pg, coded, version_view=True)
    _arm(pg, plain, version_view=False)

    # The trap works: an admin session that does not pin (as botfleet's were) runs the bot's code.
    with psycopg.connect(with_database(pg.url, db(coded), pin=False), autocommit=True) as unpinned:
        assert unpinned.execute("SELECT current_setting('search_path')").fetchone()[0] == "evil, pg_catalog"
        unpinned.execute("SELECT pg_get_userbyid(10)")
        assert _not_the_bot(pg, coded) == [("postgres", "pg_get_userbyid")]
        unpinned.execute("DELETE FROM public.trap_log")
    # ... and botfleet's (pinned) do not.
    with psycopg.connect(with_database(pg.url, db(coded)), autocommit=True) as pinned:
        assert pinned.execute("SELECT current_user, current_setting('search_path')").fetchone() == (
            "postgres", "pg_catalog,pg_temp")
        pinned.execute("SELECT pg_get_userbyid(10), to_regclass('alembic_version')")
    assert _not_the_bot(pg, coded) == []

    # plan: reads both databases (schema, revision): the open schema, the bot's database default
    # (reset), and no migration (the revision read is the real one, at head).
    reset = "database settings (search_path=evil, pg_catalog) reset"
    plan = json.loads(_ok(code_fleet.run("plan", "--json")))
    steps = {(s["action"], s["subject"]): sorted(s["details"]) for s in plan["steps"] if s["subject"] in (coded, plain)}
    assert steps[("update", coded)] == sorted(["revoke PUBLIC rights on schema public", reset]), steps
    assert reset in steps[("update", plain)] and len(steps) == 2, steps
    assert _not_the_bot(pg, coded) == [] and _not_the_bot(pg, plain) == []

    # doctor: finds what the admin did inside the database and the bot's database default ...
    proc = code_fleet.run("doctor", *other_fleets(), "--json")
    report = json.loads(proc.stdout)
    mine = [f for f in report["found"] if f["bot"] in (coded, plain)]
    assert any("stray_by_admin" in f["message"] and f["bot"] == coded for f in mine), mine
    assert any("expires" in f["message"] for f in mine if f["bot"] == plain), mine
    for name in (coded, plain):
        (setting,) = [f for f in mine if f["bot"] == name and f["check"] == "settings"]
        assert "search_path=evil, pg_catalog" in setting["message"] and setting["fixable"], setting
        assert setting["fix"] == f'ALTER DATABASE "{db(name)}" RESET ALL', setting
    # Not even as the bot: doctor's reads in its login as the bot are pinned too (the bot's
    # look-alikes would write doctor's report).
    assert _log(pg, coded) == [] and _log(pg, plain) == []
    # ... and --fix repairs them (inside the database, still armed: the database is reset last
    # or first, the repairs' sessions are pinned either way).
    fixed = code_fleet.run("doctor", *other_fleets(), "--fix", "--json")
    assert not [f for f in json.loads(fixed.stdout)["remaining"] if f["bot"] in (coded, plain)], fixed.stdout
    with pg.connect(db(coded)) as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'stray_by_admin'").fetchone()[0]
        assert owner == role(coded)
        assert conn.execute("SELECT has_schema_privilege('public', 'public', 'USAGE')").fetchone()[0] is False
        assert conn.execute("SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
                            "WHERE d.datname = ANY(%s)", ([db(coded), db(plain)],)).fetchone()[0] == 0
    again = json.loads(_ok(code_fleet.run("doctor", *other_fleets(), "--json")))
    assert not [f for f in again["found"] if f["bot"] in (coded, plain)], again
    assert _log(pg, coded) == [] and _log(pg, plain) == []

    # The bot sets it again; migrate: nothing pending (the bot reads its version through its
    # own search path, as itself); quota status.
    for name in (coded, plain):
        _rearm(pg, name)
    for args in ((coded,), ("--all",)):
        outcomes = {o["bot"]: o for o in json.loads(_ok(code_fleet.run("migrate", *args, "--json")))}
        assert outcomes[coded]["status"] == "up to date" and outcomes[coded]["to_rev"] == head, outcomes
    states = {r["bot"]: r for r in json.loads(_ok(code_fleet.run("quota", "status", "--json")))}
    assert states[coded]["size_bytes"] > 0 and states[plain]["size_bytes"] > 0
    assert _not_the_bot(pg, coded) == [] and _not_the_bot(pg, plain) == []

    # backup (pg_dump as the admin) and restore (the admin checks, the bot restores, the admin
    # locks the schema down and counts again).
    _ok(code_fleet.run("backup", coded))
    dumps = sorted((code_fleet.root / "backups" / coded).glob("*.dump"))
    assert dumps
    assert _not_the_bot(pg, coded) == []
    done = code_fleet.run("restore", coded, str(dumps[-1]), "--yes")
    assert done.returncode == 0, done.stderr
    assert _not_the_bot(pg, coded) == []
    with pg.connect(db(coded)) as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        assert conn.execute("SELECT version_num FROM public.alembic_version").fetchone()[0] == head
        assert conn.execute("SELECT to_regclass('evil.alembic_version') IS NOT NULL").fetchone()[0]  # restored too

    # apply and add-bot again: converge (the database default reset, the schema lock-down inside).
    applied = _ok(code_fleet.run("apply"))
    assert coded in applied and plain in applied, applied
    for name in (coded, plain):
        assert "already provisioned" in _ok(code_fleet.run("add-bot", name, "--no-migrate"))
    after = json.loads(_ok(code_fleet.run("plan", "--json")))
    assert [s for s in after["steps"] if s["subject"] in (coded, plain)] == []
    assert _not_the_bot(pg, coded) == [] and _not_the_bot(pg, plain) == []


def test_a_bots_database_defaults_do_not_make_the_admin_the_bot_or_read_only(fleet, pg):
    name = fleet.name("defaults")
    fleet.add(name)
    with _as_bot(pg, name) as conn:
        ident = sql.Identifier(db(name))
        conn.execute(sql.SQL("ALTER DATABASE {} SET role = {}").format(ident, sql.Identifier(role(name))))
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(ident))
    with psycopg.connect(with_database(pg.url, db(name), pin=False), autocommit=True) as unpinned:
        assert unpinned.execute("SELECT current_user, current_setting('transaction_read_only')").fetchone() == (
            role(name), "on")
    with psycopg.connect(with_database(pg.url, db(name)), autocommit=True) as pinned:
        assert pinned.execute("SELECT current_user, current_setting('transaction_read_only')").fetchone() == (
            "postgres", "off")
    with pg.connect(db(name)) as conn:  # an admin's hand: schema public opened to PUBLIC
        conn.execute("SET ROLE NONE")
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
    found = json.loads(fleet.run("doctor", *other_fleets(), "--json").stdout)["found"]
    assert [f["check"] for f in found if f["bot"] == name and f["check"] == "settings"] == ["settings"], found
    fixed = fleet.run("doctor", *other_fleets(), "--fix", "--json")
    assert not [f for f in json.loads(fixed.stdout)["remaining"] if f["bot"] == name], fixed.stdout
    with psycopg.connect(with_database(pg.url, db(name)), autocommit=True) as pinned:
        assert pinned.execute("SELECT has_schema_privilege('public', 'public', 'USAGE')").fetchone()[0] is False
    assert "already provisioned" in _ok(fleet.run("add-bot", name))


def test_the_pins_follow_the_admin_urls_own_options_and_reach_the_tools():
    from provisioning.db import PINNED_OPTIONS, as_role, libpq_env, parse_url, pinned

    url = "postgresql://admin@db.example:5433/postgres?options=-c%20statement_timeout%3D5s"
    options = parse_url(with_database(url, "bot_db"))["options"]
    assert options == f"-c statement_timeout=5s {PINNED_OPTIONS}"  # the admin's own first, the pins win
    assert pinned(parse_url(with_database(url, "bot_db"))) == parse_url(with_database(url, "bot_db"))  # once
    assert "options" not in parse_url(with_database(url.split("?")[0], "scratch", pin=False))
    acting = parse_url(with_database("postgresql://admin@db.example/postgres?options=-c%20role%3Ddba", "bot_db"))
    assert acting["options"].startswith("-c role=dba ") and "role=none" not in acting["options"]
    # pg_dump and psql --admin into a bot's database get them through PGOPTIONS; a bot's own do not.
    assert libpq_env(url.split("?")[0], "bot_db")["PGOPTIONS"] == PINNED_OPTIONS
    bot = as_role(url.split("?")[0], "bot_user", "secret", "bot_db")
    assert "search_path" not in libpq_env(bot).get("PGOPTIONS", "")
