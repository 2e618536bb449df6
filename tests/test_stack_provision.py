"""The compose stack's provisioning service, without Docker: `provision apply --credentials-only`
(what the `provision` service runs on every `up`) and `provision migrate --self --check` (what
each bot's container runs before the bot), on the real test server.

The service converges the server to fleet.toml from the bots' own credentials files: it never
writes a file, never invents a password, refuses foreign objects and missing credentials in
one line, and a bot whose migration fails is kept down by its own check, not the fleet.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from psycopg import sql

from .conftest import assert_matches_server, db, drop_bot_objects, role, snapshot, tree


def verifier(admin, name: str) -> str | None:
    row = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role(name),)).fetchone()
    return row[0] if row else None


def fingerprint(root: Path) -> dict[str, str]:
    """Every file of the project (the server's own state folder aside) and its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".botfleet" not in p.parts and "__pycache__" not in p.parts}


def service(fleet, *args: str):
    return fleet.run("apply", "--credentials-only", *args)


def test_an_empty_server_gets_every_bot_with_the_password_of_its_credentials_file(code_fleet, admin):
    a, b = code_fleet.name("svc-a"), code_fleet.name("svc-b")
    code_fleet.add(a, "--code", "chat-bot", "--no-migrate")
    code_fleet.add(b)  # no code: a database and a role only
    passwords = {n: code_fleet.password(n) for n in (a, b)}
    drop_bot_objects(admin, [a, b])  # a fresh stack volume: none of them exists there
    files = fingerprint(code_fleet.root)

    proc = service(code_fleet, "--json")
    assert proc.returncode == 0, proc.stderr
    results = {(r["action"], r["subject"]): r for r in json.loads(proc.stdout)["results"]}
    assert results[("create", a)]["ok"] and results[("create", b)]["ok"], results
    assert results[("migrate", a)]["ok"], results  # migrated as its own role
    for name in (a, b):
        assert_matches_server(passwords[name], verifier(admin, name))
    assert fingerprint(code_fleet.root) == files, "the service writes no file"
    with code_fleet.server.connect(db(a)) as conn:
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'messages'").fetchone()[0] == role(a)
    assert admin.execute("SELECT has_database_privilege('public', %s, 'CONNECT')", (db(a),)).fetchone()[0] is False

    again = service(code_fleet)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    # without --owns-server (the stack says it; this shared test server is not botfleet's), the
    # maintenance databases are left as they are
    assert admin.execute("SELECT has_database_privilege('public', 'postgres', 'CONNECT')").fetchone()[0] is True


def test_drift_is_converged_and_the_servers_password_follows_the_file(fleet, admin):
    name = fleet.name("svc-drift")
    fleet.add(name)
    password = fleet.password(name)
    admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 50 PASSWORD 'someone-else'").format(sql.Identifier(role(name))))
    admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(db(name))))
    files = fingerprint(fleet.root)
    proc = service(fleet)
    assert proc.returncode == 0, proc.stderr
    assert admin.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role(name),)).fetchone()[0] == 6
    assert admin.execute("SELECT has_database_privilege('public', %s, 'CONNECT')", (db(name),)).fetchone()[0] is False
    assert_matches_server(password, verifier(admin, name))
    assert fingerprint(fleet.root) == files
    assert password not in proc.stdout + proc.stderr


def test_missing_credentials_and_foreign_objects_are_refused_in_one_line_and_nothing_changes(fleet, admin):
    ok, gone, foreign = fleet.name("svc-ok"), fleet.name("svc-gone"), fleet.name("svc-foreign")
    for name in (ok, gone):
        fleet.add(name)
    drop_bot_objects(admin, [ok, gone])
    fleet.env_file(gone).unlink()
    before, files = snapshot(admin), tree(fleet.root)
    proc = service(fleet)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{gone}: no credentials for role {role(gone)}" in errors[0]
    assert f"provision add-bot {gone}" in errors[0]
    assert snapshot(admin) == before and tree(fleet.root) == files, "a refused run changes nothing"

    fleet.run("remove-bot", gone, "--yes", "--no-backup")
    admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role(foreign))))  # not botfleet's
    fleet.names.append(foreign)
    (fleet.root / "fleet.toml").write_text((fleet.root / "fleet.toml").read_text() + f"\n[bots.{foreign}]\n")
    before = snapshot(admin)
    proc = service(fleet)
    assert proc.returncode == 2 and "exists without botfleet's marker" in proc.stderr, proc.stderr
    assert snapshot(admin) == before


def test_a_failed_migration_keeps_only_that_bot_down(code_fleet, admin):
    good, bad = code_fleet.name("svc-good"), code_fleet.name("svc-bad")
    code_fleet.add(good, "--code", "hello-bot", "--no-migrate")
    package = code_fleet.root / "bots" / "broken_bot"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from shared import Base\n\n\nclass BrokenBase(Base):\n    __abstract__ = True\n\n\n"
                                       "metadata = BrokenBase.metadata\n")
    versions = code_fleet.root / "migrations" / "broken_bot" / "versions"
    versions.mkdir(parents=True)
    (versions / "b00000000001_broken.py").write_text(
        'revision = "b00000000001"\ndown_revision = None\nbranch_labels = None\ndepends_on = None\n\n'
        "from alembic import op\n\n\ndef upgrade():\n    op.execute('SELECT * FROM no_such_table')\n\n\n"
        "def downgrade():\n    pass\n")
    code_fleet.add(bad, "--code", "broken-bot", "--no-migrate")

    proc = service(code_fleet, "--json")
    # the service succeeds (the fleet's server is converged) and says which bot failed
    assert proc.returncode == 0, proc.stderr
    results = {(r["action"], r["subject"]): r for r in json.loads(proc.stdout)["results"]}
    assert results[("migrate", good)]["ok"] is True
    assert results[("migrate", bad)]["ok"] is False and "no_such_table" in results[("migrate", bad)]["detail"]
    text = service(code_fleet)
    assert f"FAILED migrate {bad}  {bad}: revision b00000000001 failed" in text.stdout

    # each bot's container checks its own schema before it starts, with its own DATABASE_URL
    from provisioning.db import parse_url

    server = code_fleet.server
    if server.embedded is not None:
        host, port = "127.0.0.1", server.embedded.status().port
    else:
        params = parse_url(server.url)
        host, port = params.get("host") or "127.0.0.1", params.get("port") or 5432

    def check(name: str, code: str):
        url = code_fleet.env_file(name).read_text().split("DATABASE_URL=", 1)[1].splitlines()[0]
        (code_fleet.root / "url").write_text(url.replace("@postgres:5432/", f"@{host}:{port}/") + "\n")
        env = code_fleet.env(BOTFLEET_BOT=name, BOTFLEET_CODE=code, DATABASE_URL_FILE=str(code_fleet.root / "url"))
        env.pop("ADMIN_DATABASE_URL")
        return code_fleet.run("migrate", "--self", "--check", "--project-dir", str(code_fleet.root), env=env)

    assert check(good, "hello_bot").returncode == 0
    refused = check(bad, "broken_bot")
    assert refused.returncode == 1 and f"{bad}: its database is at base, its code needs b00000000001" in refused.stderr


def test_a_bot_container_that_cannot_log_in_says_why_in_one_line(scram_code_fleet):
    # What a bot's container prints when its DATABASE_URL is refused (a PgBouncer that cannot read
    # its userlist, a password changed on the server): the server's reason, never a "bug".
    fleet = scram_code_fleet
    name = fleet.name("svc-refused")
    fleet.add(name, "--code", "hello-bot", "--no-migrate")
    port = fleet.server.embedded.status().port
    wrong = "not-its-password-" + fleet.name("pw")
    (fleet.root / "url").write_text(f"postgresql://{role(name)}:{wrong}@127.0.0.1:{port}/{db(name)}\n")
    env = fleet.env(BOTFLEET_BOT=name, BOTFLEET_CODE="hello_bot", DATABASE_URL_FILE=str(fleet.root / "url"))
    env.pop("ADMIN_DATABASE_URL")
    proc = fleet.run("migrate", "--self", "--check", "--project-dir", str(fleet.root), env=env)
    assert proc.returncode == 1
    assert f"{name}: cannot reach its database {db(name)}: password authentication failed for user" in proc.stderr, \
        proc.stderr
    assert "bug" not in proc.stderr and wrong not in proc.stdout + proc.stderr


def test_plan_and_doctor_name_a_missing_required_setting(code_fleet):
    name = code_fleet.name("svc-cfg")
    code_fleet.add(name, "--code", "hello-bot", "--no-migrate")
    proc = code_fleet.run("plan", "--no-migrate")
    assert f"note: {name} needs BOT_TOKEN (provision config set {name} BOT_TOKEN=...)" in proc.stdout, proc.stdout
    report = json.loads(code_fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    found = [f for f in report["remaining"] if f["check"] == "config"]
    assert [(f["bot"], f["fixable"]) for f in found] == [(name, False)]
    assert found[0]["fix"] == f"provision config set {name} BOT_TOKEN=..."
    assert code_fleet.run("config", "set", name, "BOT_TOKEN=123:abc").returncode == 0
    assert "note:" not in code_fleet.run("plan", "--no-migrate").stdout
    report = json.loads(code_fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    assert not [f for f in report["remaining"] if f["check"] == "config"]


def test_a_volume_started_with_another_admin_password_is_named_in_the_services_refusal(scram_fleet):
    # The stack's postgres sets its admin password once, on an empty volume: a secrets file made
    # anew since (a deleted deploy folder, a re-clone) no longer opens it. The service says so.
    port = scram_fleet.server.embedded.status().port
    wrong = "not-the-volumes-password-" + scram_fleet.name("pw")
    env = scram_fleet.env(ADMIN_DATABASE_URL=f"postgresql://postgres:{wrong}@127.0.0.1:{port}/postgres")
    proc = scram_fleet.run("apply", "--credentials-only", "--owns-server", env=env)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: authentication failed for postgres@127.0.0.1"), err
    assert "keeps the admin password it first started with in its pgdata volume" in err, err
    assert "secrets/postgres-password" in err and wrong not in proc.stdout + proc.stderr
    # anywhere else the refusal stays the plain one
    plain = scram_fleet.run("plan", env=env)
    assert plain.returncode != 0 and "authentication failed" in plain.stderr and "pgdata" not in plain.stderr
