"""The fleet's PostgreSQL servers: which one a command talks to, how it is opened, which are visited.

One ``Server`` is one server of the fleet, by name (``default`` or a
``[servers.NAME]``), with its admin URL and, once opened, its admin connection
and what the admin may do there. ``Servers`` is the one place that chooses,
opens and visits them for a command.

The default server is ``--admin-url``, else ``ADMIN_DATABASE_URL``, else the
embedded one (started on demand). A ``[servers.NAME]`` is reached with the
admin URL fleet.toml gives it (its password from the environment or a passfile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg

from . import budget as budgets
from .db import (
    STATE_DATABASE, AdminInfo, admin_info, close_maintenance_databases, connect, describe, ensure_state_database,
    parse_url, with_database,
)
from .embedded import EmbeddedServer
from .errors import InvalidInput, ProvisionError
from .project import Project
from .registry import DEFAULT_SERVER, BotEntry, Fleet

ENV_ADMIN_URL = "ADMIN_DATABASE_URL"


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Server:
    """One of the fleet's servers; ``conn`` and ``admin`` are set once it is opened."""

    name: str  # DEFAULT_SERVER or a [servers.NAME]
    url: str = field(repr=False)
    source: str  # "--admin-url", "ADMIN_DATABASE_URL", "embedded" or "fleet.toml [servers.NAME]"
    conn: psycopg.Connection | None = field(default=None, repr=False, compare=False)
    admin: AdminInfo | None = None
    owned: bool = False  # botfleet runs this server (the embedded one, the stack's): it may close its doors

    def banner(self) -> str:
        label = "server" if self.name == DEFAULT_SERVER else f"server {self.name}"
        return f"{label}: {describe(self.url)} (from {self.source})"

    @property
    def major(self) -> int:
        assert self.admin is not None, "the server is not open"
        return self.admin.major

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()


class Servers:
    """How one command reaches the fleet's servers."""

    def __init__(self, project: Project, admin_url: str | None = None, *, say: Callable[[str], None] = _quiet,
                 read_only: bool = False):
        self.project = project
        self.admin_url = admin_url
        self.say = say
        # A read-only command (list, plan, doctor, current, ...): it must never create the
        # embedded server of a folder that holds no fleet (choose refuses instead).
        self.read_only = read_only

    def choose(self, name: str = DEFAULT_SERVER, *, start_embedded: bool = True) -> Server:
        """The server ``name``, not opened (the embedded one is started unless told not to)."""
        if name != DEFAULT_SERVER:
            extra = self.project.fleet.servers.get(name)
            if extra is None:
                known = ", ".join(self.project.fleet.server_names())
                raise InvalidInput(f"no server {name!r} in fleet.toml (known: {known})")
            return Server(name, extra.admin_url, f"fleet.toml [servers.{name}]")
        if self.admin_url:
            # Process arguments are visible to every user of the machine: no password there.
            if parse_url(self.admin_url).get("password"):
                raise InvalidInput(
                    "--admin-url must not contain a password (process arguments are visible to all users); "
                    f"use {ENV_ADMIN_URL}, PGPASSWORD or ~/.pgpass"
                )
            return Server(name, self.admin_url, "--admin-url")
        env = os.environ.get(ENV_ADMIN_URL)
        if env:
            parse_url(env)
            return Server(name, env, ENV_ADMIN_URL)
        if self.read_only:
            self.project.require_fleet()  # no fleet.toml: refused before .botfleet/ or a server is made
        embedded = self.embedded()
        if start_embedded:
            placed = (len(self.project.fleet.on(DEFAULT_SERVER))
                      if not embedded.status().initialized and self.project.registry.exists() else 0)
            if placed:
                self.say(f"note: no {ENV_ADMIN_URL} is set, so a NEW embedded server is made in "
                         f"{self.project.state_dir}: fleet.toml's {placed} bot(s) on the default server are not on "
                         f"it (set {ENV_ADMIN_URL} if they live on another server; provision apply builds them here)")
            embedded.start()
            from .archive import keep_receiving

            try:
                keep_receiving(self.project, self.say)
            except ProvisionError as err:  # the command goes on; doctor and list report the archive
                self.say(f"warning: the archive's WAL receiver could not be started: {err}")
        return Server(name, embedded.admin_url(), "embedded", owned=True)

    def embedded(self) -> EmbeddedServer:
        return EmbeddedServer(self.project.state_dir)

    def url(self, name: str = DEFAULT_SERVER) -> str:
        """The server's admin URL, announced; no connection is opened."""
        server = self.choose(name)
        self.say(server.banner())
        return server.url

    def open(self, name: str = DEFAULT_SERVER, *, owned: bool = False) -> Server:
        """The server, announced and connected, with its admin facts (InsufficientPrivilege
        when the admin cannot provision there). The admin session lives in botfleet's own
        database (created on first use), which no bot may open, so no bot can hold botfleet's
        advisory locks. ``owned``: botfleet runs it (also the embedded one): the maintenance
        databases are closed to PUBLIC."""
        server = self.choose(name)
        server.owned = server.owned or owned
        self.say(server.banner())
        server.conn = connect(server.url)
        try:
            server.admin = admin_info(server.conn)
            ensure_state_database(server.conn)
            if server.conn.info.dbname != STATE_DATABASE:
                try:
                    state = connect(with_database(server.url, STATE_DATABASE))
                except ProvisionError as err:
                    if "permission denied" not in str(err):
                        raise
                    # made by another admin: work from the admin URL's database (doctor says so)
                    self.say(f"note: {server.admin.role} may not connect to botfleet's database {STATE_DATABASE} on "
                             f"this server; its locks stay in {server.conn.info.dbname} (GRANT CONNECT ON DATABASE "
                             f"{STATE_DATABASE} TO {server.admin.role})")
                else:
                    server.conn.close()
                    server.conn = state
            if server.owned and server.admin.superuser:
                for closed in close_maintenance_databases(server.conn):
                    self.say(f"closed the maintenance database {closed} to PUBLIC (bots reach their own only)")
        except BaseException:
            server.close()
            raise
        return server

    @contextlib.contextmanager
    def opened(self, name: str = DEFAULT_SERVER, *, owned: bool = False) -> Iterator[Server]:
        server = self.open(name, owned=owned)
        try:
            yield server
        finally:
            server.close()

    @contextlib.contextmanager
    def visit(self, names: list[str], *, owned: bool = False) -> Iterator[list[Server]]:
        """Several servers open at once, closed at the end of the block."""
        opened: list[Server] = []
        try:
            for name in names:
                opened.append(self.open(name, owned=owned))
            yield opened
        finally:
            for server in opened:
                server.close()

    def fleet_wide(self) -> list[str]:
        """The servers a fleet-wide command looks at: every [servers.NAME], and the default
        one unless the fleet lives entirely on [servers.NAME] (then it is visited only when
        named by --admin-url / ADMIN_DATABASE_URL, or when the embedded server is already
        running)."""
        fleet = self.project.fleet
        names = sorted(fleet.servers)  # even without bots: a bot removed from fleet.toml may be left there
        default_needed = (not fleet.servers or fleet.on(DEFAULT_SERVER) or self.admin_url
                          or os.environ.get(ENV_ADMIN_URL) or self.embedded().status().running)
        return ([DEFAULT_SERVER] if default_needed else []) + names

    def of(self, bots: list[str]) -> list[str]:
        """The servers the named registry bots live on, each once."""
        return list(dict.fromkeys(self.project.fleet.bots[b].server for b in bots))


def place(fleet: Fleet, entry: BotEntry) -> str:
    """The server a new bot goes to: the one with the most headroom once it is added
    (the default server on a tie). Raises BudgetExceeded when it fits nowhere."""
    best, best_budget = None, None
    for name in fleet.server_names():
        candidate = dataclasses.replace(entry, server=name)
        b = budgets.server_budget(fleet, name, candidate)
        if b.fits and (best_budget is None or b.headroom > best_budget.headroom):
            best, best_budget = name, b
    if best is None:
        budgets.require_fit(budgets.server_budget(fleet, DEFAULT_SERVER, entry),
                      f"adding {entry.name} to any of the fleet's servers")
    return best  # type: ignore[return-value]
