"""How fast is chat-bot's context window on a very long conversation?

Run by hand from the repository root (it is a benchmark, not a test):

    .venv/bin/python bench/bench_context.py [--messages N] [--calls N] [--limit N] [--admin-url URL]

Without --admin-url a throw-away embedded server is started in a temporary
folder and destroyed at the end. A database bench<random6>_chat is created with
chat-bot's tables, one conversation gets N messages (default 1,000,000, one
``INSERT ... SELECT generate_series``; every three share a created_at, so the
seq tie-breaker matters), then VACUUM ANALYZE. It times ``--calls`` calls
(default 1,000, after 50 untimed warm-ups) of
``ConversationRepository.get_context_messages(limit=20)`` two ways: in one open
session (the call alone), and each in its own session as a request would (adds
the pool checkout with pre-ping, BEGIN and ROLLBACK), prints p50/p90/p99, and prints the EXPLAIN
(ANALYZE, BUFFERS) of the statement the repository sent, which should read the
(conversation_id, created_at, seq) index backwards. Target: p50 < 2 ms.
Everything it creates is dropped at the end, even on error or Ctrl-C.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import event
from sqlalchemy.engine import URL

from bots.chat_bot.models import ChatBase
from bots.chat_bot.repository import ConversationRepository
from provisioning.db import with_database
from shared import Database, DatabaseSettings

INDEX = "ix_messages_conversation_id_created_at_seq"
TARGET_P50_MS = 2.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def async_url(conninfo: str) -> URL:
    """A libpq URL or conninfo string as an asyncpg URL (Unix socket folders too)."""
    p = conninfo_to_dict(conninfo)
    return URL.create(
        "postgresql+asyncpg", username=p.get("user"), password=p.get("password"), host=p.get("host"),
        port=int(p["port"]) if p.get("port") else None, database=p.get("dbname"),
    )


def fill(conninfo: str, conversation_id: str, messages: int) -> float:
    """One conversation with ``messages`` messages; returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(
                "INSERT INTO conversations (id, title, last_seq) VALUES (%s, 'bench', %s)",
                (conversation_id, messages),
            )
            conn.execute(
                """
                INSERT INTO messages (id, conversation_id, seq, role, content, attachments, created_at)
                SELECT md5(%(cid)s || g::text)::uuid::text, %(cid)s, g,
                       CASE WHEN g %% 2 = 1 THEN 'user' ELSE 'assistant' END,
                       'message ' || g || ': ' || repeat('lorem ipsum ', 8),
                       '[]',
                       timestamptz '2026-01-01 00:00:00+00' + (g / 3) * interval '1 second'
                FROM generate_series(1, %(n)s) AS g
                """,
                {"cid": conversation_id, "n": messages},
            )
        conn.execute("VACUUM ANALYZE conversations")
        conn.execute("VACUUM ANALYZE messages")
    return time.perf_counter() - started


async def measure(db: Database, conversation_id: str, calls: int, limit: int, messages: int
                  ) -> tuple[dict[str, list[float]], str, str]:
    def check(got) -> None:
        assert len(got) == min(limit, messages) and got[-1].seq == messages, "wrong context window"
        assert all(a.seq < b.seq for a, b in zip(got, got[1:])), "context not in order"

    async def in_session(session) -> float:
        started = time.perf_counter()
        got = await ConversationRepository(session).get_context_messages(conversation_id, limit=limit)
        elapsed = time.perf_counter() - started
        check(got)
        session.expunge_all()  # the next call builds its objects afresh
        return elapsed * 1000

    async def per_request() -> float:
        started = time.perf_counter()
        async with db.sessionmaker() as session:
            got = await ConversationRepository(session).get_context_messages(conversation_id, limit=limit)
        elapsed = time.perf_counter() - started
        check(got)
        return elapsed * 1000

    timings: dict[str, list[float]] = {}
    async with db.sessionmaker() as session:
        for _ in range(50):
            await in_session(session)
        timings["repository call"] = [await in_session(session) for _ in range(calls)]
    for _ in range(50):
        await per_request()
    timings["+ own session"] = [await per_request() for _ in range(calls)]

    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        await per_request()
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    statement = seen[-1]
    async with db.engine.connect() as conn:
        rows = (await conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, (conversation_id, limit)
        )).all()
    return timings, statement, "\n".join(r[0] for r in rows)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the conversation (default 1,000,000)")
    parser.add_argument("--calls", type=int, default=1000, help="timed calls (default 1,000)")
    parser.add_argument("--limit", type=int, default=20, help="context window size (default 20)")
    parser.add_argument("--admin-url", help="a superuser (or CREATEDB) URL; default: a throw-away embedded server")
    args = parser.parse_args()
    if args.messages < 1 or args.calls < 1 or args.limit < 1:
        parser.error("--messages, --calls and --limit must be at least 1")

    server = None
    tmp = None
    dbname = f"bench{secrets.token_hex(3)}_chat"
    created = False
    try:
        if args.admin_url:
            admin_url = args.admin_url
        else:
            from provisioning.embedded import EmbeddedServer

            tmp = tempfile.TemporaryDirectory(prefix="bench-context-")
            say("starting an embedded server ...")
            server = EmbeddedServer(Path(tmp.name) / ".botfleet")
            server.start()
            admin_url = server.admin_url()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            created = True
        conninfo = with_database(admin_url, dbname)
        db = Database(DatabaseSettings(url=async_url(conninfo), source="bench"), application_name="bench-context")

        async def create_schema() -> None:
            async with db.engine.begin() as conn:  # a benchmark's own database: no migrations yet
                await conn.run_sync(ChatBase.metadata.create_all)
            await db.dispose()

        asyncio.run(create_schema())
        conversation_id = str(uuid.uuid4())
        say(f"inserting {args.messages:,} messages ...")
        fill_s = fill(conninfo, conversation_id, args.messages)
        say(f"timing {args.calls:,} calls ...")

        async def run() -> tuple[list[float], str, str]:
            try:
                return await measure(db, conversation_id, args.calls, args.limit, args.messages)
            finally:
                await db.dispose()

        timings, statement, plan = asyncio.run(run())
        with psycopg.connect(conninfo) as conn:
            size = conn.execute("SELECT pg_size_pretty(pg_relation_size(%s))", (INDEX,)).fetchone()[0]

        print(f"get_context_messages(limit={args.limit}) on PostgreSQL {version}, "
              f"one conversation of {args.messages:,} messages ({fill_s:.1f} s to insert; index {size})")
        print()
        print(f"| {'timed':<16} | {'calls':>6} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | {'mean ms':>7} | {'max ms':>7} |")
        print(f"|{'-' * 18}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
        for label, values in timings.items():
            p50, p90, p99 = (percentile(values, q) for q in (50, 90, 99))
            print(f"| {label:<16} | {len(values):>6,} | {p50:>7.3f} | {p90:>7.3f} | {p99:>7.3f} | "
                  f"{statistics.fmean(values):>7.3f} | {max(values):>7.3f} |")
        print()
        print("repository call: the call alone, in one open session (expunged between calls);")
        print("+ own session: a session per call, as a request has (pool checkout with pre-ping,")
        print("BEGIN, the query, ROLLBACK on close).")
        p50 = percentile(timings["repository call"], 50)
        print(f"target p50 < {TARGET_P50_MS} ms: {'met' if p50 < TARGET_P50_MS else 'NOT met'}")
        print()
        print("statement:")
        print(statement)
        print()
        print("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF):")
        print(plan)
        print()
        uses = INDEX in plan and "Backward" in plan
        print(f"reads {INDEX} backwards: {'yes' if uses else 'NO'}")
        return 0 if uses else 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if created:
            try:
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            except Exception as err:  # noqa: BLE001 - report, keep cleaning
                say(f"warning: could not drop database {dbname}: {err}")
        if server is not None:
            say("destroying the embedded server ...")
            server.destroy()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
