"""The connection budget holds and its advice fits (issue 15, items 2, 3 and 9).

- the derived max_connections never falls as the memory rises, and the memory a refusal
  advises is one at which the fleet fits (pure arithmetic, then `provision budget`);
- add-bot holds the budget without a rendered stack too: against the server's own
  max_connections (the real test server);
- a refused `render` changes nothing, and its advice is one command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioning import budget as budgets
from provisioning.registry import BotEntry, Fleet, StackSettings

from .conftest import snapshot, tree
from .test_compose import make_project, run

ADVICE = re.compile(r"--postgres-memory (\d+[MG])\b")


def fleet_of(bots: int, *, pool: tuple[int, int] = (2, 3), replicas: int = 1, memory: str = "512M",
             pgbouncer: bool = False) -> Fleet:
    entries = {f"bot-{i}": BotEntry(name=f"bot-{i}", code="hello-bot", pool_size=pool[0], max_overflow=pool[1],
                                    replicas=replicas) for i in range(bots)}
    return Fleet(StackSettings(postgres_memory=memory, pgbouncer=pgbouncer), entries)


def with_memory(fleet: Fleet, memory: str) -> Fleet:
    return Fleet(StackSettings(postgres_memory=memory, pgbouncer=fleet.stack.pgbouncer,
                               max_connections=fleet.stack.max_connections), fleet.bots)


# -- the derivation is monotonic, and fits its memory ---------------------------------------------

def test_derived_max_connections_never_falls_as_the_memory_rises():
    previous = None
    for mb in range(128, 20 * 1024 + 1):
        tuning = budgets.tune(StackSettings(postgres_memory=f"{mb}M"))
        if previous is not None:
            assert tuning.max_connections >= previous, f"{mb}M derives fewer connections than {mb - 1}M"
        if tuning.max_connections > budgets.MIN_CONNECTIONS:
            assert tuning.memory_estimate_mb <= mb, f"{mb}M: the derived tuning does not fit its own memory"
        previous = tuning.max_connections
    for low, high in (("704M", "768M"), ("960M", "1G"), ("1216M", "1280M")):  # the steps the issue saw fall
        assert budgets.tune(StackSettings(postgres_memory=high)).max_connections >= \
            budgets.tune(StackSettings(postgres_memory=low)).max_connections


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("pgbouncer", [False, True])
def test_the_memory_advice_is_a_value_that_fits(replicas, pgbouncer):
    """For fleets of 1 to 150 bots: the refusal's --postgres-memory, followed once, fits."""
    advised = 0
    for bots in range(1, 151):
        fleet = fleet_of(bots, replicas=replicas, pgbouncer=pgbouncer)
        budget = budgets.compute(fleet)
        if budget.fits:
            continue
        found = ADVICE.search(budgets.explain(budget, "the fleet"))
        if found is None:  # no memory affords it (beyond max_connections 5000): the other options stand
            assert budget.reserve + budget.total > budgets.MAX_CONNECTIONS
            continue
        advised += 1
        after = budgets.compute(with_memory(fleet, found.group(1)))
        assert after.fits, f"{bots} bots x{replicas}: the advised {found.group(1)} does not fit"
        smaller = budgets.memory_mb(found.group(1), "advice") - 64  # advice comes in 64M steps
        if smaller >= 512:
            assert not budgets.compute(with_memory(fleet, f"{smaller}M")).fits, "the advice is the smallest that fits"
    assert advised > 10


def test_the_advice_for_a_set_max_connections_fits_too():
    for bots in (8, 20, 40):
        fleet = fleet_of(bots)
        fleet = Fleet(StackSettings(max_connections=30), fleet.bots)
        text = budgets.explain(budgets.compute(fleet), "the fleet")
        found = re.search(r"provision render --max-connections (\d+)(?: --postgres-memory (\d+[MG]))?\)", text)
        assert found, text
        stack = StackSettings(max_connections=int(found.group(1)), postgres_memory=found.group(2) or "512M")
        assert budgets.compute(Fleet(stack, fleet.bots)).fits, text


REGISTRY_HEAD = 'version = 1\n\n[server]\nbot_host = "postgres"\nbot_port = 5432\n'


def test_provision_budget_advice_followed_once_fits(tmp_path):
    """The CLI: a fleet that needs 95 connections at 512M (the issue's), `budget` refuses with a
    memory, and `budget --postgres-memory THAT` says it fits."""
    root = tmp_path / "fleet"
    root.mkdir()
    bots = "".join(f'\n[bots.big-{i}]\nreplicas = 3\n' for i in range(5)) + '\n[bots.small]\n'
    (root / "fleet.toml").write_text(REGISTRY_HEAD + bots)  # 5 x 16 + 6 = 86 connections + 5 reserved
    proc = run(root, "budget")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does NOT fit" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    found = ADVICE.search(errors[0])
    assert found, errors[0]
    proc = run(root, "budget", "--postgres-memory", found.group(1))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("fits")


# -- add-bot holds the server's own max_connections when no stack is rendered ----------------------

def server_limits(admin) -> tuple[int, int]:
    row = admin.execute("SELECT current_setting('max_connections')::int, "
                        "current_setting('superuser_reserved_connections')::int").fetchone()
    return row[0], row[1]


def test_add_bot_without_a_stack_holds_the_servers_max_connections(fleet, admin):
    max_connections, reserved = server_limits(admin)
    available = max_connections - reserved
    big, big2 = fleet.name("big"), fleet.name("big")
    pool = available - 11  # big's limit: pool + 1 = available - 10
    assert 1 <= pool <= 1000, "the test server's max_connections is outside what this test sizes"
    fleet.add(big, "--pool-size", str(pool), "--max-overflow", "0")

    before_server, before_files = snapshot(admin), tree(fleet.root)
    registry = (fleet.root / "fleet.toml").read_text()
    proc = fleet.run("add-bot", big2, "--replicas", "3")  # (2 + 3) x 3 + 1 = 16 > the 10 left
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.endswith(errors[0] + "\n"), proc.stderr
    assert f"adding {big2} needs {available + 6} connections" in proc.stderr
    assert f"allows {available} (max_connections {max_connections} - superuser_reserved_connections {reserved})" \
        in proc.stderr
    assert "--replicas 1" in proc.stderr and "ALTER SYSTEM SET max_connections" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert snapshot(admin) == before_server, "no role or database was made"
    assert tree(fleet.root) == before_files and not fleet.env_file(big2).exists()
    assert (fleet.root / "fleet.toml").read_text() == registry

    fleet.add(big2, "--replicas", "1")  # (2 + 3) x 1 + 1 = 6: fits
    assert fleet.run("add-bot", big).returncode == 0, "a rerun that asks for no more is never refused"
    proc = fleet.run("add-bot", big2, "--replicas", "3")
    assert proc.returncode == 2 and f"resizing {big2} needs" in proc.stderr


def test_add_bot_without_a_stack_refuses_a_bot_larger_than_the_server(fleet, admin):
    name = fleet.name("huge")
    before = snapshot(admin)
    proc = fleet.run("add-bot", name, "--pool-size", "1000", "--max-overflow", "1000")
    assert proc.returncode == 2 and "nothing was changed" in proc.stderr, proc.stderr
    assert snapshot(admin) == before and not fleet.env_file(name).exists()
    assert not (fleet.root / "compose.yaml").exists()


# -- a refused render changes nothing --------------------------------------------------------------

def files(root: Path) -> dict[str, bytes]:
    """Every file of the project but botfleet's own state (locks), byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".botfleet" not in p.relative_to(root).parts}


def test_a_refused_render_changes_nothing_and_advises_apply(tmp_path):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    (root / "secrets" / "chat-bot.env").unlink()  # a fresh clone: secrets/ is not in git
    (root / "secrets" / "acme-support.env").unlink()
    before = files(root)
    proc = run(root, "render", "--postgres-memory", "1G", "--pgbouncer")
    assert proc.returncode != 0
    assert files(root) == before, "a refused render changed fleet.toml, a compose file or a secret"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "provision apply" in errors[0] and "add-bot" not in errors[0], errors[0]
    assert "saved the stack settings" not in proc.stderr


def test_a_render_refused_for_a_foreign_file_changes_nothing(tmp_path):
    root = make_project(tmp_path / "fleet")
    (root / "compose.yaml").write_text("services: {}\n")  # the operator's own, not botfleet's
    before = files(root)
    proc = run(root, "render", "--postgres-memory", "1G")
    assert proc.returncode == 2, proc.stderr
    assert "were not written by botfleet" in proc.stderr
    assert files(root) == before
