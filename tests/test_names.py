"""Hostile and invalid bot names: exit code 2, one line, nothing changed anywhere."""

from __future__ import annotations

import pytest

from provisioning.errors import InvalidBotName
from provisioning.names import validate

from .conftest import snapshot, tree

HOSTILE = [
    "",
    "x'; DROP ROLE postgres; --",
    'bot"; DROP DATABASE postgres; --',
    "robert'); DROP TABLE students;--",
    "bot$$ language sql",
    "Bot",
    "BOT-UPPER",
    "1bot",
    "-bot",
    "_bot",
    "bot_name",
    "bot name",
    " bot",
    "bot\n",
    "bot\tx",
    "bøt",
    "бот",
    "bot\u200b",
    "ｂｏｔ",
    "a" * 41,
    "bot.name",
    "bot/../../etc",
    "bot%00",
    "postgres",
    "template0",
    "template1",
    "public",
    "pg-catalog",
    "pg-x",
    "pg",  # its role would be pg_user: PostgreSQL reserves pg_ role names
]


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n)[:30] for n in HOSTILE])
def test_validate_refuses(name):
    with pytest.raises(InvalidBotName):
        validate(name)


def test_validate_accepts_slugs_and_derives_names():
    names = validate("hello-bot")
    assert (names.database, names.role) == ("hello_bot_db", "hello_bot_user")
    assert validate("a" * 40).database == "a" * 40 + "_db"


def test_admin_role_name_is_reserved():
    with pytest.raises(InvalidBotName, match="reserved"):
        validate("ops", admin_role="ops")
    with pytest.raises(InvalidBotName, match="reserved"):
        validate("ops", admin_role="ops_user")


def test_cli_refuses_every_hostile_name_and_changes_nothing(fleet, admin):
    """Every name through the CLI, as a user would type them (in this process: see conftest)."""
    assert len(HOSTILE) >= 20
    before_server, before_files = snapshot(admin), tree(fleet.root)
    for name in HOSTILE:
        proc = fleet.run("add-bot", name)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
        assert proc.stdout == ""
    assert snapshot(admin) == before_server
    assert tree(fleet.root) == before_files == []


def test_cli_refuses_bad_options_before_touching_anything(fleet, admin):
    before = snapshot(admin)
    name = fleet.name("opts")
    for args in (["--pool-size", "0"], ["--max-overflow", "-1"], ["--replicas", "0"],
                 ["--statement-timeout", "1; DROP ROLE x"], ["--idle-timeout", "forever"],
                 ["--db-port", "70000"], ["--db-host", "a b"], ["--pool-size", "two"],
                 ["--statement-timeout", "999999999h"], ["--idle-timeout", "25000000s"], ["--publish", "70000"],
                 ["--memory", "lots"], ["--cpus", "-1"], ["--code", "../../../etc"], ["--code", "/etc"]):
        proc = fleet.run("add-bot", name, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, (args, proc.stderr)
    assert snapshot(admin) == before
    assert tree(fleet.root) == [], "a refused option writes no env file (nothing is left to clean up)"
    assert fleet.run("add-bot", name, "--statement-timeout", "24h").returncode == 0  # within the server's range


@pytest.mark.parametrize("name", ["x'; DROP ROLE postgres; --", "bot\n"], ids=["sql", "newline"])
def test_console_script_refuses_a_hostile_name_in_one_line(fleet, admin, name):
    """The real console script: exit status 2 and one error line, nothing changed."""
    before_server = snapshot(admin)
    proc = fleet.run_process("add-bot", name)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid bot name"), proc.stderr
    assert snapshot(admin) == before_server
    assert tree(fleet.root) == []
