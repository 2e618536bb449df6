"""`provision` commands that watch the shared server per bot: top, metrics."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .common import (
    AdminUrlOpt, BotsArg, JsonOpt, ProjectOpt, app, command, fail, print_json, print_table, project_of, say, servers_of,
    size,
)

if TYPE_CHECKING:
    from ..monitor import BotSample, Rates, ServerSample, Session
    from ..watch import Frame

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: a full-screen refresh without curses
ServerOpt = Annotated[Optional[str], typer.Option("--server", metavar="NAME", help="Only the bots on this server "
                                                  "(default, or the NAME of a servers.NAME table in fleet.toml).",
                                                  show_default="every server of the fleet")]


@app.command("top")
@command
def top_cmd(
    bots: BotsArg = None,
    once: Annotated[bool, typer.Option("--once", help="One frame and exit: two samples --interval apart, "
                                       "so the rates are over that interval.")] = False,
    interval: Annotated[float, typer.Option("--interval", "-n", metavar="SECONDS",
                                            help="Seconds between refreshes (0.1 to 3600).")] = 2.0,
    queries: Annotated[bool, typer.Option("--queries", help="Also show the text of each bot's longest running "
                                          "statement and of lock waiters and blockers (it may hold whatever a "
                                          "bot put in its SQL: tokens, users' messages).")] = False,
    server: ServerOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """A live per-bot view of the shared server, refreshed every --interval seconds until Ctrl-C.

    Per bot: sessions by state (active, idle, idle in transaction) against its
    connection limit, transactions/s and rows written/s (inserted + updated +
    deleted) between two samples, cache hit ratio and temp bytes (since the
    server's statistics reset), database size and growth/s, its longest running
    statement's age, state and wait event, its oldest open transaction, and its
    sessions waiting on a lock with the sessions that block them; with
    pg_stat_statements installed in the botfleet database, statement calls/s and
    execution seconds/s. A fleet with several servers shows one section per
    server. Statement texts are shown only with --queries. The first frame of a
    live view shows totals only; rates come from the next one. On a terminal the
    screen is redrawn; otherwise frames follow one another (--json: one JSON
    object per line, per frame). A server that does not answer is shown as not
    read and tried again (--once: exit code 1). BOTFLEET_MONITOR_URL_FILE: as
    for metrics.

    Example: provision top --once --json
    """
    from .. import commands, monitoring

    proj = project_of(project)
    commands.check_interval(interval)
    watching = commands.watch(proj, servers_of(proj, admin_url, read_only=True), list(bots or ()), server=server,
                              queries=queries, monitor_url=monitoring.url_from_environment())
    terminal = sys.stdout.isatty() and not as_json
    frame = None
    try:
        with watching:
            for frame in watching.frames(interval, once=once):
                if as_json and once:
                    print_json(frame.as_dict())
                elif as_json:
                    _print_json_line(frame.as_dict())
                else:
                    _print_frame(frame, interval=interval, once=once, terminal=terminal, queries=queries)
                sys.stdout.flush()
    except KeyboardInterrupt:
        if terminal:
            typer.echo()
        return  # Ctrl-C is how a live view ends: exit 0
    if frame is not None and frame.unreachable:  # --once: shown in full, and the exit code says a server was not read
        raise fail(_not_read(frame.unreachable), 1)


@app.command("metrics")
@command
def metrics_cmd(
    bots: BotsArg = None,
    listen: Annotated[Optional[str], typer.Option("--listen", metavar="ADDRESS:PORT",
                                                  help="Serve the metrics over HTTP at /metrics (sampled anew for "
                                                  "each scrape) until Ctrl-C, instead of printing them once.",
                                                  show_default=False)] = None,
    server: ServerOpt = None,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Each bot's figures in Prometheus's text exposition format, on stdout or over HTTP (--listen).

    Counters from pg_stat_database end in _total (transactions, rows inserted,
    updated, deleted and written, blocks read and hit, temp files and bytes,
    deadlocks); gauges for sessions by state, the connection limit, the database
    size, the longest running statement's and oldest transaction's age and the
    sessions waiting on a lock. Every series has the labels server and bot;
    botfleet_up{server} is 0 for a server that could not be read. With
    pg_stat_statements installed in the botfleet database: statement calls and
    time per bot. No statement text is ever exported. With BOTFLEET_MONITOR_URL_FILE
    set (the stack's exporter service) the default server is read as the
    monitoring role botfleet_monitor from the URL in that file, not as its admin.

    Example: provision metrics --listen 127.0.0.1:9187
    """
    from .. import commands, monitoring

    proj = project_of(project)
    servers = servers_of(proj, admin_url, read_only=True)
    monitor_url = monitoring.url_from_environment()
    if listen is None:
        scrape = commands.metrics(proj, servers, list(bots or ()), server=server, monitor_url=monitor_url)
        typer.echo(scrape.text, nl=False)
        if scrape.unreachable:  # printed all the same (botfleet_up 0), and the exit code says so
            raise fail(_not_read(scrape.unreachable), 1)
        return
    try:
        commands.serve_metrics(proj, servers, list(bots or ()), listen, server=server, monitor_url=monitor_url,
                               ready=lambda url: say(f"serving {url} (Ctrl-C to stop)"))
    except KeyboardInterrupt:
        return  # how an exporter run by hand ends: exit 0


def _print_json_line(data: dict) -> None:
    """A live --json frame: one object per line (JSON Lines), so a reader can take each as it comes."""
    import json

    typer.echo(json.dumps(data))


def _not_read(unreachable: dict[str, str]) -> str:
    return "; ".join(f"server {name} not read: {why}" for name, why in unreachable.items())


# -- printing a frame --------------------------------------------------------------------------

def _print_frame(frame: Frame, *, interval: float, once: bool, terminal: bool, queries: bool) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(frame.wall_time))
    if terminal:
        typer.echo(CLEAR, nl=False)
    if once:
        why = f"rates over the {interval:g}s between two samples"
    elif frame.rates:
        why = f"every {interval:g}s, rates since the last refresh; Ctrl-C to stop"
    else:
        why = f"every {interval:g}s, totals only until the next refresh; Ctrl-C to stop"
    typer.echo(f"provision top  {stamp}  ({why})")
    for sample in frame.samples:
        _print_server(sample, frame.rates.get(sample.server, {}), queries=queries)
    for name, why in frame.unreachable.items():
        typer.secho(f"\nserver {name}: not read: {why} (retried at the next refresh)", fg=typer.colors.RED)
    if not terminal:
        typer.echo()


def _print_server(sample: ServerSample, rates: dict[str, Rates], *, queries: bool) -> None:
    statements = "on" if sample.statements_available else "off"
    typer.echo(f"\nserver {sample.server}: {sample.sessions} of {sample.max_connections} connections; "
               f"pg_stat_statements {statements}")
    for note in sample.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    if not sample.bots:
        typer.echo("no bots on this server")
        return
    statements = ("CALLS/S", "EXEC s/s") if sample.statements_available else ()
    print_table(("BOT", "ACT", "IDLE", "IDLE-TX", "CONN/LIMIT", "TX/S", "ROWS/S", "HIT%", "TEMP", "SIZE", "GROWTH/S",
                 "LONGEST", "OLDEST-TX", "WAITING", *statements),
                [_row(b, rates.get(b.bot)) + (_statement_rates(rates.get(b.bot)) if statements else ())
                 for b in sample.bots])
    for b in sample.bots:
        _print_details(b, queries=queries)


def _row(b: BotSample, r: Rates | None) -> tuple[str, ...]:
    if not b.exists:
        return (b.bot, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "missing", "-", "-")  # 14 columns
    c = b.connections
    limit = "-" if b.connection_limit is None else ("none" if b.connection_limit < 0 else str(b.connection_limit))
    hit = b.counters.cache_hit_ratio if b.counters else None
    return (
        b.bot, str(c["active"]), str(c["idle"]), str(c["idle in transaction"]), f"{b.connections_total}/{limit}",
        _rate(r.transactions if r else None), _rate(r.rows_written if r else None),
        "-" if hit is None else f"{hit * 100:.1f}", size(b.counters.temp_bytes) if b.counters else "-",
        size(b.size_bytes), "-" if r is None or r.growth_bytes is None else _signed_size(r.growth_bytes),
        _longest(b.longest), _age(b.oldest_transaction.transaction_seconds) if b.oldest_transaction else "-",
        str(len(b.lock_waits)) if b.lock_waits else "-",
    )


def _statement_rates(r: Rates | None) -> tuple[str, str]:
    """pg_stat_statements between two samples: calls per second, and seconds of execution per
    second (about how many of the bot's statements ran at once)."""
    return (_rate(r.statement_calls if r else None),
            "-" if r is None or r.statement_seconds is None else f"{r.statement_seconds:.2f}")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _signed_size(value: float) -> str:
    return ("-" if value < 0 else "") + size(int(abs(value)))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _wait(s: Session) -> str:
    return f"{s.wait_event_type}:{s.wait_event}" if s.wait_event_type else ""


def _longest(s: Session | None) -> str:
    if s is None:
        return "-"
    return " ".join(x for x in (_age(s.statement_seconds), _wait(s)) if x)


def _who(s: Session) -> str:
    if s.state is None and s.role is None:
        return f"pid {s.pid} (gone, or a prepared transaction)"
    owner = s.bot or f"role {s.role or '?'}"
    xact = f" {_age(s.transaction_seconds)} into its transaction" if s.transaction_seconds is not None else ""
    return f"pid {s.pid} ({owner}, {s.state or 'state hidden'}{xact})"


def _print_details(b: BotSample, *, queries: bool) -> None:
    """Lock waits (never a text unless --queries), and with --queries the longest statement."""
    for lw in b.lock_waits:
        blockers = ", ".join(_who(s) for s in lw.blocked_by) or "nobody any more"
        typer.secho(f"  {b.bot}: pid {lw.waiting.pid} waits {_age(lw.waiting.statement_seconds)} for a "
                    f"{lw.lock}, blocked by {blockers}", fg=typer.colors.YELLOW)
        if queries:
            _print_query("    waiting", lw.waiting)
            for s in lw.blocked_by:
                _print_query(f"    blocker pid {s.pid}", s)
    if queries and b.longest is not None:
        _print_query(f"  {b.bot}: longest, pid {b.longest.pid}", b.longest)


def _print_query(label: str, s: Session) -> None:
    if s.query:
        typer.echo(f"{label}: {' '.join(s.query.split())[:200]}")
