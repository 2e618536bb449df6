"""remove-bot (backup first, refuse without --yes, harmless twice) and list."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess

from psycopg import sql

from provisioning.backup import find_pg_dump


def exists(admin, table, column, value):
    return admin.execute(sql.SQL("SELECT 1 FROM {} WHERE {} = %s").format(sql.Identifier(table), sql.Identifier(column)), (value,)).fetchone() is not None


def test_remove_refuses_without_yes_and_changes_nothing(fleet, admin):
    name = fleet.name("keep")
    fleet.add(name)
    proc = fleet.run("remove-bot", name)
    assert proc.returncode == 2 and "--yes" in proc.stderr
    proc = fleet.run("remove-bot", name, stdin="n\n")  # a "no" at the prompt (not a TTY: still refused)
    assert proc.returncode == 2
    assert exists(admin, "pg_database", "datname", name.replace("-", "_") + "_db")
    assert fleet.env_file(name).exists()


def test_remove_backs_up_then_drops_everything_and_is_harmless_twice(fleet, admin, pg):
    name = fleet.name("gone")
    stem = name.replace("-", "_")
    fleet.add(name)
    with pg.connect(f"{stem}_db") as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(f"{stem}_user")))
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    # A live session of the bot is ended, not waited for.
    holder = pg.connect(f"{stem}_db")

    proc = fleet.run("remove-bot", name, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "removed"
    backup = fleet.root / "backups" / name
    dumps = list(backup.glob("*.dump"))
    assert len(dumps) == 1 and out["backup"] == str(dumps[0])
    assert stat.S_IMODE(dumps[0].stat().st_mode) == 0o600
    digest = (backup / (dumps[0].name + ".sha256")).read_text().split()[0]
    assert digest == hashlib.sha256(dumps[0].read_bytes()).hexdigest()
    server_major = admin.info.server_version // 10000
    restore = find_pg_dump(server_major).with_name("pg_restore")
    listing = subprocess.run([str(restore), "--list", str(dumps[0])], capture_output=True, text=True, check=True).stdout
    assert "TABLE DATA public notes" in listing

    assert not exists(admin, "pg_database", "datname", f"{stem}_db")
    assert not exists(admin, "pg_roles", "rolname", f"{stem}_user")
    assert not fleet.env_file(name).exists()
    assert name not in (fleet.root / "fleet.toml").read_text()
    assert holder.closed or holder.broken or _dead(holder)

    again = fleet.run("remove-bot", name, "--yes")
    assert again.returncode == 0 and "not provisioned" in again.stdout
    assert len(list(backup.glob("*.dump"))) == 1


def _dead(conn):
    try:
        conn.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - the server ended it
        return True
    return False


def test_remove_without_backup(fleet, admin):
    name = fleet.name("nobak")
    fleet.add(name)
    proc = fleet.run("remove-bot", name, "--yes", "--no-backup")
    assert proc.returncode == 0, proc.stderr
    assert not (fleet.root / "backups").exists()
    assert not exists(admin, "pg_roles", "rolname", name.replace("-", "_") + "_user")


def test_remove_refuses_objects_botfleet_did_not_create(fleet, admin):
    name = fleet.name("alien")
    stem = name.replace("-", "_")
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"{stem}_db")))
    proc = fleet.run("remove-bot", name, "--yes")
    assert proc.returncode == 1 and "not created by botfleet" in proc.stderr
    assert exists(admin, "pg_database", "datname", f"{stem}_db")


def test_list_joins_registry_with_live_facts_and_flags_unknown_bots(fleet, admin):
    a, b = fleet.name("la"), fleet.name("lb")
    fleet.add(a)
    fleet.add(b, "--pool-size", "1", "--max-overflow", "0")
    # b disappears from the registry but stays on the server: list must flag it.
    text = (fleet.root / "fleet.toml").read_text()
    start = text.index(f"[bots.{b}]")
    (fleet.root / "fleet.toml").write_text(text[:start])
    rows = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout)}
    assert rows[a]["status"] == "ok" and rows[a]["connection_limit"] == 6 and rows[a]["size_bytes"] > 0
    assert rows[a]["connections"] == 0
    assert rows[b]["status"].startswith("unknown") and rows[b]["connection_limit"] == 2
    table = fleet.run("list").stdout
    assert a in table and "unknown" in table

    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(a.replace("-", "_") + "_db")))
    rows = {r["bot"]: r for r in json.loads(fleet.run("list", "--json").stdout)}
    assert rows[a]["status"] == "incomplete"


def test_failed_backup_removes_nothing_and_add_bot_repairs_the_cause(fleet, admin):
    """pg_dump cannot connect to a database that refuses connections: nothing may be dropped."""
    name = fleet.name("nodump")
    stem = name.replace("-", "_")
    fleet.add(name)
    admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(f"{stem}_db")))
    proc = fleet.run("remove-bot", name, "--yes")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pg_dump" in errors[0] and "nothing was removed" in errors[0]
    assert exists(admin, "pg_database", "datname", f"{stem}_db") and exists(admin, "pg_roles", "rolname", f"{stem}_user")
    assert fleet.env_file(name).exists() and name in (fleet.root / "fleet.toml").read_text()
    assert not list((fleet.root / "backups" / name).glob("*.dump"))

    out = json.loads(fleet.add(name, "--json").stdout)
    assert "database accepts connections again" in out["changes"]
    assert fleet.run("remove-bot", name, "--yes").returncode == 0
