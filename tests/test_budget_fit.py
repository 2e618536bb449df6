"""The connection budget holds and its advice fits (issue 15, items 2, 3 and 9), and the memory
model grounded in measurement (issue 16) admits the fleets it should and refuses the others.

- the derived max_connections never falls as the memory rises, and the memory a refusal
  advises is one at which the fleet fits (pure arithmetic, then `provision budget`);
- add-bot holds the budget without a rendered stack too: against the server's own
  max_connections (the real test server);
- a refused `render` changes nothing, and its advice is one command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from provisioning import budget as budgets
from provisioning.registry import BotEntry, Fleet, StackSettings

from .conftest import snapshot, tree
from .test_compose import make_project, run

ADVICE = re.compile(r"--postgres-memory (\d+[MG])\b")


def fleet_of(bots: int, *, pool: tuple[int, int] = (2, 3), replicas: int = 1, memory: str = "512M",
             pgbouncer: bool = False, **stack: int) -> Fleet:
    entries = {f"bot-{i}": BotEntry(name=f"bot-{i}", code="hello-bot", pool_size=pool[0], max_overflow=pool[1],
                                    replicas=replicas) for i in range(bots)}
    return Fleet(StackSettings(postgres_memory=memory, pgbouncer=pgbouncer, **stack), entries)


def most_default_bots(memory: str, **stack) -> int:
    """The largest fleet of default bots (pool 2+3, one replica) the budget admits."""
    lo, hi = 0, 5000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if budgets.compute(fleet_of(mid, memory=memory, **stack)).fits else (lo, mid - 1)
    return lo


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


# -- the measured model: what fits, what is refused --------------------------------------------

def test_direct_connections_at_4g_fit_three_times_the_old_budgets_bots():
    """The old model (work_mem + 3 MB per connection) admitted 22 default bots at 4G."""
    assert most_default_bots("4G") >= 3 * 22
    assert most_default_bots("512M") >= 9, "the default size admits no fewer bots than before"


def test_a_thousand_default_bots_fit_8g_behind_pgbouncer_and_not_direct():
    fleet = fleet_of(1000, memory="8G", pgbouncer=True)
    budget = budgets.compute(fleet)
    assert budget.fits, budgets.explain(budget, "the fleet")
    assert budget.total == 1000 and budget.reserve == 3 + 2 + budgets.MIGRATION_JOBS
    assert budget.tuning.memory_estimate_mb <= 8 * 1024
    direct = budgets.compute(fleet_of(1000, memory="8G"))
    assert not direct.fits and direct.reserve + direct.total == 6005, "each direct bot is its role's limit, 6"
    assert not budgets.compute(fleet_of(1000, memory="4G", pgbouncer=True)).fits
    assert not budgets.compute(fleet_of(1000, memory="8G", pgbouncer=True, pgbouncer_pool_size=2)).fits


def test_the_estimate_adds_up_and_its_assumptions_move_it():
    t = budgets.tune(StackSettings(postgres_memory="4G"))
    assert t.work_mem_mb == 4 and t.shared_buffers_mb == 1024
    assert t.memory_estimate_mb == (t.shared_mb + t.maintenance_mb + budgets.BACKGROUND_MB + t.connections_mb
                                    + t.active_mb + t.headroom_mb) <= 4096
    assert t.active_connections == -(-t.max_connections * 10 // 100) and t.headroom_mb == 409
    busier = budgets.tune(StackSettings(postgres_memory="4G", active_percent=50))
    tighter = budgets.tune(StackSettings(postgres_memory="4G", headroom_percent=30))
    assert busier.max_connections < t.max_connections and tighter.max_connections < t.max_connections
    for tuning in (busier, tighter):
        assert tuning.memory_estimate_mb <= 4096
    # max_connections set by hand: charged in full, and refused when it does not fit
    over = budgets.compute(Fleet(StackSettings(postgres_memory="4G", max_connections=t.max_connections + 50), {}))
    assert not over.memory_fits and "needs about" in budgets.explain(over, "the fleet")


@pytest.mark.parametrize("active", [1, 10, 25, 100])
@pytest.mark.parametrize("headroom", [0, 10, 50])
def test_derived_max_connections_fits_and_rises_for_any_assumptions(active, headroom):
    previous = 0
    for mb in range(128, 40 * 1024 + 1, 37):
        t = budgets.tune(StackSettings(postgres_memory=f"{mb}M", active_percent=active, headroom_percent=headroom))
        assert t.max_connections >= previous, f"{mb}M derives fewer connections than a smaller memory"
        if t.max_connections > budgets.MIN_CONNECTIONS:
            assert t.memory_estimate_mb <= mb, f"{mb}M: the derived tuning does not fit its own memory"
        previous = t.max_connections


def test_budget_shows_and_previews_the_assumptions(tmp_path):
    root = tmp_path / "fleet"
    root.mkdir()
    (root / "fleet.toml").write_text(REGISTRY_HEAD + "active_percent = 20\nheadroom_percent = 5\n\n[bots.small]\n")
    data = json.loads(run(root, "budget", "--json").stdout)
    memory = data["memory"]
    assert memory["active_percent"] == 20 and memory["headroom_percent"] == 5 and memory["work_mem_mb"] == 4
    assert memory["estimate_mb"] == (memory["fixed_mb"] + memory["connections_mb"] + memory["active_mb"]
                                     + memory["headroom_mb"]) <= memory["limit_mb"]
    assert memory["active_connections"] == -(-data["max_connections"] * 20 // 100)
    preview = json.loads(run(root, "budget", "--json", "--active-percent", "50").stdout)
    assert preview["memory"]["active_percent"] == 50 and preview["max_connections"] < data["max_connections"]
    proc = run(root, "budget")
    assert proc.returncode == 0 and "active (20%)" in proc.stdout and "headroom" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args, word", [(("--active-percent", "0"), "active_percent must be 1-100"),
                                        (("--headroom-percent", "60"), "headroom_percent must be 0-50")])
def test_bad_assumptions_are_refused_in_one_line_and_change_nothing(tmp_path, args, word):
    root = make_project(tmp_path / "fleet")
    assert run(root, "render").returncode == 0
    before = files(root)
    for command in ("budget", "render"):
        proc = run(root, command, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and word in errors[0], proc.stderr
        assert files(root) == before
    registry = (root / "fleet.toml").read_text()
    (root / "fleet.toml").write_text(registry.replace("[server]\n", "[server]\nactive_percent = 0\n", 1))
    proc = run(root, "budget")
    assert proc.returncode == 2 and "active_percent must be 1-100" in proc.stderr, proc.stderr


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
