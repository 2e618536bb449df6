"""A bot's code changed under a database another code migrated (issue 15 item 6).

`add-bot NAME --code OTHER` on a bot whose database holds a revision OTHER's migrations
do not know is refused before anything changes, with the way out; on a bot whose database
was never migrated it proceeds. A code changed by hand in fleet.toml is reported by `plan`
(no migration proposed that cannot run) and by `doctor`.
"""

from __future__ import annotations

import json

from .conftest import other_fleets, snapshot, tree
from .test_declarative import edit

CHAT_HEAD = "d748a81eff93"


def test_add_bot_refuses_a_code_change_over_another_codes_revision(code_fleet, admin):
    name = code_fleet.name("cc")
    code_fleet.add(name, "--code", "chat-bot")
    before, files = snapshot(admin), tree(code_fleet.root)
    registry, env = (code_fleet.root / "fleet.toml").read_text(), code_fleet.env_file(name).read_text()

    proc = code_fleet.run("add-bot", name, "--code", "hello-bot")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert CHAT_HEAD in errors[0] and "hello_bot" in errors[0]
    assert f"provision backup {name}" in errors[0] and "remove-bot" in errors[0] and "new bot" in errors[0]
    assert snapshot(admin) == before and tree(code_fleet.root) == files
    assert (code_fleet.root / "fleet.toml").read_text() == registry and code_fleet.env_file(name).read_text() == env

    assert code_fleet.run("add-bot", name, "--code", "chat_bot").returncode == 0, "the same code, spelt the other way"

    fresh = code_fleet.name("cc")  # a database never migrated may change code
    code_fleet.add(fresh, "--code", "chat-bot", "--no-migrate")
    proc = code_fleet.run("add-bot", fresh, "--code", "feishu-bot")
    assert proc.returncode == 0, proc.stderr
    assert 'code = "feishu-bot"' in (code_fleet.root / "fleet.toml").read_text()
    assert "schema            upgraded: base -> " in proc.stdout


def test_plan_and_doctor_report_a_revision_the_code_does_not_know(code_fleet):
    name = code_fleet.name("cc")
    code_fleet.add(name, "--code", "chat-bot")
    edit(code_fleet, 'code = "chat-bot"', 'code = "hello-bot"')  # changed by hand

    proc = code_fleet.run("plan", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert not [s for s in result["steps"] if s["action"] == "migrate" and s["subject"] == name], \
        "no migration is proposed that cannot run"
    notes = [n for n in result["notes"] if name in n and CHAT_HEAD in n]
    assert notes and "hello_bot" in notes[0], result["notes"]

    proc = code_fleet.run("doctor", "--json", *other_fleets())
    assert proc.returncode == 1, proc.stderr
    found = [f for f in json.loads(proc.stdout)["remaining"] if f["bot"] == name and CHAT_HEAD in f["message"]]
    assert found and found[0]["check"] == "revision" and not found[0]["fixable"], proc.stdout
    assert f"provision backup {name}" in found[0]["fix"]
