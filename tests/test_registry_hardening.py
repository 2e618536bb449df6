"""fleet.toml cannot be turned into a weapon: every command loads it through the one
validation (the one plan uses), so a hand-edited entry that names another bot's database, a
role that is not the bot's, a path as a bot name or a line break in a value is refused, in
one line and with exit code 2, by doctor --fix, backup --all and the rest, before anything."""

from __future__ import annotations

import pytest

from .conftest import snapshot, tree

CASES = {
    "another bot's database": ('[bots.beta]\ndatabase = "{victim_db}"\n', "database and role must be beta_db"),
    "a role that is not the bot's": ('[bots.beta]\nrole = "ops_admin"\n', "database and role must be beta_db"),
    "a path as a bot name": ('[bots."../../../tmp/x/pwned"]\n', "invalid bot name"),
    "quotes in a bot name": ("[bots.\"Robert'); DROP ROLE postgres;--\"]\n", "invalid bot name"),
    "a line break in db_host": ('[bots.beta]\ndb_host = "x\\nDATABASE_URL=postgresql://evil@h/db"\n', "is not a host name"),
    "negative replicas": ('[bots.beta]\nreplicas = -5\n', "replicas must be between 1 and 100"),
    "a path as a code": ('[bots.beta]\ncode = "../../../etc"\n', "is not a bot code name"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_a_weaponised_registry_before_anything(fleet, admin, case):
    victim = fleet.name("victim")
    fleet.add(victim)
    table, why = CASES[case]
    path = fleet.root / "fleet.toml"
    path.write_text(path.read_text() + "\n" + table.format(victim_db=victim.replace("-", "_") + "_db"))
    before, files = snapshot(admin), tree(fleet.root)
    for args in (("doctor", "--fix"), ("backup", "--all"), ("plan",), ("apply",), ("list",), ("add-bot", victim),
                 ("rotate-password", "--all"), ("render",), ("migrate", "--all")):
        proc = fleet.run(*args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and why in errors[0], (args, proc.stderr)
    assert snapshot(admin) == before
    assert tree(fleet.root) == files


@pytest.mark.parametrize("make", ["secrets-link", "env-link", "secrets-group-writable", "backups-world-writable",
                                  "state-link"])
def test_symlinks_and_loose_folders_under_the_project_are_refused(fleet, admin, tmp_path, make):
    """A secrets/ (or an env file) that is a link lets another local user choose where a bot's
    password goes; a group- or world-writable folder lets them swap its files."""
    name = fleet.name("priv")
    fleet.add(name)
    root = fleet.root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    if make == "secrets-link":
        (root / "secrets").rename(elsewhere / "secrets")
        (root / "secrets").symlink_to(elsewhere / "secrets")
    elif make == "env-link":
        env = root / "secrets" / f"{name}.env"
        env.rename(elsewhere / "x.env")
        env.symlink_to(elsewhere / "x.env")
    elif make == "secrets-group-writable":
        (root / "secrets").chmod(0o770)
    elif make == "backups-world-writable":
        (root / "backups").mkdir()
        (root / "backups").chmod(0o777)
    else:
        (root / ".botfleet").rename(elsewhere / "state")
        (root / ".botfleet").symlink_to(elsewhere / "state")
    before, files = snapshot(admin), tree(root)
    targets = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    for args in (("add-bot", name, "--rotate-password"), ("doctor", "--fix"), ("backup", "--all"), ("list",)):
        proc = fleet.run(*args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, (args, proc.stderr)
        assert "symbolic link" in errors[0] or "writable by group or others" in errors[0], errors
    assert snapshot(admin) == before and tree(root) == files
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == targets, "nothing written through a link"


def test_fleet_toml_parse_kept_in_botfleet_is_only_ever_the_same_texts(tmp_path):
    """registry: the parse kept in .botfleet/fleet-toml.json (for the next command) stands only for
    the text whose digest it carries: a hand edit is parsed again, a broken file is still refused,
    a damaged cache is ignored, and every check of the entries still runs on a cached parse."""
    import json

    from provisioning.errors import InvalidInput
    from provisioning.registry import BotEntry, Registry

    (tmp_path / ".botfleet").mkdir()
    registry = Registry(tmp_path)
    with registry.editing() as fleet:
        fleet.bots["alpha"] = BotEntry(name="alpha", code="hello-bot")
    cache = tmp_path / ".botfleet" / "fleet-toml.json"
    kept = json.loads(cache.read_text())
    assert kept["toml"]["bots"]["alpha"]["code"] == "hello-bot"  # written with fleet.toml, no second parse

    def load():
        from provisioning import registry as module

        module._LOADED.clear()  # this process's own copy: the next command's view
        return Registry(tmp_path).load()

    assert load().bots["alpha"].code == "hello-bot"
    text = (tmp_path / "fleet.toml").read_text()
    (tmp_path / "fleet.toml").write_text(text.replace('code = "hello-bot"', 'code = "chat-bot"'))
    assert load().bots["alpha"].code == "chat-bot"  # edited by hand: parsed again
    assert json.loads(cache.read_text())["toml"]["bots"]["alpha"]["code"] == "chat-bot"

    # A cache made to say something else for the file's own digest is still checked like the file.
    kept = json.loads(cache.read_text())
    kept["toml"]["bots"]["alpha"]["pool_size"] = "many"
    cache.write_text(json.dumps(kept))
    with pytest.raises(InvalidInput, match="pool_size must be"):
        load()
    cache.write_text("{not json")
    assert load().bots["alpha"].code == "chat-bot"  # damaged: ignored, parsed again

    (tmp_path / "fleet.toml").write_text(text + "\n[bots.beta\n")
    with pytest.raises(InvalidInput, match="is not valid TOML"):
        load()
