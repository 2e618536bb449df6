"""Fleet operations on a real PostgreSQL: backup/restore round trips, password rotation
(on a cluster that checks SCRAM passwords), and doctor against deliberately broken setups."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess

import psycopg
import pytest
from psycopg import sql

from provisioning import objects
from provisioning.backup import find_tool

from .conftest import RUN_ID, assert_matches_server, assert_no_leak, assert_same_secret, other_fleets, snapshot


def stem(name: str) -> str:
    return name.replace("-", "_")


def db(name: str) -> str:
    return f"{stem(name)}_db"


def role(name: str) -> str:
    return f"{stem(name)}_user"


def as_bot(pg, name: str) -> psycopg.Connection:
    """A connection to the bot's database acting as the bot's role (objects it creates are the bot's)."""
    conn = pg.connect(db(name))
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role(name))))
    return conn


def fill(pg, name: str) -> None:
    """Tables with awkward data, a sequence, an identity, a view, a function and a grant, as the bot."""
    with as_bot(pg, name) as conn:
        conn.execute("""
            CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text, data jsonb,
                                blob bytea, amount numeric(12, 2), at timestamptz);
            INSERT INTO notes (body, data, blob, amount, at)
              SELECT md5(g::text), jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g % 7)),
                     decode(md5(g::text), 'hex'), g * 1.25, '2024-01-01 00:00+00'::timestamptz + g * interval '1 minute'
              FROM generate_series(1, 5000) g;
            INSERT INTO notes (body) VALUES (NULL), (E'quote '' backslash \\\\ tab \\t newline \\n'), ('ünïcødé ✓');
            CREATE SCHEMA app;
            CREATE TABLE app.users (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
            INSERT INTO app.users (name) SELECT 'user' || g FROM generate_series(1, 1000) g;
            CREATE TABLE app.events (user_id int REFERENCES app.users, kind text);
            INSERT INTO app.events SELECT 1 + g % 1000, 'kind' || (g % 5) FROM generate_series(1, 3000) g;
            CREATE VIEW app.user_events AS SELECT u.name, count(*) AS n FROM app.users u JOIN app.events e ON e.user_id = u.id GROUP BY 1;
            CREATE FUNCTION app.double(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT x * 2';
            GRANT SELECT ON notes TO PUBLIC;
        """)


TABLES = (("public", "notes"), ("app", "users"), ("app", "events"))


def fingerprint(pg, name: str) -> dict:
    """Row count and a checksum of every row of every table, plus sequence positions, read as the bot."""
    out = {}
    with as_bot(pg, name) as conn:
        for schema, table in TABLES:
            out[f"{schema}.{table}"] = conn.execute(
                sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t")
                .format(sql.Identifier(schema, table))).fetchone()
        out["app.users_id_seq"] = conn.execute("SELECT last_value, is_called FROM app.users_id_seq").fetchone()
        out["view"] = conn.execute("SELECT sum(n) FROM app.user_events").fetchone()
        out["function"] = conn.execute("SELECT app.double(21)").fetchone()
    return out


def backup(fleet, *args: str) -> list[dict]:
    proc = fleet.run("backup", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def dumps(fleet, name: str) -> list:
    return sorted((fleet.root / "backups" / name).glob("*.dump"))


# --- backup ------------------------------------------------------------------------------------

def test_backup_writes_sorted_private_checksummed_dumps_and_prunes_only_its_own(fleet, admin):
    a, b = fleet.name("bk-a"), fleet.name("bk-b")
    fleet.add(a)
    fleet.add(b)
    proc = fleet.run("backup", a, b)
    assert proc.returncode == 0, proc.stderr
    assert f"[1/2] {a}" in proc.stderr and f"[2/2] {b}" in proc.stderr  # progress per bot
    for name in (a, b):
        (path,) = dumps(fleet, name)
        assert path.name.startswith(f"{name}-") and path.name in proc.stdout
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        side = path.with_name(path.name + ".sha256")
        assert stat.S_IMODE(side.stat().st_mode) == 0o600
        assert side.read_text().split() == [hashlib.sha256(path.read_bytes()).hexdigest(), path.name]
        restore = find_tool("pg_restore", admin.info.server_version // 10000, hint="")
        subprocess.run([str(restore), "--list", str(path)], check=True, capture_output=True)

    backup(fleet, a)
    backup(fleet, a)
    made = dumps(fleet, a)
    assert len(made) == 3 and made == sorted(made, key=lambda p: p.stat().st_mtime_ns)  # names sort by time
    # Files botfleet did not write (or did not finish) are never pruned.
    folder = fleet.root / "backups" / a
    foreign = [folder / "keep-me.dump", folder / "notes.txt", folder / f"{a}-20000101T000000000000Z.dump"]
    for path in foreign:
        path.write_text("mine")

    out = backup(fleet, a, "--keep", "2")
    assert len(out) == 1 and out[0]["status"] == "written"
    assert sorted(out[0]["pruned"]) == [str(p) for p in made[:2]]
    left = [p for p in dumps(fleet, a) if p not in foreign]
    assert left == [made[2], folder / out[0]["path"].rsplit("/", 1)[1]]
    assert all(p.exists() for p in foreign)
    assert not any(folder.glob(f"{made[0].name}.sha256"))
    assert len(dumps(fleet, b)) == 1  # another bot's backups are not touched


def test_backup_refuses_bad_input_and_changes_nothing(fleet):
    name = fleet.name("bk-bad")
    fleet.add(name)
    for args, needle in (((), "--all"), ((name, "--all"), "--all"), (("nope-bot",), "not in the fleet registry"),
                         (("Bad_Name",), "invalid bot name"), ((name, "--keep", "0"), "--keep")):
        proc = fleet.run("backup", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0]
    assert not (fleet.root / "backups").exists()


def test_one_failed_backup_does_not_stop_the_others(fleet, admin):
    a, b = fleet.name("bk-fail"), fleet.name("bk-ok")
    fleet.add(a)
    fleet.add(b)
    admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(db(a))))
    proc = fleet.run("backup", "--all")
    assert proc.returncode == 1
    assert any(line.startswith(f"error: {a}: pg_dump of {db(a)} failed") for line in proc.stderr.splitlines())
    assert not dumps(fleet, a) and not list((fleet.root / "backups" / a).glob("*"))  # no partial file
    assert len(dumps(fleet, b)) == 1


# --- restore -----------------------------------------------------------------------------------

def test_restore_round_trip_preserves_every_row_as_the_bots_own_objects(fleet, pg):
    src, dst = fleet.name("rs-src"), fleet.name("rs-dst")
    fleet.add(src)
    fleet.add(dst)
    fill(pg, src)
    before = fingerprint(pg, src)
    assert before["public.notes"][0] == 5003 and before["app.events"][0] == 3000
    (made,) = backup(fleet, src)

    # another bot's dump: its rows would become dst's; refused unless the operator names its bot
    refused = fleet.run("restore", dst, made["path"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr
    assert f"is a dump of database {db(src)}, not of {db(dst)}" in errors[0] and "--from-bot" in errors[0]
    with pg.connect(db(dst)) as conn:
        assert objects.content(objects.inventory(conn)) == [], "a refused restore changes nothing"
    wrong = fleet.run("restore", dst, made["path"], "--from-bot", dst)
    assert wrong.returncode == 2 and f"--from-bot {dst} names database {db(dst)}" in wrong.stderr

    proc = fleet.run("restore", dst, made["path"], "--from-bot", src)
    assert proc.returncode == 0, proc.stderr
    assert "checksum verified" in proc.stdout
    assert fingerprint(pg, dst) == before
    with pg.connect(db(dst)) as conn:
        inventory = objects.inventory(conn)
        assert sorted(map(str, objects.content(inventory))) == [
            "routine app.double(x integer)", "schema app", "table app.events", "table app.users", "table public.notes",
            "view app.user_events"]
        assert objects.not_owned_by(inventory, role(dst)) == []  # every object is the bot's
        granted = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('public', 'app') AND c.relacl IS NOT NULL").fetchall()
        assert granted == []  # the source's GRANT ... TO PUBLIC did not come along
    for name in (src, dst):
        assert fleet.password(name)
        assert_no_leak(fleet.password(name), proc.stdout, proc.stderr)


def test_restore_into_a_non_empty_database_needs_yes_and_backs_it_up_first(fleet, pg, admin):
    name = fleet.name("rs-over")
    fleet.add(name)
    fill(pg, name)
    original = fingerprint(pg, name)
    (made,) = backup(fleet, name)
    with as_bot(pg, name) as conn:
        conn.execute("DELETE FROM app.events WHERE kind = 'kind1'")
        conn.execute("INSERT INTO notes (body) VALUES ('written after the backup')")
        conn.execute("CREATE TABLE extra (id int)")
    changed = fingerprint(pg, name)
    assert changed != original

    for args in ((), ("--no-checksum",)):
        proc = fleet.run("restore", name, made["path"], *args)  # no terminal: refused
        assert proc.returncode == 2 and "--yes" in proc.stderr and "not empty" in proc.stderr
    assert fingerprint(pg, name) == changed and len(dumps(fleet, name)) == 1

    proc = fleet.run("restore", name, made["path"], "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert fingerprint(pg, name) == original
    with pg.connect(db(name)) as conn:
        assert conn.execute("SELECT to_regclass('public.extra')").fetchone()[0] is None  # exactly the backup
        assert objects.not_owned_by(objects.inventory(conn), role(name)) == []
    # What was replaced is in a backup of its own, which restores the changed state.
    safety = out["safety_backup"]
    assert safety and safety != made["path"] and "table public.extra" in out["replaced"]
    assert fleet.run("restore", name, safety, "--yes").returncode == 0
    assert fingerprint(pg, name) == changed


def test_restore_verifies_the_file_before_touching_anything(fleet, pg, admin, tmp_path):
    name = fleet.name("rs-bad")
    fleet.add(name)
    fill(pg, name)
    (made,) = backup(fleet, name)
    target = fleet.name("rs-tgt")
    fleet.add(target)
    before = snapshot(admin)

    damaged = tmp_path / "damaged.dump"
    data = bytearray(open(made["path"], "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / "damaged.dump.sha256").write_text(open(made["path"] + ".sha256").read())
    unchecked = tmp_path / "copy.dump"
    unchecked.write_bytes(open(made["path"], "rb").read())
    garbage = tmp_path / "garbage.dump"
    garbage.write_text("not a dump at all\n")
    (tmp_path / "garbage.dump.sha256").write_text(hashlib.sha256(garbage.read_bytes()).hexdigest() + "  garbage.dump\n")

    cases = [
        ((target, str(damaged)), "does not match its checksum"),
        ((target, str(unchecked)), "no checksum beside it"),
        ((target, str(garbage)), "not a pg_dump archive"),
        ((target, str(tmp_path / "missing.dump")), "no such backup file"),
        (("nope-bot", made["path"]), "not in the fleet registry"),
        (("Bad_Name", made["path"]), "invalid bot name"),
    ]
    for args, needle in cases:
        proc = fleet.run("restore", *args, "--yes")
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], errors
    with pg.connect(db(target)) as conn:
        assert objects.content(objects.inventory(conn)) == []
    assert snapshot(admin) == before
    assert not (fleet.root / "backups" / target).exists()

    # A dump without a checksum is accepted when the operator says so.
    proc = fleet.run("restore", target, str(unchecked), "--no-checksum", "--from-bot", name)
    assert proc.returncode == 0, proc.stderr
    assert fingerprint(pg, target) == fingerprint(pg, name)


def test_a_failed_restore_leaves_the_database_as_it_was(fleet, pg, admin):
    """An event trigger in the source cannot be created by a bot: the one transaction rolls back,
    including the DROP of the bot's objects that replacing began with."""
    src, dst = fleet.name("rs-evt"), fleet.name("rs-keep")
    fleet.add(src)
    fleet.add(dst)
    fill(pg, src)
    fill(pg, dst)
    with as_bot(pg, dst) as conn:
        conn.execute("INSERT INTO notes (body) VALUES ('only in dst')")
    kept = fingerprint(pg, dst)
    with pg.connect(db(src)) as conn:
        conn.execute("CREATE FUNCTION public.on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END'")
        conn.execute("CREATE EVENT TRIGGER on_ddl ON ddl_command_end EXECUTE FUNCTION public.on_ddl()")
    (made,) = backup(fleet, src)

    proc = fleet.run("restore", dst, made["path"], "--yes", "--from-bot", src)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "event trigger" in errors[0] and "left as it was" in errors[0]
    assert fingerprint(pg, dst) == kept
    with pg.connect(db(dst)) as conn:
        assert objects.not_owned_by(objects.inventory(conn), role(dst)) == []
    assert len(dumps(fleet, dst)) == 1 and str(dumps(fleet, dst)[0]) in errors[0]  # the backup taken first


# --- rotate-password ---------------------------------------------------------------------------

def _dsn(fleet, name, password):
    port = fleet.server.embedded.status().port
    return f"postgresql://{role(name)}:{password}@127.0.0.1:{port}/{db(name)}"


def test_rotate_password_old_refused_new_works_open_sessions_survive(scram_fleet):
    fleet = scram_fleet
    name = fleet.name("rot")
    port = str(fleet.server.embedded.status().port)
    fleet.add(name, "--db-host", "127.0.0.1", "--db-port", port)
    old = fleet.password(name)
    session = psycopg.connect(_dsn(fleet, name, old), autocommit=True)  # a running bot's pooled connection
    try:
        proc = fleet.run("rotate-password", name)
        assert proc.returncode == 0, proc.stderr
        new = fleet.password(name)
        assert_same_secret(old, new, same=False)
        assert f"docker compose up -d --force-recreate {name}" in proc.stdout.splitlines()[-1]
        assert stat.S_IMODE(fleet.env_file(name).stat().st_mode) == 0o600
        assert not list(fleet.env_file(name).parent.glob(".*.tmp"))  # written atomically, nothing left over
        for secret in (old, new):
            assert_no_leak(secret, proc.stdout, proc.stderr)

        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(_dsn(fleet, name, old))
        with psycopg.connect(_dsn(fleet, name, new)) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == role(name)
        assert session.execute("SELECT 1").fetchone() == (1,)  # existing sessions keep working
        # The env file's URL is the one a bot uses, with the new password.
        url = next(line.split("=", 1)[1] for line in fleet.env_file(name).read_text().splitlines()
                   if line.startswith("DATABASE_URL="))
        with psycopg.connect(url.replace("postgresql+asyncpg://", "postgresql://")) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == db(name)
    finally:
        session.close()


def test_rotate_all_and_refusals(fleet, admin):
    a, b = fleet.name("rot-a"), fleet.name("rot-b")
    fleet.add(a)
    fleet.add(b)
    before = {n: fleet.password(n) for n in (a, b)}
    for args, needle in (((), "--all"), (("nope-bot",), "not in the fleet registry"), ((a, "Bad_Name"), "invalid bot name")):
        proc = fleet.run("rotate-password", *args)
        assert proc.returncode == 2 and needle in proc.stderr
    assert {n: fleet.password(n) for n in (a, b)} == before

    proc = fleet.run("rotate-password", "--all", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(r["bot"] for r in out["rotated"]) == sorted([a, b])
    assert out["recreate"] == f"docker compose up -d --force-recreate {' '.join(sorted([a, b]))}"
    for name in (a, b):
        new = fleet.password(name)
        assert_same_secret(before[name], new, same=False)
        verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role(name),)).fetchone()[0]
        assert_matches_server(new, verifier)
        assert_no_leak(new, proc.stdout, proc.stderr)

    # A bot whose role is gone is not recreated by a rotation.
    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db(a))))
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role(a))))
    proc = fleet.run("rotate-password", a)
    assert proc.returncode == 1 and "provision add-bot" in proc.stderr
    assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role(a),)).fetchone() is None


# --- doctor ------------------------------------------------------------------------------------

def doctor(fleet, *args: str) -> tuple[int, dict, subprocess.CompletedProcess]:
    proc = fleet.run("doctor", *other_fleets(), *args, "--json")
    return proc.returncode, json.loads(proc.stdout), proc


def test_doctor_finds_deliberately_broken_setups_and_fix_repairs_them(fleet, pg, admin):
    a, b, stray = fleet.name("doc-a"), fleet.name("doc-b"), fleet.name("doc-stray")
    fleet.add(a)
    fleet.add(b)
    assert doctor(fleet)[0] == 0, doctor(fleet)[1]

    ident = sql.Identifier
    admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(ident(db(a))))
    admin.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(ident(role(a))))
    admin.execute(sql.SQL("GRANT {} TO {}").format(ident(role(b)), ident(role(a))))
    admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(db(a)), ident(role(b))))
    admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 50").format(ident(role(b))))
    admin.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = 0").format(ident(role(b))))
    with pg.connect(db(a)) as conn:
        conn.execute("CREATE TABLE admin_owned (id int)")  # owned by the admin, not the bot
        conn.execute("CREATE SCHEMA admin_schema")
    fleet.env_file(a).chmod(0o644)
    # a stray bot (as botfleet leaves one: its marked role owns its marked database), not in the registry
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident(role(stray))))
    admin.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident(role(stray)), sql.Literal(f"botfleet bot {stray}")))
    admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident(db(stray)), ident(role(stray))))
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident(db(stray)), sql.Literal(f"botfleet bot {stray}")))

    code, report, proc = doctor(fleet)
    assert code == 1
    found = {(f["check"], f["bot"], f["message"]): f for f in report["found"]}
    expected = [
        ("access", a, f"PUBLIC (every role) has CONNECT on database {db(a)}", f'REVOKE ALL ON DATABASE "{db(a)}" FROM PUBLIC'),
        ("attributes", a, f"role {role(a)} has CREATEDB", f'ALTER ROLE "{role(a)}" WITH NOCREATEDB'),
        ("membership", a, f"role {role(a)} is a member of {role(b)}", f'REVOKE "{role(b)}" FROM "{role(a)}"'),
        ("access", a, f"another bot's role {role(b)} has CONNECT on database {db(a)}", f'FROM "{role(b)}"'),
        ("ownership", a, f"table public.admin_owned in {db(a)} is owned by", f'ALTER TABLE "public"."admin_owned" OWNER TO "{role(a)}"'),
        ("ownership", a, f"schema admin_schema in {db(a)} is owned by", f'ALTER SCHEMA "admin_schema" OWNER TO "{role(a)}"'),
        ("limits", b, f"role {role(b)} connection limit is 50, the registry says 6", "CONNECTION LIMIT 6"),
        ("limits", b, f"role {role(b)} statement_timeout is 0, the registry says 30s", "statement_timeout"),
        ("env-file", a, "has mode 0644, not 0600", f"chmod 600 {fleet.env_file(a)}"),
        ("stray", stray, f"database {db(stray)} and role {role(stray)} (botfleet bot {stray}) not in the registry",
         f"provision remove-bot {stray}"),
    ]
    for check, bot, message, fix in expected:
        hits = [f for (c, bt, m), f in found.items() if c == check and bt == bot and message in m]
        assert len(hits) == 1, (check, bot, message, list(found))
        assert fix in hits[0]["fix"], hits[0]
        assert hits[0]["fixable"] is (check != "stray")
    assert len(report["found"]) == len(expected)
    text = fleet.run("doctor", *other_fleets())
    assert text.returncode == 1 and text.stdout.count("finding: ") == len(expected) and "    fix: " in text.stdout
    # The audit changed nothing.
    assert admin.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = %s", (role(a),)).fetchone()[0] is True

    code, report, proc = doctor(fleet, "--fix")
    assert code == 1, proc.stderr  # the stray is reported, never dropped
    assert [f["check"] for f in report["remaining"]] == ["stray"]
    assert all(f["status"] == "fixed" for f in report["fixed"]) and len(report["fixed"]) == len(expected) - 1
    # Each repair is real on the server.
    one = lambda q, *p: admin.execute(q, p).fetchone()[0]  # noqa: E731
    assert one("SELECT has_database_privilege('public', %s, 'CONNECT')", db(a)) is False
    assert one("SELECT has_database_privilege(%s, %s, 'CONNECT')", role(b), db(a)) is False
    assert one("SELECT rolcreatedb FROM pg_roles WHERE rolname = %s", role(a)) is False
    assert one("SELECT pg_has_role(%s, %s, 'MEMBER')", role(a), role(b)) is False
    assert one("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", role(b)) == 6
    with pg.connect(db(a)) as conn:
        assert objects.not_owned_by(objects.inventory(conn), role(a)) == []
    assert stat.S_IMODE(fleet.env_file(a).stat().st_mode) == 0o600
    assert one("SELECT count(*) FROM pg_database WHERE datname = %s", db(stray)) == 1
    assert "statement_timeout=30s" in one(
        "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE r.rolname = %s AND s.setdatabase = 0", role(b))

    # The stray goes the way its finding says (backed up, then dropped); then doctor is clean.
    assert fleet.run("remove-bot", stray, "--yes").returncode == 0
    code, report, proc = doctor(fleet)
    assert code == 0 and report["remaining"] == [], report
    assert "doctor: no findings" in fleet.run("doctor", *other_fleets()).stdout
    for name in (a, b):
        assert_no_leak(fleet.password(name), proc.stdout, proc.stderr, text.stdout, text.stderr)


def test_doctor_reports_what_it_must_not_repair(fleet, admin):
    """A missing database, an env file that disagrees with the registry and a stray env file:
    reported with the command to run, never created, rewritten or deleted by --fix."""
    a, b = fleet.name("doc-miss"), fleet.name("doc-env")
    fleet.add(a)
    fleet.add(b)
    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db(a))))
    env = fleet.env_file(b)
    env.write_text(env.read_text().replace("DB_POOL_SIZE=2", "DB_POOL_SIZE=9"))
    env.chmod(0o600)
    leftover = fleet.root / "secrets" / f"t{RUN_ID}-gone.env"
    leftover.write_text("DATABASE_URL=postgresql://x@y/z\n")
    leftover.chmod(0o600)
    env_before = env.read_text()

    code, report, proc = doctor(fleet, "--fix")
    assert code == 1
    remaining = {(f["check"], f["bot"]): f for f in report["remaining"]}
    assert remaining[("missing", a)]["fix"].startswith(f"provision add-bot {a}")
    assert "DB_POOL_SIZE 9 (registry: 2)" in remaining[("env-file", b)]["message"]
    assert remaining[("env-file", b)]["fix"].startswith(f"provision add-bot {b}")
    assert remaining[("stray", f"t{RUN_ID}-gone")]["fix"] == f"rm {leftover}  (once nothing uses these credentials)"
    assert not any(f["fixable"] for f in report["remaining"])
    assert admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db(a),)).fetchone() is None
    assert env.read_text() == env_before and leftover.exists()

    # Following the printed commands makes the fleet clean.
    fleet.add(a)
    fleet.add(b)
    leftover.unlink()
    code, report, proc = doctor(fleet)
    assert code == 0, report


def test_every_operation_works_for_an_admin_without_superuser(fleet, pg, admin):
    """CREATEDB + CREATEROLE admin: backup, restore (replacing), rotation and doctor. A repair
    such an admin may not make is reported as "not fixed" with the server's reason."""
    from psycopg.conninfo import make_conninfo

    from provisioning.db import parse_url

    from .conftest import drop_bot_objects

    ops = f"t{RUN_ID}_ops_{len(fleet.names)}"
    a, b = fleet.name("del-a"), fleet.name("del-b")
    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ops)))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(sql.Identifier(ops)))
    try:
        params = parse_url(pg.url)
        params["user"] = ops
        env = fleet.env(ADMIN_DATABASE_URL=make_conninfo(**params))
        for name in (a, b):
            assert fleet.run("add-bot", name, env=env).returncode == 0
            fill(pg, name)
        expected = fingerprint(pg, a)
        proc = fleet.run("backup", a, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        path = json.loads(proc.stdout)[0]["path"]
        proc = fleet.run("restore", b, path, "--yes", "--from-bot", a, env=env)
        assert proc.returncode == 0, proc.stderr
        assert fingerprint(pg, b) == expected
        old = fleet.password(a)
        assert fleet.run("rotate-password", a, env=env).returncode == 0
        assert_same_secret(old, fleet.password(a), same=False)
        assert fleet.run("doctor", *other_fleets(), env=env).returncode == 0

        admin.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role(a))))
        with pg.connect(db(a)) as conn:
            conn.execute("CREATE TABLE superuser_owned (id int)")
        proc = fleet.run("doctor", *other_fleets(), "--fix", "--json", env=env)
        assert proc.returncode == 1
        report = json.loads(proc.stdout)
        status = {f["message"].split(" in ")[0]: f for f in report["fixed"]}
        assert status[f"role {role(a)} has CREATEDB"]["status"] == "fixed"
        refused = status["table public.superuser_owned"]
        assert refused["status"] == "not fixed" and refused["error"].startswith("must be")
        assert [f["message"] for f in report["remaining"]] == [refused["message"]]
        assert admin.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = %s", (role(a),)).fetchone()[0] is False
    finally:
        drop_bot_objects(admin, [a, b])
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ops)))


def test_a_forged_marker_does_not_make_a_database_botfleets(fleet, admin):
    """Any database's owner can write its comment: remove-bot, add-bot and apply refuse a database
    whose marker is not backed by the bot's own marked role owning it."""
    spoof = fleet.name("spoof")
    ident = sql.Identifier(db(spoof))
    admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))  # owned by the admin, not by a bot
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(f"botfleet bot {spoof}")))
    before = snapshot(admin)
    for args in (("remove-bot", spoof, "--yes", "--no-backup"), ("add-bot", spoof)):
        proc = fleet.run(*args)
        assert proc.returncode == 1 and "was not created by botfleet" in proc.stderr, (args, proc.stderr)
    assert snapshot(admin) == before
    assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (db(spoof),)).fetchone()[0] == 1


def test_a_bot_undoing_its_own_limits_or_password_is_found_and_repaired(scram_fleet):
    """What a bot can do to itself: settings of its own in its database (statement_timeout = 0
    there overrides the registry's 30s) and a NULL password. Done as the bot, over SCRAM."""
    fleet = scram_fleet
    name = fleet.name("self")
    fleet.add(name, "--db-host", "127.0.0.1")
    port = fleet.server.embedded.status().port
    with psycopg.connect(host="127.0.0.1", port=port, user=role(name), password=fleet.password(name), dbname=db(name),
                         autocommit=True) as bot:
        bot.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET statement_timeout = 0").format(
            sql.Identifier(role(name)), sql.Identifier(db(name))))
        bot.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(sql.Identifier(role(name))))
    report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    found = {f["check"]: f for f in report["remaining"] if f["bot"] == name}
    assert f"has settings of its own in database {db(name)} (statement_timeout=0)" in found["limits"]["message"]
    assert "has no password on the server" in found["password"]["message"]
    details = {tuple(s["details"]) for s in json.loads(fleet.run("plan", "--json", "--no-migrate", "--ignore-stray",
                                                                   "*").stdout)["steps"] if s["subject"] == name}
    assert any(f"role settings in database {db(name)} (statement_timeout=0) reset" in d for d in next(iter(details)))
    proc = fleet.run("add-bot", name, "--db-host", "127.0.0.1")
    assert proc.returncode == 0 and "the role had none" in proc.stdout, proc.stdout + proc.stderr
    with psycopg.connect(host="127.0.0.1", port=port, user=role(name), password=fleet.password(name), dbname=db(name),
                         autocommit=True) as bot:
        assert bot.execute("SHOW statement_timeout").fetchone()[0] == "30s"
    report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    assert [f for f in report["remaining"] if f["bot"] == name] == []
