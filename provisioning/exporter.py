"""A minimal Prometheus scrape endpoint: ``GET /metrics`` answers with freshly rendered text.

The standard library's HTTP server, one request at a time: a scraper asks every few seconds, and
serving one request at a time keeps the one admin connection per server (``watch.Watch``) used by
one thread only. Nothing else is served (404), nothing is logged per request (the access log
would be noise on stderr), and a failure to render is a 503 with a one-line reason, so a scraper
sees the exporter up but its target failing.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
from collections.abc import Callable

from .errors import InvalidInput, ProvisionError, one_line

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
DEFAULT_LISTEN = "127.0.0.1:9187"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IP address, IPv6 in brackets, or ``localhost``) as (host, port);
    InvalidInput for anything else."""
    host, sep, port_text = value.rpartition(":")
    bad = InvalidInput(f"--listen must be ADDRESS:PORT such as {DEFAULT_LISTEN} or 0.0.0.0:9187 (got {value[:60]!r})")
    if not sep or not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise bad from None
    return host, int(port_text)


class _Server(http.server.HTTPServer):
    def __init__(self, address: tuple[str, int], render: Callable[[], str]):
        self.render = render
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "botfleet-metrics"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, "not found: the metrics are at /metrics\n")
            return
        try:
            body = self.server.render()
        except Exception as err:  # noqa: BLE001 - a long-running server: one failed scrape, one line
            self._answer(503, f"{one_line(err) if isinstance(err, ProvisionError) else type(err).__name__}\n")
            return
        self._answer(200, body, CONTENT_TYPE)

    def _answer(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass


def serve(host: str, port: int, render: Callable[[], str], *,
          ready: Callable[[str], None] | None = None) -> None:
    """Answer scrapes on ``host:port`` until interrupted.
    A port that cannot be bound is a ProvisionError (exit 1) naming the address."""
    try:
        server = _Server((host, port), render)
    except OSError as err:
        raise ProvisionError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    with server:
        if ready is not None:
            ready(f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}/metrics")
        server.serve_forever()
