"""The fleet's servers watched over time: the samples `provision top` shows and `provision metrics`
exports.

A ``Watch`` holds one admin connection per server of the watched bots for as long as it runs (a
live top or an exporter samples every few seconds, and a new connection each time would load the
server it measures). A server that does not answer is reported as not read in that frame (and
``botfleet_up 0``) and tried again at the next one: one server down in a fleet of several does
not blind the operator to the others, and a restart of the shared server does not end a
long-running top or exporter. Bad input (a bot or server fleet.toml does not name, a password in
--admin-url, no fleet here) is still refused up front, before any server is touched. The figures
themselves are ``monitor``'s; this module only chooses the servers and bots, keeps the
connections and paces the samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import monitor, monitoring
from .db import connect
from .errors import InvalidInput, ProvisionError, one_line
from .names import validate
from .project import Project
from .registry import DEFAULT_SERVER
from .servers import Server, Servers

# Between two samples: short enough to see a burst, long enough not to load the server it measures.
DEFAULT_INTERVAL = 2.0
MAX_INTERVAL = 3600.0
MIN_INTERVAL = 0.1


@dataclass
class Frame:
    """One refresh: each server's latest sample, each bot's rates since the sample before it
    (none in a first frame), and the servers that could not be read this time (and why)."""

    samples: list[monitor.ServerSample]
    rates: dict[str, dict[str, monitor.Rates]] = field(default_factory=dict)  # server -> bot -> rates
    unreachable: dict[str, str] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.wall_time,
            "servers": [monitor.as_dict(s, self.rates.get(s.server)) for s in self.samples],
            "unreachable": self.unreachable,
        }


def check_interval(seconds: float) -> float:
    """A refresh interval in seconds, from MIN_INTERVAL to MAX_INTERVAL (InvalidInput otherwise)."""
    if not (math.isfinite(seconds) and MIN_INTERVAL <= seconds <= MAX_INTERVAL):
        raise InvalidInput(f"--interval must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds (got {seconds:g})")
    return seconds


def watched(project: Project, bots: list[str], server: str | None = None) -> dict[str, list[monitor.Watched]]:
    """The bots to watch per server: the named ones (each valid and in fleet.toml, else
    InvalidInput before any server is touched), or every bot of the registry; with ``server``,
    only the bots placed on that server (a named bot placed elsewhere is InvalidInput)."""
    fleet = project.fleet
    for name in bots:
        validate(name)
    unknown = [n for n in bots if n not in fleet.bots]
    if unknown:
        raise InvalidInput(f"not in the fleet registry: {', '.join(unknown)} (see provision list)")
    if server is not None and server not in fleet.server_names():
        raise InvalidInput(f"no server {server!r} in fleet.toml (known: {', '.join(fleet.server_names())})")
    elsewhere = [n for n in bots if server is not None and fleet.bots[n].server != server]
    if elsewhere:
        raise InvalidInput(f"not on server {server}: {', '.join(elsewhere)} (see provision list)")
    chosen = list(dict.fromkeys(bots)) or sorted(n for n, e in fleet.bots.items() if server in (None, e.server))
    out: dict[str, list[monitor.Watched]] = {}
    for name in chosen:
        entry = fleet.bots[name]
        out.setdefault(entry.server, []).append(monitor.Watched(name, entry.database, entry.role))
    return out


class Watch:
    """The servers of the watched bots, opened on entry and sampled on demand."""

    def __init__(self, project: Project, servers: Servers, bots: list[str], *, server: str | None = None,
                 queries: bool = False, monitor_url: str | None = None):
        self.targets = watched(project, bots, server)
        self.server_names = [server] if server else servers.of(bots) if bots else servers.fleet_wide()
        # The default server read as the monitoring role (the stack's exporter), not as its admin.
        self.monitor_url = monitor_url
        for name in self.server_names:
            if not (monitor_url and name == DEFAULT_SERVER):
                servers.choose(name, start_embedded=False)  # InvalidInput now, not as a server "not read" later
        self.servers = servers
        self.queries = queries
        self.opened: dict[str, Server] = {}

    def __enter__(self) -> Watch:
        return self  # each server is opened by the first sample that reads it

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for server in self.opened.values():
            server.close()
        self.opened.clear()

    def _server(self, name: str) -> Server:
        server = self.opened.get(name)
        if server is None or server.conn is None or server.conn.closed:
            if self.monitor_url and name == DEFAULT_SERVER:
                server = Server(name, self.monitor_url, monitoring.URL_FILE_ENV)
                server.conn = connect(self.monitor_url)  # no admin facts, no botfleet database: it only reads
                self.opened[name] = server
            else:
                server = self.opened[name] = self.servers.open(name)
        return server

    def sample(self) -> tuple[list[monitor.ServerSample], dict[str, str]]:
        """Every server's sample now, and the servers that could not be read (reopened next time)."""
        samples, unreachable = [], {}
        for name in self.server_names:
            try:
                server = self._server(name)
                assert server.conn is not None
                samples.append(monitor.sample(server.conn, name, self.targets.get(name, []), queries=self.queries))
            except InvalidInput:
                raise
            except (ProvisionError, psycopg.OperationalError, psycopg.InterfaceError) as err:
                unreachable[name] = one_line(err)
                dropped = self.opened.pop(name, None)
                if dropped is not None:
                    dropped.close()
        return samples, unreachable

    def frames(self, interval: float, *, once: bool = False,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[Frame]:
        """Frames every ``interval`` seconds until the caller stops. The first one comes at once,
        with totals and no rates; each next one has the rates since the one before. ``once``:
        a single frame, from two samples ``interval`` apart (so it has rates)."""
        before, unreachable = self.sample()
        if not once:
            yield Frame(before, unreachable=unreachable)
        while True:
            sleep(interval)
            after, unreachable = self.sample()
            previous = {s.server: s for s in before}
            rates = {s.server: monitor.rates(previous[s.server], s) for s in after if s.server in previous}
            yield Frame(after, rates, unreachable)
            if once:
                return
            before = after

    def scrape(self) -> Scrape:
        """One sample of every server in Prometheus's text format."""
        samples, unreachable = self.sample()
        return Scrape(monitor.exposition(samples, unreachable), unreachable)


@dataclass
class Scrape:
    """The metrics text, and the servers it could not read (``botfleet_up 0`` in it)."""

    text: str
    unreachable: dict[str, str] = field(default_factory=dict)
