"""The everyday commands (issue 15): --version, info, env, run, psql, the typed confirmation of
remove-bot and rotate-password --all, and errors as JSON under --json. On a real server;
the password tests on the embedded SCRAM cluster, where a wrong password is refused."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from .conftest import PROVISION, assert_no_leak, db, role, snapshot


def exists(admin, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db(name),)).fetchone() is not None


def closed_stdout_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real console script with its stdout a pipe nobody reads (`provision ... | head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([PROVISION, *args], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env=env, timeout=120)
    finally:
        os.close(write_end)


def on_a_terminal(args: list[str], env: dict[str, str], answer: str) -> subprocess.CompletedProcess:
    """The real console script with a terminal on its stdin, answering its prompt with ``answer``
    (typed ahead: the terminal keeps the line until the command reads it)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([PROVISION, *args], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# -- --version ---------------------------------------------------------------------------------

def test_version_is_the_package_version(fleet):
    for proc in (fleet.run("--version"), fleet.run_process("--version")):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"botfleet {version('botfleet')}\n"
    assert list(fleet.root.iterdir()) == []


# -- info ----------------------------------------------------------------------------------------

def test_info_shows_one_bot_in_full_without_its_password(code_fleet):
    name = code_fleet.name("info")
    code_fleet.add(name, "--code", "hello-bot", "--replicas", "2")
    backed = code_fleet.run("backup", name, "--json")
    assert backed.returncode == 0, backed.stderr
    dump = json.loads(backed.stdout)[0]["path"]
    password = code_fleet.password(name)

    proc = code_fleet.run("info", name, "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert (found["bot"], found["server"], found["status"]) == (name, "default", "ok")
    assert (found["database"], found["role"]) == (db(name), role(name))
    assert (found["pool_size"], found["max_overflow"], found["replicas"]) == (2, 3, 2)
    assert found["connection_limit"] == found["role_connection_limit"] == 11
    assert found["database_connection_limit"] == 12
    assert found["code_package"] == "hello_bot"
    assert found["revision"] and found["revision"] == found["head"] and found["revision_state"] == "at head"
    assert found["size_bytes"] > 0 and isinstance(found["connections"], int)
    assert found["env_file"] == str(code_fleet.env_file(name))
    assert found["last_backup"]["path"] == dump and found["last_backup"]["age_seconds"] >= 0
    assert found["database_url"].endswith(f"{role(name)}:********@postgres:5432/{db(name)}")

    text = code_fleet.run("info", name)
    assert text.returncode == 0, text.stderr
    assert f"{name}: ok" in text.stdout and dump in text.stdout and "at head" in text.stdout
    for proc in (proc, text):
        assert_no_leak(password, proc.stdout, proc.stderr)

    # behind its code's head: the state says so
    code_fleet.run("downgrade", name, "base", "--yes", "--no-backup")
    behind = json.loads(code_fleet.run("info", name, "--json").stdout)
    assert behind["revision"] is None and behind["revision_state"].startswith("behind by ")


def test_info_url_is_the_only_way_to_the_password(fleet):
    name = fleet.name("url")
    fleet.add(name)
    url = fleet.env_file(name).read_text().split("DATABASE_URL=", 1)[1].splitlines()[0]
    password = fleet.password(name)
    proc = fleet.run("info", name, "--url")
    assert proc.returncode == 0 and proc.stdout == url + "\n"
    assert_no_leak(password, proc.stderr, where="stderr")
    as_json = fleet.run("info", name, "--url", "--json")
    assert json.loads(as_json.stdout) == {"bot": name, "database_url": url}
    # a closed stdout: status 1, not a word (the password goes nowhere else)
    closed = closed_stdout_run(["info", name, "--url"], fleet.env())
    assert closed.returncode == 1 and closed.stderr == ""


# -- env -----------------------------------------------------------------------------------------

def test_env_prints_export_lines_a_shell_reads_back(fleet):
    name = fleet.name("env")
    fleet.add(name)
    prompt = 'Be brief; say "hi" to $USER & `whoami` #1'
    assert fleet.run("config", "set", name, f"SYSTEM_PROMPT={prompt}", "BOT_TOKEN=123:abc").returncode == 0
    proc = fleet.run("env", name)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(re.fullmatch(r"export [A-Z_][A-Z0-9_]*=.*", line) for line in lines), proc.stdout
    assert_no_leak(fleet.password(name), proc.stderr, where="stderr")

    shell = subprocess.run(["bash", "-c", proc.stdout + "\nenv -0"], capture_output=True, timeout=60,
                           env={"PATH": os.environ["PATH"]})
    seen = dict(item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item)
    assert seen["SYSTEM_PROMPT"] == prompt and seen["BOT_TOKEN"] == "123:abc"
    assert (seen["BOTFLEET_BOT"], seen["DB_POOL_SIZE"], seen["DB_MAX_OVERFLOW"]) == (name, "2", "3")
    # the env file's URL points at the stack's postgres; from the host it is the admin URL's host and port
    assert "@postgres:5432/" in fleet.env_file(name).read_text()
    # (an embedded server's admin URL is its socket: the bots' side of it is 127.0.0.1 on its port)
    port = fleet.server.embedded.status().port if fleet.server.embedded else 5432
    assert seen["DATABASE_URL"] == (f"postgresql+asyncpg://{role(name)}:{fleet.password(name)}"
                                    f"@127.0.0.1:{port}/{db(name)}")
    closed = closed_stdout_run(["env", name], fleet.env())
    assert closed.returncode == 1 and closed.stderr.startswith("server: ") and "error" not in closed.stderr
    assert_no_leak(fleet.password(name), closed.stderr, where="stderr")


# -- run -----------------------------------------------------------------------------------------

CURRENT_USER = ("import os, psycopg; "
                "url = os.environ['DATABASE_URL'].replace('postgresql+asyncpg://', 'postgresql://'); "
                "print(psycopg.connect(url).execute('select current_user').fetchone()[0], os.environ['BOT_TOKEN'])")

SHARED_LAYER = ("import asyncio, sys; from sqlalchemy import text; from shared import Database\n"
                "async def main():\n"
                "    db = Database.from_env('bot')\n"
                "    async with db.unit_of_work() as s:\n"
                "        print((await s.execute(text('select current_user'))).scalar_one())\n"
                "    await db.dispose()\n"
                "asyncio.run(main())")


def test_run_gives_the_command_the_bots_environment(scram_fleet, tmp_path):
    """Over SCRAM on TCP: the password reached the command through its environment."""
    name = scram_fleet.name("run")
    scram_fleet.add(name)
    scram_fleet.run("config", "set", name, "BOT_TOKEN=42:xyz")
    password = scram_fleet.password(name)
    # the caller's own DATABASE_URL_FILE / BOT_TOKEN_FILE would clash with the injected variables
    env = scram_fleet.env(DATABASE_URL_FILE=str(tmp_path / "nope"), BOT_TOKEN_FILE=str(tmp_path / "nope"))
    proc = scram_fleet.run_process("run", name, "--", sys.executable, "-c", CURRENT_USER, env=env)
    assert proc.returncode == 0, masked_err(proc, password)
    assert proc.stdout == f"{role(name)} 42:xyz\n"
    assert_no_leak(password, proc.stdout, proc.stderr)

    shared = scram_fleet.run_process("run", name, "--", sys.executable, "-c", SHARED_LAYER, env=env)
    assert shared.returncode == 0 and shared.stdout == f"{role(name)}\n", masked_err(shared, password)

    # the command's own arguments hold no password, and its exit status is provision's
    argv = scram_fleet.run_process("run", name, "--", sys.executable, "-c",
                                   "import sys; print(open('/proc/self/cmdline').read()); sys.exit(7)")
    assert argv.returncode == 7
    assert_no_leak(password, argv.stdout, argv.stderr, where="command's argv")


def masked_err(proc: subprocess.CompletedProcess, password: str) -> str:
    return (proc.stdout + proc.stderr).replace(password, "<password>")


# -- psql ----------------------------------------------------------------------------------------

def test_psql_as_the_bot_with_a_passfile_and_as_the_admin(scram_fleet, tmp_path):
    name = scram_fleet.name("psql")
    scram_fleet.add(name)
    password = scram_fleet.password(name)
    temp = tmp_path / "tmp"
    temp.mkdir()
    # the operator's own PGPASSWORD must not be what the bot logs in with
    env = scram_fleet.env(TMPDIR=str(temp), PGPASSWORD="not-the-bots-password")
    probe = "\\! stat -c %a \"$PGPASSFILE\"; tr '\\0' ' ' < /proc/$PPID/cmdline"
    proc = scram_fleet.run_process("psql", name, "--", "-At", "-c", "select current_user, current_database()",
                                   "-c", probe, env=env)
    assert proc.returncode == 0, masked_err(proc, password)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{role(name)}|{db(name)}"
    assert lines[1] == "600"  # the passfile, while psql runs
    assert "psql" in lines[2]  # psql's own argv ...
    assert_no_leak(password, proc.stdout, proc.stderr, where="psql's argv or output")  # ... holds no password
    assert list(temp.iterdir()) == []  # the passfile is gone

    admin = scram_fleet.run_process("psql", name, "--admin", "--", "-At", "-c", "select current_user, current_database()")
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout == f"postgres|{db(name)}\n"

    failed = scram_fleet.run_process("psql", name, "--", "-c", "select nope")
    assert failed.returncode != 0 and "nope" in failed.stderr


# -- bad input: unknown bot, wrong server, no command, no credentials, JSON errors --------------

@pytest.mark.parametrize("args", [("info", "{bot}"), ("info", "{bot}", "--url"), ("env", "{bot}"),
                                  ("run", "{bot}", "--", "true"), ("psql", "{bot}", "--", "-c", "select 1")])
def test_an_unknown_bot_is_refused_and_nothing_is_created(fleet, admin, args):
    before = snapshot(admin)
    for bot, why in (("no-such-bot", "not in the fleet registry: no-such-bot"), ("Bad_Name", "invalid bot name")):
        proc = fleet.run(*(a.format(bot=bot) for a in args))
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {why}"), proc.stderr
        assert proc.stdout == "" and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert list(fleet.root.iterdir()) == []  # no fleet.toml: no embedded server, no folder made
    assert snapshot(admin) == before


def test_run_without_a_command_or_with_an_unknown_one_is_bad_input(fleet):
    name = fleet.name("cmd")
    fleet.add(name)
    for extra, needle in (((), "give the command"), (("--", "no-such-command-xyz"), "command not found")):
        proc = fleet.run("run", name, *extra)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_a_bot_the_server_does_not_have_is_named_not_run(fleet, other_server):
    """ADMIN_DATABASE_URL points at another server than the one the bot was made on."""
    name = fleet.name("where")
    fleet.add(name)
    env = fleet.env(ADMIN_DATABASE_URL=other_server.url)
    for args in (("run", name, "--", "true"), ("psql", name, "--", "-c", "select 1")):
        proc = fleet.run(*args, env=env)
        assert proc.returncode == 1 and "is not on server default" in proc.stderr, proc.stderr
        assert_no_leak(fleet.password(name), proc.stdout, proc.stderr)
    proc = fleet.run("info", name, "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "missing"

    # a server that does not answer: one line, exit 1
    env = fleet.env(ADMIN_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres")
    for args in (("info", name), ("psql", name), ("run", name, "--", "true")):
        proc = fleet.run(*args, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "cannot reach PostgreSQL" in errors[0], proc.stderr


def test_a_bot_without_credentials_says_how_to_restore_them(fleet):
    name = fleet.name("nocreds")
    fleet.add(name)
    fleet.env_file(name).unlink()
    for args in (("env", name), ("info", name, "--url"), ("run", name, "--", "true"), ("psql", name)):
        proc = fleet.run(*args)
        assert proc.returncode == 1 and f"provision add-bot {name}" in proc.stderr, (args, proc.stderr)


def test_under_json_an_error_is_a_json_object_on_stdout(fleet):
    proc = fleet.run("info", "no-such-bot", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"error": "not in the fleet registry: no-such-bot (see provision list)",
                                       "exit_code": 2}
    assert proc.stderr.startswith("error: not in the fleet registry")
    # a server error, with the same exit code
    env = fleet.env(ADMIN_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres")
    proc = fleet.run("list", "--json", env=env)
    out = json.loads(proc.stdout)
    assert proc.returncode == out["exit_code"] == 1 and out["error"].startswith("cannot reach PostgreSQL")
    # a usage error
    proc = fleet.run("list", "--json", "--bogus")
    assert proc.returncode == 2 and json.loads(proc.stdout)["exit_code"] == 2
    # without --json stdout stays empty
    proc = fleet.run("info", "no-such-bot")
    assert proc.returncode == 2 and proc.stdout == ""


# -- confirmations -----------------------------------------------------------------------------

def test_remove_bot_asks_for_the_bots_name_on_a_terminal(fleet, admin):
    name = fleet.name("typed")
    fleet.add(name)
    for answer in ("y", "yes", name + "x"):
        proc = on_a_terminal(["remove-bot", name], fleet.env(), answer)
        assert proc.returncode == 1 and "nothing was changed" in proc.stderr, proc.stderr
        assert f"Type {name} to confirm" in proc.stderr
        assert exists(admin, name) and fleet.env_file(name).exists()
    proc = on_a_terminal(["remove-bot", name], fleet.env(), name)
    assert proc.returncode == 0, proc.stderr
    assert "removed" in proc.stdout
    assert not exists(admin, name) and not fleet.env_file(name).exists()


def test_rotate_password_all_asks_and_refuses_without_a_terminal(fleet):
    a, b = fleet.name("rot-a"), fleet.name("rot-b")
    fleet.add(a)
    fleet.add(b)
    before = {n: fleet.env_file(n).read_text() for n in (a, b)}
    proc = fleet.run("rotate-password", "--all")
    assert proc.returncode == 2 and "--yes" in proc.stderr, proc.stderr
    proc = on_a_terminal(["rotate-password", "--all"], fleet.env(), "n")
    assert proc.returncode == 1 and "rotate" not in proc.stdout
    assert {n: fleet.env_file(n).read_text() for n in (a, b)} == before
    proc = on_a_terminal(["rotate-password", "--all"], fleet.env(), "y")
    assert proc.returncode == 0, proc.stderr
    assert all(fleet.env_file(n).read_text() != before[n] for n in (a, b))
    # one named bot is not asked about
    assert fleet.run("rotate-password", a).returncode == 0


# -- the README's examples, as written ----------------------------------------------------------

def readme_block(title: str) -> list[str]:
    """The command lines of the first ```bash block after the README heading ``title``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"### {title}", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_examples_work_as_written(code_fleet):
    """Each line of the README's block, in a shell, with the bot's name made unique."""
    name = code_fleet.name("readme")
    code_fleet.add(name, "--code", "hello-bot")
    lines = readme_block("One bot from the shell: `info`, `env`, `run`, `psql`")
    assert len(lines) >= 8
    env = code_fleet.env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for line in lines:
        script = "set -e\n" + line.replace("hello-bot", name) + '\necho "DATABASE_URL=${DATABASE_URL:+set}"'
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL, cwd=code_fleet.root)
        assert proc.returncode == 0, (line, masked_err(proc, code_fleet.password(name)))
        if line.startswith("eval"):
            assert "DATABASE_URL=set" in proc.stdout
