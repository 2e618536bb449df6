"""One spelling of a bot code everywhere: ``hello-bot``; ``hello_bot`` (its package) is the same code."""

from __future__ import annotations

import json
import tomllib


def test_a_code_given_with_underscores_is_written_and_shown_with_dashes(fleet):
    name = fleet.name("spell")
    (fleet.root / "bots" / "spell_code").mkdir(parents=True)
    proc = fleet.run("add-bot", name, "--code", "spell_code", "--no-migrate")
    assert proc.returncode == 0, proc.stderr
    registry = tomllib.loads((fleet.root / "fleet.toml").read_text())
    assert registry["bots"][name]["code"] == "spell-code"
    listed = json.loads(fleet.run("list", "--json").stdout)
    assert [b["code"] for b in listed if b["bot"] == name] == ["spell-code"]
    # Either spelling names the same code: no code change, nothing to converge.
    again = fleet.run("add-bot", name, "--code", "spell-code", "--no-migrate", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already provisioned", again.stdout


def test_a_registry_that_spells_it_with_underscores_reads_as_dashes(fleet):
    name = fleet.name("spell")
    (fleet.root / "bots" / "spell_code").mkdir(parents=True)
    assert fleet.run("add-bot", name, "--code", "spell-code", "--no-migrate").returncode == 0
    path = fleet.root / "fleet.toml"
    path.write_text(path.read_text().replace('code = "spell-code"', 'code = "spell_code"'))
    listed = json.loads(fleet.run("list", "--json").stdout)
    assert [b["code"] for b in listed if b["bot"] == name] == ["spell-code"]
    plan = fleet.run("plan", "--json")
    assert plan.returncode == 0, plan.stdout + plan.stderr
