"""A storage quota per bot (issue 18): `--max-size` / max_size, shown by list, info, doctor and
`provision quota status`; `provision quota enforce` suspends a bot over it (NOLOGIN, sessions
ended, recorded in botfleet's own database) so that neither the bot nor botfleet's own
reconcile (add-bot, apply, doctor --fix) undoes it, and lifts it once the bot is under it."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from provisioning.db import STATE_DATABASE
from provisioning.quota import TABLE

from .conftest import db, login, role

MB = 1024 * 1024


def can_login(admin, name: str) -> bool:
    return admin.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role(name),)).fetchone()[0]


def recorded(pg, name: str) -> bool:
    with pg.connect(STATE_DATABASE) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"public.{TABLE}",)).fetchone()[0] is None:
            return False
        return conn.execute(sql.SQL("SELECT 1 FROM {} WHERE role = %s").format(sql.Identifier(TABLE)),
                            (role(name),)).fetchone() is not None


def grow(fleet, name: str, mb: int) -> None:
    """The bot writes about ``mb`` MB into its database, as itself."""
    with login(fleet, name) as conn:
        conn.execute(sql.SQL("CREATE TABLE blob AS SELECT g, repeat('x', 1000) AS pad "
                             "FROM generate_series(1, {}) g").format(sql.Literal(mb * 900)))


def quota_for(admin, name: str, room_mb: int) -> str:
    """A quota ``room_mb`` MB above the bot's database's size now (an empty one is ~7.5 MB)."""
    size = admin.execute("SELECT pg_database_size(%s)", (db(name),)).fetchone()[0]
    return f"{math.ceil(size / MB) + room_mb}MB"


def quota_states(fleet, *args: str) -> dict[str, dict]:
    proc = fleet.run("quota", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["bot"]: s for s in json.loads(proc.stdout)}


def test_list_info_and_quota_status_show_size_against_quota(fleet, admin):
    (fleet.root / "fleet.toml").write_text('version = 1\n\n[defaults]\nmax_size = "1GB"\n')
    capped, own, free = fleet.name("capped"), fleet.name("own"), fleet.name("free")
    fleet.add(capped)
    fleet.add(own, "--max-size", "2GB")
    fleet.add(free, "--max-size", "none")
    rows = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout)}
    assert (rows[capped]["max_size_bytes"], rows[own]["max_size_bytes"], rows[free]["max_size_bytes"]) == (
        1024 * MB, 2048 * MB, None)
    assert rows[capped]["quota_state"] == "ok" and rows[free]["quota_state"] == "no quota"
    table = fleet.run("list").stdout
    assert "QUOTA" in table and "1.0 GB" in table, table
    info = json.loads(fleet.run("info", own, "--json").stdout)
    assert info["max_size_bytes"] == 2048 * MB and info["size_bytes"] > 0 and info["quota_state"] == "ok"
    assert "quota" in fleet.run("info", own).stdout
    states = quota_states(fleet, "status")
    assert states[own]["percent"] == pytest.approx(100 * states[own]["size_bytes"] / (2048 * MB), abs=0.1)
    assert states[free]["max_size_bytes"] is None and not states[free]["over"]
    assert states[own]["growth_bytes"] is None  # no sample yet


def test_growth_is_shown_since_quota_enforce_sampled_the_size(fleet, admin):
    name = fleet.name("growing")
    fleet.add(name, "--max-size", "1GB")
    sampled = quota_states(fleet, "enforce")[name]  # a cron run: nothing to enforce, the size sampled
    assert sampled["action"] == "" and sampled["growth_bytes"] is None
    grow(fleet, name, 3)
    now = quota_states(fleet, "status")[name]
    assert now["growth_bytes"] == now["size_bytes"] - sampled["size_bytes"] and now["growth_bytes"] > 2 * MB
    assert now["growth_since"].endswith("Z")
    row = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout)}[name]
    assert row["growth_bytes"] == now["growth_bytes"]
    assert "+" in fleet.run("info", name).stdout.split("quota", 1)[1].splitlines()[0]


def test_over_quota_is_reported_enforced_kept_and_lifted(fleet, admin, pg):
    big, neighbour = fleet.name("big"), fleet.name("calm")
    fleet.add(big)
    fleet.add(big, "--max-size", quota_for(admin, big, 3))
    fleet.add(neighbour, "--max-size", "1GB")
    grow(fleet, big, 6)

    report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    found = [f for f in report["remaining"] if f["bot"] == big and f["check"] == "quota"]
    assert len(found) == 1 and "over its quota" in found[0]["message"] and "quota enforce" in found[0]["fix"]
    assert can_login(admin, big)  # reported, nothing enforced yet

    session = login(fleet, big)  # a session open when the quota is enforced is ended
    states = quota_states(fleet, "enforce")
    assert states[big]["action"] == "suspended" and states[big]["suspended"] and states[big]["sessions_ended"] == 1
    assert states[neighbour]["action"] == "" and not states[neighbour]["suspended"]
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        login(fleet, big)
    with login(fleet, neighbour) as conn:  # the other bot is unaffected
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert recorded(pg, big)

    # botfleet's own reconcile keeps it: add-bot, apply, doctor --fix leave the role NOLOGIN
    assert fleet.run("add-bot", big).returncode == 0
    assert fleet.run("apply", "--no-migrate", "--ignore-stray", "*").returncode == 0
    fleet.run("doctor", "--fix", "--ignore-stray", "*")
    assert not can_login(admin, big)
    # ... and a LOGIN given by hand is found as drift and taken back
    admin.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role(big))))
    plan = fleet.run("plan", "--no-migrate", "--ignore-stray", "*").stdout
    assert "role attributes (NOLOGIN)" in plan, plan
    fleet.run("doctor", "--fix", "--ignore-stray", "*")
    assert not can_login(admin, big)

    # under the quota again (a larger one), enforce lifts it
    assert fleet.run("add-bot", big, "--max-size", "1GB").returncode == 0
    assert not can_login(admin, big)  # raising the quota alone lifts nothing
    states = quota_states(fleet, "enforce", big)
    assert states[big]["action"] == "lifted" and not states[big]["suspended"]
    with login(fleet, big) as conn:
        assert conn.execute("SELECT count(*) FROM blob").fetchone()[0] > 0  # its data untouched
    assert not recorded(pg, big)
    report = json.loads(fleet.run("doctor", "--json", "--ignore-stray", "*").stdout)
    assert [f for f in report["remaining"] if f["bot"] == big] == []
    assert quota_states(fleet, "enforce", big)[big]["action"] == ""  # idempotent


def test_the_bot_cannot_lift_its_suspension(fleet, admin, pg):
    """Everything the bot's role could try, run with exactly its privileges (SET ROLE in an admin
    session: it cannot log in itself any more): its role's attributes, and the record."""
    name = fleet.name("jail")
    fleet.add(name)
    fleet.add(name, "--max-size", quota_for(admin, name, 2))
    grow(fleet, name, 5)
    assert quota_states(fleet, "enforce", name)[name]["action"] == "suspended"
    me = sql.Identifier(role(name))
    with pg.connect(db(name)) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(me))
        for stmt in (sql.SQL("ALTER ROLE {} LOGIN").format(me), sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(me),
                     sql.SQL("ALTER ROLE {} WITH LOGIN VALID UNTIL 'infinity'").format(me)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
    with pg.connect(STATE_DATABASE) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(me))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(TABLE)))
    assert admin.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')", (role(name), STATE_DATABASE)).fetchone()[0] \
        is False
    assert not can_login(admin, name) and recorded(pg, name)
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        login(fleet, name)
    # removing the bot removes its record too
    assert fleet.run("remove-bot", name, "--yes", "--no-backup").returncode == 0
    assert not recorded(pg, name)


def test_a_bad_quota_is_refused_and_nothing_changes(fleet):
    name = fleet.name("q")
    proc = fleet.run("add-bot", name, "--max-size", "0MB")
    assert proc.returncode == 2 and "--max-size must be more than 0" in proc.stderr
    assert not (fleet.root / "fleet.toml").exists()
    proc = fleet.run("quota", "status")
    assert proc.returncode == 2 and "no fleet here" in proc.stderr and not (fleet.root / ".botfleet").exists()
    (fleet.root / "fleet.toml").write_text("version = 1\n")
    proc = fleet.run("quota", "enforce", "no-such-bot")
    assert proc.returncode == 2 and "no-such-bot" in proc.stderr


def _readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]


def test_the_readme_guards_and_quota_examples_work_as_written(fleet, admin):
    """The section's fleet.toml as the fleet's, and each command line of its bash block, with the
    bot's name made unique."""
    section = _readme_section("Guards and storage quotas: one bot cannot hurt the others")
    name = fleet.name("chat")
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (fleet.root / "fleet.toml").write_text("version = 1\n" + toml.replace("chat-bot", name))
    lines = [line for line in section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    assert len(lines) == 4
    for line in lines:
        args = shlex.split(line.replace("chat-bot", name), comments=True)
        assert args[0] == "provision"
        proc = fleet.run(*args[1:])
        assert proc.returncode == 0, (line, proc.stderr)
    settings = admin.execute("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                             "WHERE r.rolname = %s AND s.setdatabase = 0", (role(name),)).fetchone()[0]
    assert {"temp_file_limit=1GB", "work_mem=16MB", "lock_timeout=5s", "idle_session_timeout=1h"} <= set(settings)
    assert quota_states(fleet, "status")[name]["max_size_bytes"] is None  # its own "none" over [defaults]' 2GB
