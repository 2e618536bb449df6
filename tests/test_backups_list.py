"""Backups through pipes and the list of them (issue 15): `backup NAME --output -` writes the
dump on stdout and nothing else, `restore NAME -` reads one from stdin with every check a file
gets, `backups [NAME] [--json]` lists the dumps with size, age and checksum state."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from psycopg import sql

from .conftest import PROVISION, assert_no_leak, snapshot
from .test_ops import as_bot, backup, db, dumps, fingerprint, fill


def raw(fleet, *args: str, stdin: bytes | int = b"", stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess:
    """The real console script with binary stdin/stdout (a dump is bytes)."""
    options: dict = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    return subprocess.run([PROVISION, *args], stdout=stdout, stderr=subprocess.PIPE, env=fleet.env(),
                          timeout=300, **options)


def errors(stderr: bytes | str) -> list[str]:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return [line for line in text.splitlines() if line.startswith("error:")]


def small_fill(pg, name: str, rows: int = 50) -> None:
    with as_bot(pg, name) as conn:
        conn.execute(sql.SQL("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))


def count(pg, name: str) -> int:
    with as_bot(pg, name) as conn:
        return conn.execute("SELECT count(*) FROM notes").fetchone()[0]


def test_backup_to_stdout_is_only_the_dump_and_restores_from_stdin(fleet, pg):
    src, dst = fleet.name("st-src"), fleet.name("st-dst")
    fleet.add(src)
    fleet.add(dst)
    fill(pg, src)
    before = fingerprint(pg, src)

    out = raw(fleet, "backup", src, "--output", "-")
    assert out.returncode == 0, out.stderr.decode()
    dump = out.stdout
    assert dump.startswith(b"PGDMP"), "stdout holds the pg_dump -Fc archive and nothing before it"
    stderr = out.stderr.decode()
    assert f"pg_dump of {db(src)} to stdout" in stderr and hashlib.sha256(dump).hexdigest() in stderr
    assert not (fleet.root / "backups").exists(), "a dump to stdout leaves no file behind"
    assert_no_leak(fleet.password(src), stderr)

    # stdin has no .sha256 beside it: refused before anything is read, unless --no-checksum
    refused = raw(fleet, "restore", dst, "-", "--from-bot", src, stdin=dump)
    assert refused.returncode == 2 and len(errors(refused.stderr)) == 1
    assert "--no-checksum" in errors(refused.stderr)[0]
    # the --from-bot check holds for stdin as for a file
    refused = raw(fleet, "restore", dst, "-", "--no-checksum", stdin=dump)
    assert refused.returncode == 2, refused.stderr.decode()
    (line,) = errors(refused.stderr)
    assert line.startswith("error: stdin is a dump of database") and "--from-bot" in line
    with pg.connect(db(dst)) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'notes'").fetchone() == (0,)

    done = raw(fleet, "restore", dst, "-", "--no-checksum", "--from-bot", src, stdin=dump)
    assert done.returncode == 0, done.stderr.decode()
    assert b"restored" in done.stdout and b"stdin" in done.stdout
    assert fingerprint(pg, dst) == before


def test_restore_from_stdin_backs_up_a_non_empty_database_first(fleet, pg):
    name = fleet.name("st-over")
    fleet.add(name)
    small_fill(pg, name, rows=30)
    dump = raw(fleet, "backup", name, "--output", "-").stdout
    with as_bot(pg, name) as conn:
        conn.execute("INSERT INTO notes VALUES (1000, 'after the dump')")

    refused = raw(fleet, "restore", name, "-", "--no-checksum", stdin=dump)  # no --yes, no terminal to ask on
    assert refused.returncode == 2 and "--yes" in errors(refused.stderr)[0]
    assert count(pg, name) == 31 and not dumps(fleet, name)

    done = raw(fleet, "restore", name, "-", "--no-checksum", "--yes", stdin=dump)
    assert done.returncode == 0, done.stderr.decode()
    assert count(pg, name) == 30
    (safety,) = dumps(fleet, name)  # what the database held, written before it was replaced
    assert str(safety).encode() in done.stdout
    listed = json.loads(fleet.run("backups", name, "--json").stdout)
    assert [(r["path"], r["checksum"]) for r in listed] == [(str(safety), "ok")]


def test_pipes_refuse_a_terminal_and_bad_input_changes_nothing(fleet, pg, admin):
    name = fleet.name("st-bad")
    other = fleet.name("st-bad2")
    fleet.add(name)
    fleet.add(other)
    small_fill(pg, name)
    before = snapshot(admin)

    controller, terminal = os.openpty()
    try:
        on_tty = raw(fleet, "backup", name, "--output", "-", stdout=terminal)
        assert on_tty.returncode == 2
        (line,) = errors(on_tty.stderr)
        assert "stdout is a terminal" in line
        from_tty = raw(fleet, "restore", name, "-", "--no-checksum", "--yes", stdin=terminal)
        assert from_tty.returncode == 2
        (line,) = errors(from_tty.stderr)
        assert "stdin, which is a terminal" in line
    finally:
        os.close(controller)
        os.close(terminal)

    for args, needle in (((name, other), "exactly one bot"), (("--all",), "exactly one bot"),
                         ((name, "--keep", "2"), "--keep"), ((name, "--json"), "--json"),
                         ((name, "--output", "dump.bin"), "only -"), (("nope-bot",), "not in the fleet registry")):
        proc = raw(fleet, "backup", *args, *(() if "--output" in args else ("--output", "-")))
        assert proc.returncode == 2, (args, proc.stderr.decode())
        assert proc.stdout == b"" or proc.stdout.startswith(b"{")  # never a dump
        (line,) = errors(proc.stderr)
        assert needle in line, (args, line)
    empty = raw(fleet, "restore", name, "-", "--no-checksum", "--yes", stdin=b"")
    assert empty.returncode == 2 and "0 bytes" in errors(empty.stderr)[0]
    junk = raw(fleet, "restore", name, "-", "--no-checksum", "--yes", stdin=b"not a dump\n" * 10)
    assert junk.returncode == 2 and "not a pg_dump archive" in errors(junk.stderr)[0]
    unknown = raw(fleet, "restore", "nope-bot", "-", "--no-checksum", stdin=b"x")
    assert unknown.returncode == 2 and "not in the fleet registry" in errors(unknown.stderr)[0]

    assert count(pg, name) == 50
    assert snapshot(admin) == before
    assert not (fleet.root / "backups").exists()


def test_backups_lists_size_age_and_checksum_state(fleet):
    a, b = fleet.name("ls-a"), fleet.name("ls-b")
    fleet.add(a)
    fleet.add(b)
    (first,) = backup(fleet, a)
    (second,) = backup(fleet, a)
    (only_b,) = backup(fleet, b)
    folder = fleet.root / "backups" / a
    hand = folder / "by-hand.dump"  # a dump botfleet did not write: listed, its checksum missing
    hand.write_bytes(b"PGDMP by hand")
    with open(second["path"], "ab") as fh:
        fh.write(b"x")

    proc = fleet.run("backups", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {first["path"], second["path"], str(hand), only_b["path"]}
    assert by_path[first["path"]]["checksum"] == "ok" and by_path[only_b["path"]]["checksum"] == "ok"
    assert by_path[second["path"]]["checksum"] == "mismatch"
    assert by_path[str(hand)]["checksum"] == "missing"
    assert by_path[first["path"]]["size_bytes"] == first["size_bytes"]
    assert by_path[second["path"]]["size_bytes"] == second["size_bytes"] + 1
    assert all(r["age_seconds"] >= 0 and r["created"].endswith("Z") for r in rows)
    assert [r["bot"] for r in rows] == sorted(r["bot"] for r in rows)
    assert "1 dump(s) do not match" in proc.stderr and second["path"] in proc.stderr

    table = fleet.run("backups", b)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["BOT", "FILE", "SIZE", "AGE", "CHECKSUM"]
    assert len(lines) == 1 and lines[0].split()[0] == b and lines[0].split()[1] == only_b["path"]
    assert lines[0].split()[-1] == "ok"

    none = fleet.run("backups", fleet.name("ls-none"))
    assert none.returncode == 0 and "no backups of" in none.stdout
    bad = fleet.run("backups", "Bad_Name")
    assert bad.returncode == 2 and len(errors(bad.stderr)) == 1


def test_backups_in_a_folder_without_a_fleet_says_so(fleet):
    proc = fleet.run("backups")
    assert proc.returncode == 2
    (line,) = errors(proc.stderr)
    assert line.startswith("error: no fleet here:") and str(fleet.root) in line
    assert list(fleet.root.iterdir()) == []
