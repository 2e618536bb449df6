"""`provision plan` lists exactly the files `provision apply` then writes (issue 15 item 5).

A project with a rendered stack, bots added to fleet.toml by hand (their env files do not
exist yet, so their passwords are not known when plan runs) and a bot whose pool changed:
plan's file steps, in its text and in --json, are the files apply writes and deletes, not a
single "compose.yaml will be re-rendered".
"""

from __future__ import annotations

import json

from .test_declarative import append_bot, edit


def file_steps(result: dict) -> set[str]:
    return {s["subject"] for s in result["steps"] if s["action"] == "file"}


def test_plan_lists_every_file_apply_then_writes(code_fleet):
    first, second, third = code_fleet.name("pf"), code_fleet.name("pf"), code_fleet.name("pf")
    code_fleet.add(first, "--code", "chat-bot", "--no-migrate")
    assert code_fleet.run("render").returncode == 0
    append_bot(code_fleet, second, code="chat-bot")
    append_bot(code_fleet, third, code="chat-bot", pool_size=1)
    edit(code_fleet, "\npool_size = 2\n", "\npool_size = 3\n")  # the first bot's env file changes

    proc = code_fleet.run("plan", "--json", "--no-migrate")
    assert proc.returncode == 0, proc.stderr
    planned = file_steps(json.loads(proc.stdout))
    text = code_fleet.run("plan", "--no-migrate")
    assert text.returncode == 0, text.stderr
    listed = {line.split()[-1] for line in text.stdout.splitlines() if line.startswith("* file")}
    summary = [line for line in text.stdout.splitlines() if line.startswith("plan: ")]

    proc = code_fleet.run("apply", "--json", "--no-migrate")
    assert proc.returncode == 0, proc.stderr
    written = {r["subject"] for r in json.loads(proc.stdout)["results"] if r["action"] == "file" and r["ok"]}

    assert {f"secrets/{second}.url", f"secrets/{third}.url", "compose.yaml", "compose.stack.yaml"} <= written
    assert planned == written, (sorted(planned), sorted(written))
    assert listed == written
    assert summary and f"{len(written)} file(s) to write" in summary[0], summary
    again = code_fleet.run("plan", "--json", "--no-migrate")
    assert file_steps(json.loads(again.stdout)) == set(), "apply wrote what plan listed: nothing is left"
