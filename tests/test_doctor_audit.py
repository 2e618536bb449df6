"""doctor's audits of who can reach a bot (issue 15 item 4) and whether a bot can log in
(issue 14 item 7, issue 15 item 8), each against a setup broken behind botfleet's back.

- Membership both ways: a role that is a member OF a bot's role acts as the bot.
- Every grant on the bot's database and on the objects in it to another named role (tables,
  columns, sequences, schemas, routines, default privileges), not to PUBLIC (which may not
  connect to a bot's database); ``--fix`` revokes them.
- A login as each bot with its env file's password, over TCP on a SCRAM cluster: an
  expired password and one changed on the server are found (the latter also by an admin
  who cannot read password verifiers); a bot whose connections are all in use is not.
"""

from __future__ import annotations

import json
import secrets

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from provisioning import doctor as doctor_module
from provisioning.db import STATE_DATABASE, parse_url

from .conftest import RUN_ID, assert_no_leak, db, drop_bot_objects, other_fleets, role


def doctor(fleet, *args: str, env: dict[str, str] | None = None, ignore: tuple[str, ...] | None = None):
    proc = fleet.run("doctor", *(other_fleets() if ignore is None else ignore), *args, "--json", env=env)
    return proc.returncode, json.loads(proc.stdout), proc


def of_bot(findings: list[dict], name: str) -> list[dict]:
    return [f for f in findings if f["bot"] == name]


# --- everything that can reach a bot's objects -------------------------------------------------

def _as(pg, user: str, dbname: str) -> psycopg.Connection:
    """A login as ``user`` (the test server trusts its local logins)."""
    return psycopg.connect(make_conninfo(**{**parse_url(pg.url), "user": user, "dbname": dbname}), autocommit=True)


def test_doctor_finds_and_revokes_every_role_that_reaches_a_bots_objects(fleet, pg, admin):
    name = fleet.name("reach")
    fleet.add(name)
    intruder = f"t{RUN_ID}_intruder_{len(fleet.names)}"
    ident = sql.Identifier
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident(intruder)))
    try:
        with pg.connect(db(name)) as conn:  # the bot's own objects, made as the bot
            conn.execute(sql.SQL("SET ROLE {}").format(ident(role(name))))
            conn.execute("CREATE SCHEMA app")
            conn.execute("CREATE TABLE app.notes (id serial PRIMARY KEY, body text)")
            conn.execute("INSERT INTO app.notes (body) VALUES ('private')")
            conn.execute("CREATE FUNCTION app.touch(int) RETURNS int LANGUAGE sql AS 'SELECT 1'")
        # PUBLIC's EXECUTE on the bot's function is PostgreSQL's default: no finding.
        code, report, proc = doctor(fleet)
        assert code == 0, report

        # Behind botfleet's back: the intruder is made a member of the bot's role, and given
        # rights on its database, its schema, table, a column, the sequence, the function, and
        # on every table the bot creates from now on.
        admin.execute(sql.SQL("GRANT {} TO {}").format(ident(role(name)), ident(intruder)))
        admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(db(name)), ident(intruder)))
        with pg.connect(db(name)) as conn:
            for stmt in ("GRANT USAGE ON SCHEMA app TO {}", "GRANT SELECT, INSERT ON app.notes TO {}",
                         "GRANT UPDATE (body) ON app.notes TO {}", "GRANT USAGE ON SEQUENCE app.notes_id_seq TO {}",
                         "GRANT EXECUTE ON FUNCTION app.touch(int) TO {}"):
                conn.execute(sql.SQL(stmt).format(ident(intruder)))
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA app GRANT SELECT ON TABLES TO {}").format(
                ident(role(name)), ident(intruder)))
        with _as(pg, intruder, db(name)) as conn:  # it logs in to the bot's database and reads its rows
            assert conn.execute("SELECT body FROM app.notes").fetchall() == [("private",)]

        code, report, proc = doctor(fleet)
        assert code == 1
        found = of_bot(report["found"], name)
        expected = [
            ("membership", f"role {intruder} (a role outside the fleet) is a member of {role(name)}",
             f'REVOKE "{role(name)}" FROM "{intruder}"'),
            ("access", f"role {intruder} (not a bot of this fleet) has CONNECT on database {db(name)}",
             f'REVOKE ALL ON DATABASE "{db(name)}" FROM "{intruder}"'),
            ("access", f"{intruder} has USAGE on schema app in {db(name)}", f'REVOKE ALL ON SCHEMA "app" FROM "{intruder}"'),
            ("access", f"{intruder} has INSERT, SELECT on table app.notes in {db(name)}",
             f'REVOKE ALL ON TABLE "app"."notes" FROM "{intruder}" CASCADE'),
            ("access", f"{intruder} has UPDATE on table app.notes column body in {db(name)}",
             f'REVOKE ALL ("body") ON TABLE "app"."notes" FROM "{intruder}"'),
            ("access", f"{intruder} has USAGE on sequence app.notes_id_seq in {db(name)}",
             f'REVOKE ALL ON SEQUENCE "app"."notes_id_seq" FROM "{intruder}"'),
            ("access", f"{intruder} has EXECUTE on routine app.touch(integer) in {db(name)}",
             f'REVOKE ALL ON ROUTINE "app"."touch"("pg_catalog"."int4") FROM "{intruder}"'),
            ("access", f"default privileges of {role(name)} in schema app: {intruder} gets SELECT on every new table",
             f'ALTER DEFAULT PRIVILEGES FOR ROLE "{role(name)}" IN SCHEMA "app" REVOKE ALL ON TABLES FROM "{intruder}"'),
        ]
        for check, message, fix in expected:
            hits = [f for f in found if f["check"] == check and message in f["message"]]
            assert len(hits) == 1, (message, [f["message"] for f in found])
            assert fix in hits[0]["fix"] and hits[0]["fixable"], hits[0]
        assert len(found) == len(expected), [f["message"] for f in found]
        # PUBLIC's EXECUTE on the function is PostgreSQL's own default (and PUBLIC may not connect).
        assert not any(f["message"].startswith("PUBLIC") for f in found)
        # Read in the bot's own session (its login), the same as over the admin's connection.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(doctor_module, "_login_session", lambda url, made: lambda entry, observed: None)
            _, admin_only, _ = doctor(fleet)
        assert admin_only == report
        # The audit changed nothing.
        assert admin.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (intruder, role(name))).fetchone()[0] is True

        code, report, proc = doctor(fleet, "--fix")
        assert code == 0, report
        assert len(of_bot(report["fixed"], name)) == len(expected)
        assert all(f["status"] == "fixed" for f in report["fixed"])
        one = lambda q, *p: admin.execute(q, p).fetchone()[0]  # noqa: E731
        assert one("SELECT pg_has_role(%s, %s, 'MEMBER')", intruder, role(name)) is False
        assert one("SELECT has_database_privilege(%s, %s, 'CONNECT')", intruder, db(name)) is False
        with pg.connect(db(name)) as conn:
            q = lambda query, *p: conn.execute(query, p).fetchone()[0]  # noqa: E731
            assert q("SELECT has_table_privilege(%s, 'app.notes', 'SELECT, INSERT, UPDATE')", intruder) is False
            assert q("SELECT has_column_privilege(%s, 'app.notes', 'body', 'UPDATE')", intruder) is False
            assert q("SELECT has_sequence_privilege(%s, 'app.notes_id_seq', 'USAGE')", intruder) is False
            assert q("SELECT has_schema_privilege(%s, 'app', 'USAGE')", intruder) is False
            assert q("SELECT count(*) FROM pg_default_acl") == 0
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            _as(pg, intruder, db(name))
        code, report, proc = doctor(fleet)
        assert code == 0, report
        assert_no_leak(fleet.password(name), proc.stdout, proc.stderr)
    finally:
        drop_bot_objects(admin, [name])
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident(intruder)))


# --- a login as each bot -----------------------------------------------------------------------

def _login(fleet, name: str, password: str | None = None) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=fleet.server.embedded.status().port, user=role(name),
                           password=password or fleet.password(name), dbname=db(name), connect_timeout=5, autocommit=True)


def test_doctor_finds_a_bot_whose_password_expired_and_fix_lets_it_log_in(scram_fleet):
    fleet = scram_fleet
    name = fleet.name("expired")
    fleet.add(name)
    _login(fleet, name).close()
    with fleet.server.connect() as admin:
        admin.execute(sql.SQL("ALTER ROLE {} VALID UNTIL '2000-01-01 00:00:00+00'").format(sql.Identifier(role(name))))
    with pytest.raises(psycopg.OperationalError):
        _login(fleet, name)

    code, report, proc = doctor(fleet, ignore=("--ignore-stray", "*"))
    assert code == 1
    found = of_bot(report["found"], name)
    assert [f["check"] for f in found] == ["login"], found
    assert f"the password of role {role(name)} expires at 2000-01-01" in found[0]["message"]
    assert found[0]["fix"] == f"ALTER ROLE \"{role(name)}\" VALID UNTIL 'infinity'" and found[0]["fixable"]
    assert_no_leak(fleet.password(name), proc.stdout, proc.stderr)

    code, report, proc = doctor(fleet, "--fix", ignore=("--ignore-stray", "*"))
    assert code == 0 and [f["status"] for f in of_bot(report["fixed"], name)] == ["fixed"], report
    _login(fleet, name).close()

    # add-bot converges it too (a rerun on the bot lifts an expiry someone set).
    with fleet.server.connect() as admin:
        admin.execute(sql.SQL("ALTER ROLE {} VALID UNTIL '2000-01-01 00:00:00+00'").format(sql.Identifier(role(name))))
    proc = fleet.run("add-bot", name, "--no-migrate")
    assert proc.returncode == 0 and "password expiry (2000-01-01" in proc.stdout, proc.stdout + proc.stderr
    _login(fleet, name).close()


def test_doctor_finds_a_password_changed_on_the_server_even_when_it_cannot_read_verifiers(scram_fleet):
    """An admin without superuser cannot compare the env file with the server's SCRAM verifier:
    only a login as the bot shows that its password was changed behind botfleet's back."""
    fleet = scram_fleet
    ops = f"t{RUN_ID}_ops_{len(fleet.names)}"
    name = fleet.name("moved")
    ident = sql.Identifier
    with fleet.server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(ident(ops)))
        for database in ("postgres", STATE_DATABASE):
            admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident(database), ident(ops)))
    env = fleet.env(ADMIN_DATABASE_URL=make_conninfo(**{**parse_url(fleet.server.url), "user": ops}))
    other = secrets.token_urlsafe(24)
    try:
        assert fleet.run("add-bot", name, env=env).returncode == 0
        code, report, _ = doctor(fleet, env=env, ignore=("--ignore-stray", "*"))
        assert code == 0, report
        with fleet.server.connect() as admin:
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident(role(name)), sql.Literal(other)))

        code, report, proc = doctor(fleet, env=env, ignore=("--ignore-stray", "*"))
        assert code == 1
        found = of_bot(report["found"], name)
        assert [f["check"] for f in found] == ["login"], found
        assert f"{role(name)} cannot log in to {db(name)} at 127.0.0.1:" in found[0]["message"]
        assert "password authentication failed" in found[0]["message"]
        assert found[0]["fix"].startswith(f"provision add-bot {name}") and not found[0]["fixable"]
        text = fleet.run("doctor", "--ignore-stray", "*", env=env)
        for secret in (fleet.password(name), other):
            assert_no_leak(secret, proc.stdout, proc.stderr, text.stdout, text.stderr)

        # Following the fix: add-bot sets the server's password to the env file's.
        assert fleet.run("add-bot", name, env=env).returncode == 0
        _login(fleet, name).close()
        code, report, _ = doctor(fleet, env=env, ignore=("--ignore-stray", "*"))
        assert code == 0, report
    finally:
        with fleet.server.connect() as admin:
            drop_bot_objects(admin, [name])
            for database in ("postgres", STATE_DATABASE):
                admin.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(ident(database), ident(ops)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident(ops)))


def test_a_password_the_login_proved_is_hashed_once_and_a_changed_one_is_found(scram_fleet, monkeypatch):
    """The login as the bot over SCRAM is the server's check of the env file's password. With
    libpq 18 doctor logs in with the SCRAM keys the password gives (one PBKDF2 here, which also
    compares it with the verifier); with an older libpq, with the password (libpq hashes it) and
    no hash here. Either way each password is hashed once by doctor's own process at most; a
    password changed on the server is still found, once, as the reconcile's finding."""
    import base64
    import hashlib

    from provisioning import passwords

    fleet = scram_fleet
    good, moved = fleet.name("proved"), fleet.name("changed")
    fleet.add(good)
    fleet.add(moved)
    hashed: list[bytes] = []  # the salt of each PBKDF2 made in this process
    real = hashlib.pbkdf2_hmac
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda name, pw, salt, n, *a: hashed.append(salt) or real(name, pw, salt, n, *a))
    passwords._salted.cache_clear()
    logins: list[tuple[str, bool, bool]] = []  # each login as a bot: its database, with keys?, logged in?
    connect = psycopg.connect

    def recording(conninfo: str = "", **kwargs):
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
        if params.get("application_name") != "botfleet-doctor":
            return connect(conninfo, **kwargs)
        try:
            conn = connect(conninfo, **kwargs)
        except psycopg.OperationalError:
            logins.append((params["dbname"], "scram_client_key" in params, False))
            raise
        logins.append((params["dbname"], "scram_client_key" in params, True))
        return conn

    monkeypatch.setattr(psycopg, "connect", recording)
    try:
        with fleet.server.connect() as admin:
            verifiers = dict(admin.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                                           ([role(good), role(moved)],)).fetchall())
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role(moved)),
                                                                      sql.Literal(secrets.token_urlsafe(24))))
            changed = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role(moved),)).fetchone()[0]
        code, report, proc = doctor(fleet, ignore=("--ignore-stray", "*"))
        assert code == 1
        assert of_bot(report["found"], good) == [], report
        found = of_bot(report["found"], moved)
        assert [f["check"] for f in found] == ["password"], found
        assert "is not the role's password on the server" in found[0]["message"]

        def salt(verifier: str) -> bytes:
            return base64.b64decode(verifier.split("$")[1].split(":")[1])

        assert hashed.count(salt(verifiers[role(good)])) == (1 if passwords.keys_supported() else 0), hashed
        assert hashed.count(salt(changed)) == 1  # the changed one: checked here, hence the finding
        keys = passwords.keys_supported()
        assert [(d, k, ok) for d, k, ok in logins if d == db(good)] == [(db(good), keys, True)], logins
        # the changed password gives no keys for the role's verifier: its login is with the password
        assert [(d, k, ok) for d, k, ok in logins if d == db(moved)] == [(db(moved), False, False)], logins
        assert_no_leak(fleet.password(good), proc.stdout, proc.stderr)
    finally:
        with fleet.server.connect() as admin:
            drop_bot_objects(admin, [good, moved])


def test_scram_keys_log_in_as_the_password_does_and_only_for_its_verifier(scram_fleet):
    """passwords.scram_keys: the keys a password gives with its role's verifier log in over SCRAM
    (libpq 18's scram_client_key / scram_server_key, no password sent to libpq); another
    password gives none, and forged keys are refused by the server."""
    import base64

    from provisioning import passwords

    if not passwords.keys_supported():
        pytest.skip("this libpq cannot log in with SCRAM keys (libpq 18 can)")
    fleet = scram_fleet
    name = fleet.name("keys")
    fleet.add(name)
    try:
        with fleet.server.connect() as admin:
            verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role(name),)).fetchone()[0]
        password = fleet.password(name)
        keys = passwords.scram_keys(password, verifier)
        assert keys is not None and passwords.verifier_matches(password, verifier)
        assert passwords.scram_keys(password + "x", verifier) is None
        assert passwords.scram_keys(password, verifier.replace("SCRAM-SHA-256$", "md5$")) is None
        params = {**parse_url(fleet.server.url), "user": role(name), "dbname": db(name), "host": "127.0.0.1"}
        params.pop("password", None)
        with psycopg.connect(make_conninfo(**params, scram_client_key=keys[0], scram_server_key=keys[1])) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == role(name)
        forged = base64.b64encode(secrets.token_bytes(32)).decode()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(make_conninfo(**params, scram_client_key=forged, scram_server_key=keys[1]))
    finally:
        with fleet.server.connect() as admin:
            drop_bot_objects(admin, [name])


def test_a_bot_using_all_its_connections_is_no_credentials_finding(scram_fleet):
    """"too many connections for role" (SQLSTATE 53300) means the password was never checked."""
    fleet = scram_fleet
    name = fleet.name("busy")
    fleet.add(name, "--pool-size", "1", "--max-overflow", "0")
    with fleet.server.connect() as admin:
        limit = admin.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role(name),)).fetchone()[0]
    held = [_login(fleet, name) for _ in range(limit)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            _login(fleet, name)
        code, report, proc = doctor(fleet, ignore=("--ignore-stray", "*"))
        assert of_bot(report["found"], name) == [] and code == 0, report
    finally:
        for conn in held:
            conn.close()
