"""Which PostgreSQL server a command talks to, and how it was chosen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

ENV_ADMIN_URL = "ADMIN_DATABASE_URL"


@dataclass(frozen=True)
class ServerChoice:
    url: str
    source: str  # "--admin-url", "ADMIN_DATABASE_URL", "embedded" or "fleet.toml [servers.NAME]"
    name: str = "default"  # the fleet's name for it

    def banner(self) -> str:
        from .db import describe

        label = "server" if self.name == "default" else f"server {self.name}"
        return f"{label}: {describe(self.url)} (from {self.source})"


def choose_named(project: Path, fleet, name: str, admin_url: str | None, *, start_embedded: bool = True) -> ServerChoice:
    """The fleet's server ``name``: the default one (see :func:`choose`), or a ``[servers.NAME]``
    of fleet.toml (its admin URL, whose password comes from the environment or a passfile)."""
    from .registry import DEFAULT_SERVER

    if name == DEFAULT_SERVER:
        return choose(project, admin_url, start_embedded=start_embedded)
    extra = fleet.servers.get(name)
    if extra is None:
        known = ", ".join([DEFAULT_SERVER, *sorted(fleet.servers)])
        raise InvalidInput(f"no server {name!r} in fleet.toml (known: {known})")
    return ServerChoice(extra.admin_url, f"fleet.toml [servers.{name}]", name)


def place(fleet, entry) -> str:
    """The server a new bot goes to: the one with the most headroom once it is added
    (the default server on a tie). Raises BudgetExceeded when it fits nowhere."""
    import dataclasses

    from . import budget as budgets
    from .registry import DEFAULT_SERVER

    best, best_budget = None, None
    for name in fleet.server_names():
        candidate = dataclasses.replace(entry, server="" if name == DEFAULT_SERVER else name)
        b = budgets.server_budget(fleet, name, candidate)
        if b.fits and (best_budget is None or b.headroom > best_budget.headroom):
            best, best_budget = name, b
    if best is None:
        budgets.check(budgets.server_budget(fleet, DEFAULT_SERVER, entry), f"adding {entry.name} to any of the fleet's servers")
    return best  # type: ignore[return-value]


def choose(project: Path, admin_url: str | None, *, start_embedded: bool = True) -> ServerChoice:
    """``--admin-url``, else ``ADMIN_DATABASE_URL``, else the embedded default (started on demand).

    A password inside ``--admin-url`` is refused: process arguments are
    visible to every user of the machine. Passwords belong in the environment
    variable, PGPASSWORD or ~/.pgpass.
    """
    from .db import parse_url

    if admin_url:
        if parse_url(admin_url).get("password"):
            raise InvalidInput(
                "--admin-url must not contain a password (process arguments are visible to all users); "
                f"use {ENV_ADMIN_URL}, PGPASSWORD or ~/.pgpass"
            )
        return ServerChoice(admin_url, "--admin-url")
    env = os.environ.get(ENV_ADMIN_URL)
    if env:
        parse_url(env)
        return ServerChoice(env, ENV_ADMIN_URL)
    from .embedded import EmbeddedServer

    server = EmbeddedServer(project / ".botfleet")
    if start_embedded:
        server.start()
    return ServerChoice(server.admin_url(), "embedded")
