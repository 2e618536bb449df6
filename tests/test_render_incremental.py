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
