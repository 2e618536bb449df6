"""Visit many bot databases through a small bounded pool, results in the order given.

The fleet-wide reads (``doctor``, ``plan``, ``migrate --all`` with nothing pending) open one
connection into each bot database. One after another, a fleet of hundreds waits on each
connection's start-up and round trips in turn; :func:`visit` runs ``fn`` for each item in a few
threads at once instead. Each call opens and closes its own connection (psycopg connections
are never shared between threads here), so a bot database gets at most one at a time from a
run, and at most :func:`jobs` of them are open at once: at most 8, and no more than a quarter
of the connections the server has free, so a run never takes the slots the bots need.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")
R = TypeVar("R")

MAX_JOBS = 8

_FREE_SLOTS = """
SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
       - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
"""


def jobs(conn: psycopg.Connection | None, n: int) -> int:
    """How many connections a fleet-wide read of ``n`` bot databases may hold at once on the
    server of ``conn`` (an admin connection): at most MAX_JOBS, a quarter of the free slots."""
    if n <= 1:
        return 1
    share = MAX_JOBS
    if conn is not None:
        try:
            row = conn.execute(_FREE_SLOTS).fetchone()
            share = max(1, int(row[0]) // 4) if row and row[0] is not None else 1
        except psycopg.Error:
            share = 1
    return max(1, min(MAX_JOBS, share, n))


def visit(items: Iterable[T], fn: Callable[[T], R], jobs: int) -> list[R]:
    """``[fn(item) for item in items]``, ``jobs`` at a time in threads; the first exception
    ``fn`` raises is raised here (the calls already running finish first)."""
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(jobs, len(items)), thread_name_prefix="botfleet-visit") as ex:
        return list(ex.map(fn, items))


# While the calling thread works beside the pool, it gives the interpreter up this often (in
# seconds; Python's default is 0.005): a pool thread whose answer has come waits at most
# that long for its turn, so the pool keeps its pace.
MEANWHILE_SWITCH_S = 0.0005


def visit_meanwhile(items: Iterable[T], fn: Callable[[T], R], jobs: int, meanwhile: Callable[[], Any]) -> list[R]:
    """:func:`visit`, with ``meanwhile()`` run in the calling thread as the pool works (the pool
    from a thread of its own). Both finish before it returns; an exception of ``meanwhile`` is
    raised first, else the pool's."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = visit(items, fn, jobs)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = err
    thread = threading.Thread(target=run, name="botfleet-visit-main", daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, MEANWHILE_SWITCH_S))
    thread.start()
    try:
        meanwhile()
    finally:
        thread.join()
        sys.setswitchinterval(interval)
    if "error" in box:
        raise box["error"]
    return box["result"]
