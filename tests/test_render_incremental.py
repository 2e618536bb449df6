"""One more bot costs a render the same work in a fleet of any size (issue 16).

Counted, not timed: how many characters of YAML are parsed and how many services the compose
schema checks when one bot joins a rendered fleet of 4 and one of 16, and which files are
written. The counters wrap the real functions (nothing is replaced).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning import compose_check

from .test_compose import make_project, run


class Counted:
    def __init__(self, monkeypatch):
        self.parsed = self.checked = 0
        self.names: list[str] = []  # the services and other entries schema-checked, by name
        real_load, real_errors = compose_check.load_yaml, compose_check._errors

        def load(text: str):
            self.parsed += len(text)  # characters of YAML parsed
            return real_load(text)

        def errors(doc):
            services = doc.get("services") if isinstance(doc, dict) else None
            self.checked += len(services) if isinstance(services, dict) else 0  # services schema-checked
            for section in compose_check.SECTIONS:
                entries = doc.get(section) if isinstance(doc, dict) else None
                self.names += [str(name) for name in entries] if isinstance(entries, dict) else []
            return real_errors(doc)
        monkeypatch.setattr(compose_check, "load_yaml", load)
        monkeypatch.setattr(compose_check, "_errors", errors)


def add_fake_bot(root: Path, name: str) -> None:
    """A bot as add-bot leaves it, without a server: its fleet.toml entry and its env file."""
    with open(root / "fleet.toml", "a") as fh:
        fh.write(f'\n[bots.{name}]\ncode = "hello-bot"\npool_size = 1\nmax_overflow = 0\n')
    env = root / "secrets" / f"{name}.env"
    role, db = name.replace("-", "_") + "_user", name.replace("-", "_") + "_db"
    env.write_text(f"DATABASE_URL=postgresql+asyncpg://{role}:pw-{name}-0123456789abcdef@postgres:5432/{db}\n")
    env.chmod(0o600)


def one_more(tmp_path: Path, monkeypatch, size: int) -> tuple[Counted, list[str]]:
    root = make_project(tmp_path / f"fleet{size}")
    for i in range(size - 3):  # make_project has three bots
        add_fake_bot(root, f"extra-{i:02d}")
    # 1G: the 16-bot fleet needs 62 connections, one more than 512M holds (test_budget_fit sizes the budget)
    assert run(root, "render", "--postgres-memory", "1G").returncode == 0
    add_fake_bot(root, "newcomer")
    counted = Counted(monkeypatch)
    proc = run(root, "render")
    assert proc.returncode == 0, proc.stderr
    written = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("wrote"))
    monkeypatch.undo()
    return counted, written


def test_one_more_bot_is_parsed_and_checked_alone_whatever_the_fleets_size(tmp_path, monkeypatch):
    small, small_written = one_more(tmp_path, monkeypatch, 4)
    large, large_written = one_more(tmp_path, monkeypatch, 16)
    # The same services checked at 16 bots as at 4: the newcomer's and what its arrival changes
    # (the provision service, whose fleet label changed), not every bot's.
    assert large.checked == small.checked and 0 < small.checked <= 6, (small.checked, large.checked)
    # Parsed: the newcomer's entries and the provision service, which names every bot's credentials
    # file (two short lines in each compose file per bot: about 210 characters). A whole parse
    # would add about 3,000 characters per bot.
    assert 0 < small.parsed < 12_000 and (large.parsed - small.parsed) / 12 < 250, (small.parsed, large.parsed)
    # Files: the compose files, the newcomer's URL, nothing of another bot's.
    assert large_written == small_written
    assert "secrets/newcomer.url" in large_written
    assert not [f for f in large_written if f.startswith("secrets/") and "newcomer" not in f], large_written


def test_a_cached_entry_is_the_same_document_a_whole_parse_gives(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    for rel in ("compose.yaml", "compose.stack.yaml"):
        text = (root / rel).read_text()
        used: dict = {}
        first = compose_check.load_yaml_cached(text, {}, used)
        assert first == compose_check.load_yaml(text)
        assert compose_check.load_yaml_cached(text, used, {}) == first


@pytest.mark.parametrize("text", [
    "a: &x {b: 1}\nc: *x\n",               # an anchor: parsed whole
    "services:\n  a: {}\n  a: {}\n",       # a duplicate key: the whole parse's error
    "- 1\n- 2\n",                          # not a mapping
])
def test_texts_not_shaped_like_a_render_are_parsed_whole(text):
    try:
        expected = compose_check.load_yaml(text)
    except Exception as err:  # noqa: BLE001
        with pytest.raises(type(err)):
            compose_check.load_yaml_cached(text, {}, {})
    else:
        assert compose_check.load_yaml_cached(text, {}, {}) == expected


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_add_bot_leaves_the_other_bots_files_and_services_alone(code_fleet, monkeypatch):
    """add-bot into a fleet with a rendered stack, on a real server: every other bot's env file
    and URL secret stays the same file (inode, mtime, size), its services in both compose files
    parse to what they were, and the schema checks none of its entries (counted, not timed)."""
    others = [code_fleet.name("keep") for _ in range(3)]
    for name in others:
        code_fleet.add(name, "--code", "chat-bot", "--no-migrate", "--pool-size", "1", "--max-overflow", "0")
    assert code_fleet.run("render").returncode == 0
    root = code_fleet.root
    files = [p for name in others for p in (code_fleet.env_file(name), root / "secrets" / f"{name}.url")]
    before = {p: _stamp(p) for p in files}
    services = {rel: compose_check.load_yaml((root / rel).read_text())["services"]
                for rel in (compose_check.COMPOSE_FILE, compose_check.STACK_FILE)}

    counted = Counted(monkeypatch)
    newcomer = code_fleet.name("new")
    proc = code_fleet.add(newcomer, "--code", "chat-bot", "--no-migrate", "--pool-size", "1", "--max-overflow", "0")
    monkeypatch.undo()

    assert "compose files not re-rendered" not in proc.stdout + proc.stderr
    assert {p: _stamp(p) for p in files} == before  # not rewritten, not even with the same bytes
    for rel, was in services.items():
        now = compose_check.load_yaml((root / rel).read_text())["services"]
        assert newcomer in now and all(now[name] == was[name] for name in others), rel
    # Checked: the newcomer's service and secrets, and what its arrival changed (the provision
    # service, which names its credentials file; postgres, whose tuning follows the fleet; the
    # fleet.toml config); nothing of another bot's.
    assert newcomer in counted.names, counted.names
    assert not [n for n in counted.names if any(n == o or n.startswith(f"{o}_") for o in others)], counted.names
    assert 0 < counted.checked <= 6, counted.checked


BOTS = {"hello-bot", "chat-bot", "acme-support"}


def _problems(files, fleet, cache) -> set[str]:
    """validate's problems (it raises them in one message), as a set."""
    from provisioning.errors import StackInvalid

    with pytest.raises(StackInvalid) as err:
        compose_check.validate(files, fleet, *cache)
    message = str(err.value)
    count = int(message.split("(")[1].split(" ")[0])
    problems = set(message.split("): ", 1)[1].split("; "))
    assert len(problems) == count <= 8, message
    return problems


def _changed(plan, rel: str, edit):
    """A copy of a prepared stack with one file's text edited (nothing checked or kept yet)."""
    import dataclasses

    files = [dataclasses.replace(f, content=edit(f.content)) if f.path == rel else f for f in plan.files]
    return compose_check.StackFiles(files=files, budget=plan.budget, bots=plan.bots, skipped=[],
                                    passwords=plan.passwords)


def _in_service(name: str, old: str, new: str):
    def edit(text: str) -> str:
        start = text.index(f"\n  {name}:\n")
        at = text.index(old, start)
        return text[:at] + new + text[at + len(old):]
    return edit


def test_entries_that_passed_are_left_out_only_in_the_same_context(tmp_path, monkeypatch):
    """set_aside leaves out of the parse exactly the entries whose text and context passed before."""
    from provisioning import compose

    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    _known, _parsed, verdicts = compose._checked(root)
    local = dict.fromkeys(BOTS, True)
    for rel, stack in (("compose.yaml", False), ("compose.stack.yaml", True)):
        text = (root / rel).read_text()
        reduced, aside, keys = compose_check.set_aside(text, verdicts, stack=stack, bots=BOTS, local=local)
        assert set(aside["services"]) == BOTS, rel  # every bot's service, nothing else
        assert all(set(refs) == {"networks", "secrets", "configs"} for refs in aside["services"].values())
        doc = compose_check.load_yaml(reduced)
        assert not BOTS & set(doc["services"]) and {"postgres", "provision"} <= set(doc["services"])
        whole = compose_check.load_yaml(text)
        assert doc["secrets"] and doc["configs"], "a section keeps one entry"  # never emptied
        for section in ("secrets", "configs"):
            assert set(doc[section]) | set(aside.get(section, {})) == set(whole[section])
        assert {name for (_section, name) in keys} >= BOTS
        # A bot on another server: its service's checks read that, so it is checked again.
        _, moved, _ = compose_check.set_aside(text, verdicts, stack=stack, bots=BOTS, local={**local, "hello-bot": False})
        assert set(moved["services"]) == BOTS - {"hello-bot"}
        # Another file's verdicts are not this file's.
        other = "compose.stack.yaml" if not stack else "compose.yaml"
        _, _, other_keys = compose_check.set_aside((root / other).read_text(), {}, stack=not stack, bots=BOTS, local=local)
        assert not set(keys.values()) & set(other_keys.values())
    # New checks (a botfleet upgrade): nothing kept holds.
    monkeypatch.setattr(compose_check, "_checks_digest", lambda: "other checks")
    _, aside, _ = compose_check.set_aside((root / "compose.yaml").read_text(), verdicts, stack=False, bots=BOTS, local=local)
    assert aside == {}


def test_a_kept_verdict_never_hides_a_problem(tmp_path):
    """Edited stacks give the same problems with the last render's verdicts as without any."""
    import dataclasses

    from provisioning import compose
    from provisioning.project import Project

    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    cache = compose._checked(root)
    assert cache[2], "the render kept its verdicts"
    project = Project(root)
    plan = compose.prepare(project)
    fleet = project.fleet
    cases = [
        # an unchanged bot's service whose secret is no longer defined (its refs are checked)
        ("compose.yaml", lambda t: t.replace('  hello-bot_database_url:\n    file: "./secrets/hello-bot.url"\n', ""),
         fleet, "compose.yaml: hello-bot: secret hello-bot_database_url is not defined"),
        # a bot's service changed: checked again
        ("compose.yaml", _in_service("hello-bot", "    read_only: true\n", ""), fleet,
         "compose.yaml: bot hello-bot: must run with a read-only root and no capabilities"),
        ("compose.stack.yaml", _in_service("chat-bot", '          cpus: "0.5"\n', ""), fleet,
         "compose.stack.yaml: bot chat-bot: needs a CPU limit"),
        # the same text, the bot now on another server
        ("compose.yaml", lambda t: t,
         dataclasses.replace(fleet, bots={**fleet.bots, "hello-bot": dataclasses.replace(fleet.bots["hello-bot"], server="elsewhere")}),
         "compose.yaml: bot hello-bot: lives on server elsewhere, not on the stack's postgres"),
    ]
    for rel, edit, which, expected in cases:
        with_verdicts = _problems(_changed(plan, rel, edit), which, cache)
        assert expected in with_verdicts, (expected, with_verdicts)
        assert with_verdicts == _problems(_changed(plan, rel, edit), which, (frozenset(), {}, {})), expected
