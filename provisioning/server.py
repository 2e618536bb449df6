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
    source: str  # "--admin-url", "ADMIN_DATABASE_URL" or "embedded"

    def banner(self) -> str:
        from .db import describe

        return f"server: {describe(self.url)} (from {self.source})"


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
