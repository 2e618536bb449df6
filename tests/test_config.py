"""`provision config set | unset | list`: a bot's own settings in its 0600 env file.

Against the real test server: the bots are provisioned by add-bot; config itself
never needs a server. Values never show in set/unset output or progress, and stay
out of fleet.toml and the compose files.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from provisioning import codes, commands
from provisioning.envfile import EnvFile, format_value, unquote
from provisioning.errors import InvalidInput, ProvisionError
from provisioning.project import Project

from .conftest import REPO, assert_no_leak

TOKEN = "123456:AAF-t0ken_never.shown"
GREETING = "hi there, $HOME # not a comment {\"json\": [1]}"  # needs quoting: spaces, $, #, "


def settings_of(fleet, name: str) -> dict[str, str]:
    """The bot's own settings as botfleet reads them back."""
    return {k: v for k, v in EnvFile.read(fleet.env_file(name)).values.items()
            if not (k.startswith("DATABASE_URL") or k.startswith("DB_"))}


def sourced(path: Path, *keys: str) -> list[str]:
    """What a POSIX shell reads from the env file (`set -a; . FILE`, as bots/README.md does)."""
    script = 'set -a; . "$0"; ' + "; ".join(f'printf "%s\\0" "${key}"' for key in keys)
    proc = subprocess.run(["sh", "-c", script, str(path)], capture_output=True, text=True, check=True)
    return proc.stdout.split("\0")[:-1]


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    return errors[0]


def test_set_list_unset_with_masking_show_and_json(fleet):
    name = fleet.name("cfg")
    fleet.add(name)
    password = fleet.password(name)

    proc = fleet.run("config", "set", name, f"BOT_TOKEN={TOKEN}", f"GREETING={GREETING}")
    assert proc.returncode == 0, proc.stderr
    assert f"{name}: set BOT_TOKEN, GREETING" in proc.stdout
    path = fleet.env_file(name)
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert f"BOT_TOKEN={TOKEN}\n" in text and f"GREETING='{GREETING}'\n" in text  # the quoting rule
    assert settings_of(fleet, name) == {"BOT_TOKEN": TOKEN, "GREETING": GREETING}
    assert sourced(path, "BOT_TOKEN", "GREETING") == [TOKEN, GREETING], "a shell reads the same values"
    assert fleet.password(name) == password, "the credentials are untouched"

    again = fleet.run("config", "set", name, f"BOT_TOKEN={TOKEN}", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["unchanged"] == ["BOT_TOKEN"]
    assert json.loads(again.stdout)["changed"] == []

    listed = fleet.run("config", "list", name)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["KEY        VALUE", "BOT_TOKEN  ********", "GREETING   ********"]
    shown = fleet.run("config", "list", name, "--show")
    assert f"BOT_TOKEN  {TOKEN}" in shown.stdout and GREETING in shown.stdout
    masked = json.loads(fleet.run("config", "list", name, "--json").stdout)
    assert masked["settings"] == {"BOT_TOKEN": "********", "GREETING": "********"} and masked["missing"] == []
    full = json.loads(fleet.run("config", "list", name, "--json", "--show").stdout)
    assert full["settings"] == {"BOT_TOKEN": TOKEN, "GREETING": GREETING}
    assert "DATABASE_URL" not in full["settings"] and password not in json.dumps(full), "botfleet's keys are not listed"

    unset = fleet.run("config", "unset", name, "GREETING", "NEVER_SET")
    assert unset.returncode == 0, unset.stderr
    assert f"{name}: unset GREETING" in unset.stdout and "not set: NEVER_SET" in unset.stdout
    assert settings_of(fleet, name) == {"BOT_TOKEN": TOKEN}
    assert "GREETING" not in path.read_text()
    assert fleet.run("config", "unset", name, "GREETING").stdout.startswith(f"{name}: nothing to change")

    masked_proc = fleet.run("config", "list", name, "--json")
    for p in (proc, again, listed, masked_proc, unset):
        for secret in (TOKEN, GREETING, password):
            assert_no_leak(secret, p.stdout, p.stderr, where="config output")
    assert_no_leak(TOKEN, (fleet.root / "fleet.toml").read_text(), where="fleet.toml")


def test_bad_input_is_one_line_exit_2_and_changes_nothing(fleet):
    name = fleet.name("bad")
    fleet.add(name)
    assert fleet.run("config", "set", name, f"BOT_TOKEN={TOKEN}").returncode == 0
    path = fleet.env_file(name)
    before = path.read_bytes()
    secret = "s3cret-value-in-a-bad-call"
    cases = {
        ("set", name, f"bot_token={secret}"): "is not a setting name",
        ("set", name, f"1TOKEN={secret}"): "is not a setting name",
        ("set", name, f"BOT-TOKEN={secret}"): "is not a setting name",
        ("set", name, f"=={secret}"): "is not a setting name",
        ("set", name, f"DATABASE_URL={secret}"): "DATABASE_URL is reserved",
        ("set", name, f"DATABASE_URL_FILE={secret}"): "DATABASE_URL_FILE is reserved",
        ("set", name, f"DB_POOL_SIZE={secret}"): "DB_POOL_SIZE is reserved",
        ("set", name, f"DB_MAX_OVERFLOW={secret}"): "DB_MAX_OVERFLOW is reserved",
        ("set", name, secret): "setting 1 is not KEY=VALUE",
        ("set", name, "OK=1", f"{secret}"): "setting 2 is not KEY=VALUE",
        ("set", name, f"A={secret}", f"A={secret}x"): "A is given twice",
        ("set", name, f"A=it's {secret}"): "the value of A holds a single quote",
        ("set", name, f"A={secret}\\"): "the value of A holds a backslash",
        ("set", name, f"A={secret}\nDATABASE_URL=x"): "the value of A holds a line break",
        ("set", name, f"A={secret}\r"): "the value of A holds a line break",
        ("set", name, f"A={secret}\u2028"): "the value of A holds a line break",
        ("set", name, f"A=\t{secret}"): "the value of A holds a control character",
        ("set", f"{name}-nope", f"A={secret}"): "not in the fleet registry",
        ("set", "Not_A_Bot", f"A={secret}"): "",
        ("set", "../../etc/passwd", f"A={secret}"): "",
        ("unset", name, "bot_token"): "is not a setting name",
        ("unset", name, "DATABASE_URL"): "DATABASE_URL is reserved",
        ("unset", f"{name}-nope", "BOT_TOKEN"): "not in the fleet registry",
        ("list", f"{name}-nope"): "not in the fleet registry",
    }
    for args, words in cases.items():
        proc = fleet.run("config", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in one_error(proc), (args, proc.stderr)
        assert proc.stdout == ""
        assert_no_leak(secret, proc.stdout, proc.stderr, where=f"error of config {args[0]}")
        assert_no_leak(TOKEN, proc.stdout, proc.stderr, where=f"error of config {args[0]}")
        assert path.read_bytes() == before, f"config {args} changed the env file"
    assert not (fleet.root / "secrets" / f"{name}-nope.env").exists()
    assert sorted(p.name for p in (fleet.root / "secrets").iterdir()) == [f"{name}.env"]

    # The library refuses what cannot come through a command line, too (a NUL byte).
    project = Project(fleet.root)
    with pytest.raises(InvalidInput, match="the value of A holds a NUL byte") as err:
        commands.config_set(project, name, {"A": f"{secret}\0"})
    assert secret not in str(err.value)
    with pytest.raises(InvalidInput):
        commands.config_set(project, name, {})
    assert path.read_bytes() == before


def test_settings_survive_add_bot_rotate_password_apply_and_render(fleet):
    name = fleet.name("keep")
    fleet.add(name)
    env = fleet.env_file(name)
    with env.open("a") as fh:  # a comment of the operator's own, kept too
        fh.write("# the operator's note\n")
    assert fleet.run("config", "set", name, f"BOT_TOKEN={TOKEN}", f"GREETING={GREETING}").returncode == 0
    want = {"BOT_TOKEN": TOKEN, "GREETING": GREETING}

    def kept(step: str) -> None:
        assert settings_of(fleet, name) == want, f"{step} lost a setting"
        assert "# the operator's note\n" in env.read_text(), f"{step} lost a comment"
        assert (env.stat().st_mode & 0o777) == 0o600

    password = fleet.password(name)
    fleet.add(name)
    kept("add-bot")
    fleet.add(name, "--pool-size", "3")  # the file is rewritten (DB_POOL_SIZE changes)
    assert "DB_POOL_SIZE=3\n" in env.read_text()
    kept("add-bot --pool-size")

    proc = fleet.run("rotate-password", name)
    assert proc.returncode == 0, proc.stderr
    assert fleet.password(name) != password, "rotate-password rewrote the file"
    kept("rotate-password")

    registry = fleet.root / "fleet.toml"
    registry.write_text(registry.read_text().replace("\npool_size = 3\n", "\npool_size = 4\n", 1))
    proc = fleet.run("apply")
    assert proc.returncode == 0, proc.stderr
    assert "DB_POOL_SIZE=4\n" in env.read_text(), "apply rewrote the file"
    kept("apply")

    proc = fleet.run("render")
    assert proc.returncode == 0, proc.stderr
    kept("render")
    for rendered in ("fleet.toml", "compose.yaml", "compose.stack.yaml"):
        text = (fleet.root / rendered).read_text()
        for secret in want.values():
            assert_no_leak(secret, text, where=rendered)
    # With a stack rendered, config set re-renders it (no value in it either).
    assert fleet.run("config", "set", name, "EXTRA=1").returncode == 0
    want["EXTRA"] = "1"
    assert_no_leak(TOKEN, (fleet.root / "compose.stack.yaml").read_text(), where="compose.stack.yaml")
    kept("config set after render")


def test_concurrent_config_set_processes_lose_nothing(fleet):
    name = fleet.name("race")
    fleet.add(name)
    results: dict[int, subprocess.CompletedProcess] = {}

    def one(i: int) -> None:
        results[i] = fleet.run_process("config", "set", name, f"KEY_{i}=value-{i}", f"SHARED=from-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p.returncode == 0 for p in results.values()), [p.stderr for p in results.values()]
    got = settings_of(fleet, name)
    assert {k: v for k, v in got.items() if k.startswith("KEY_")} == {f"KEY_{i}": f"value-{i}" for i in range(8)}
    assert got["SHARED"] in {f"from-{i}" for i in range(8)}
    assert fleet.env_file(name).read_text().count("SHARED=") == 1
    assert EnvFile.read(fleet.env_file(name)).credentials() is not None, "the credentials survived"

    # Processes take long to start, so their writes rarely meet: threads of the library meet
    # all the time (each read-modify-write is under the lock, or a key would be lost).
    project = Project(fleet.root)

    def many(t: int) -> None:
        for i in range(25):
            commands.config_set(project, name, {f"T{t}_{i}": f"v{i}"})

    threads = [threading.Thread(target=many, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = settings_of(fleet, name)
    assert {k for k in got if k.startswith("T")} == {f"T{t}_{i}" for t in range(8) for i in range(25)}
    assert len(got) == 8 + 1 + 8 * 25


def test_required_settings_are_read_without_importing_the_code_and_reported_missing(fleet, tmp_path):
    assert codes.required_settings(REPO, "hello-bot") == ("BOT_TOKEN",)
    assert codes.required_settings(REPO, "feishu_bot") == ("FEISHU_VERIFICATION_TOKEN",)
    assert codes.required_settings(REPO, "chat-bot") == ()
    assert codes.required_settings(REPO, "no-such-code") == ()

    # The fleet's own bots/: a code that would fail if imported, and one that declares badly.
    loud = fleet.root / "bots" / "loud_bot"
    loud.mkdir(parents=True)
    (loud / "__init__.py").write_text('raise SystemExit("imported!")\nREQUIRED_SETTINGS: tuple[str, ...] = '
                                      '("API_KEY", "API_SECRET")\n')
    assert codes.required_settings(fleet.root, "loud-bot") == ("API_KEY", "API_SECRET")
    bad = fleet.root / "bots" / "bad_bot"
    bad.mkdir()
    (bad / "__init__.py").write_text("REQUIRED_SETTINGS = ('lower case',)\n")
    with pytest.raises(ProvisionError, match="REQUIRED_SETTINGS must be a literal tuple"):
        codes.required_settings(fleet.root, "bad-bot")

    name, bare = fleet.name("loud"), fleet.name("bare")
    fleet.add(name, "--code", "loud-bot", "--no-migrate")
    fleet.add(bare)  # no code yet: nothing required
    listed = fleet.run("config", "list", name)
    assert listed.returncode == 0, listed.stderr
    assert "missing: API_KEY, API_SECRET (required by loud-bot)" in listed.stdout
    assert json.loads(fleet.run("config", "list", name, "--json").stdout)["missing"] == ["API_KEY", "API_SECRET"]
    assert commands.missing_settings(Project(fleet.root)) == {name: ["API_KEY", "API_SECRET"]}

    proc = fleet.run("config", "set", name, "API_KEY=k")
    assert proc.returncode == 0 and "missing: API_SECRET (required by its code)" in proc.stdout
    fleet.run("config", "set", name, "API_SECRET=")  # set, but empty: still missing
    assert commands.missing_settings(Project(fleet.root)) == {name: ["API_SECRET"]}
    assert fleet.run("config", "set", name, "API_SECRET=s").returncode == 0
    assert commands.missing_settings(Project(fleet.root)) == {}
    assert "missing" not in fleet.run("config", "list", name).stdout


@pytest.mark.parametrize("value", ["", "plain", "123456:ABC-def_ghi.jkl", "a=b,c/d@e%f+g^h", " spaced ", "$HOME",
                                   "${HOME}", "a # b", "#start", '{"k": "v"}', "`uname`", "~/x", "a;b|c&d", "é ü 中文",
                                   "trailing ", "\u00a0nbsp"])
def test_the_quoting_rule_reads_back_the_same_value(value, tmp_path):
    """What botfleet writes, its parser and a POSIX shell read back unchanged (docker compose's
    env_file parser reads bare values and single-quoted ones the same way)."""
    line = f"KEY={format_value(value)}"
    assert unquote(line.split("=", 1)[1]) == value
    path = tmp_path / "x.env"
    path.write_text(f"# comment\n{line}\nOTHER=1\n", encoding="utf-8")
    assert EnvFile.read(path).values["KEY"] == value
    assert sourced(path, "KEY", "OTHER") == [value, "1"]


def test_hand_written_quoted_lines_are_read_as_compose_reads_them(tmp_path):
    path = tmp_path / "x.env"
    path.write_text("A='single # kept'  # comment\nB=\"dq \\\"x\\\" \\n\"\nC=bare # comment\nD=  padded  \n")
    values = EnvFile.read(path).values
    assert values == {"A": "single # kept", "B": 'dq "x" \n', "C": "bare", "D": "padded"}


def test_listing_and_change_results_never_show_a_value_in_their_repr(fleet):
    name = fleet.name("repr")
    fleet.add(name)
    project = Project(fleet.root)
    commands.config_set(project, name, {"BOT_TOKEN": TOKEN})
    messages: list[str] = []
    changed = commands.config_set(project, name, {"BOT_TOKEN": TOKEN + "2"}, progress=messages.append)
    listing = commands.config_list(project, name)
    assert listing.values == {"BOT_TOKEN": TOKEN + "2"}
    for text in (repr(changed), repr(listing), json.dumps(changed.as_dict()), json.dumps(listing.as_dict()), *messages):
        assert_no_leak(TOKEN, text, where="a result")
    assert changed.changed == ["BOT_TOKEN"] and messages
