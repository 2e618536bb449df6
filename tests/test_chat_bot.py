"""chat-bot: models, repository and HTTP API, each test on in-memory SQLite and
on PostgreSQL as a provisioned bot's own role (over SCRAM), in a database whose
schema `provision add-bot --code chat-bot` migrated (migrations/chat_bot)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError

from bots.chat_bot.models import ChatBase, Conversation, FileMetadata, Message
from bots.chat_bot.repository import ConversationNotFound, ConversationRepository, FileRepository
from shared import Database

from .conftest import provisioned_bot_env


UNKNOWN = "00000000-0000-4000-8000-000000000000"


@dataclass
class Backend:
    kind: str
    db: Database

    @property
    def sqlite(self) -> bool:
        return self.kind == "sqlite"

    def run(self, fn: Callable[[Database], Awaitable[Any]]) -> Any:
        """Run ``fn(db)`` in a fresh event loop. PostgreSQL's pooled connections belong
        to the loop that opened them, so they are closed before the loop ends (an
        in-memory SQLite database lives in its one connection: that one is kept)."""
        async def main():
            try:
                return await fn(self.db)
            finally:
                if not self.sqlite:
                    await self.db.dispose()

        return asyncio.run(main())

    async def count(self, model) -> int:
        async with self.db.sessionmaker() as session:
            return await session.scalar(select(func.count()).select_from(model))

    async def counts(self) -> tuple[int, int, int]:
        return await self.count(Conversation), await self.count(Message), await self.count(FileMetadata)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> Iterator[Backend]:
    """An empty chat-bot schema: in-memory SQLite, or a database provisioned for
    this test and reached as the bot's own role over TCP (SCRAM)."""
    if request.param == "sqlite":
        name, env = "chat-bot", {"DATABASE_URL": "sqlite+aiosqlite:///:memory:"}
    else:
        # Its schema comes from migrations/chat_bot, run by add-bot as the bot's role.
        name, env = provisioned_bot_env(request.getfixturevalue("scram_code_fleet"), "chat", "chat-bot")
    b = Backend(request.param, Database.from_env(name, env=env))

    async def create_schema(db: Database) -> str:
        async with db.engine.begin() as conn:
            if b.sqlite:  # in-memory SQLite only: PostgreSQL was migrated by add-bot
                await conn.run_sync(ChatBase.metadata.create_all)
                return "sqlite"
            return (await conn.exec_driver_sql("SELECT current_user")).scalar_one()

    user = b.run(create_schema)
    same_role = b.sqlite or user == name.replace("-", "_") + "_user"
    assert same_role, "not connected as the bot's own role"
    yield b
    b.run(lambda db: db.dispose())


@contextlib.contextmanager
def api(b: Backend) -> Iterator[Any]:
    """A TestClient on one event loop (its portal); DB checks run there too."""
    from fastapi.testclient import TestClient

    from bots.chat_bot.api import create_app

    with TestClient(create_app(b.db)) as client:
        try:
            yield client
        finally:
            if not b.sqlite:
                client.portal.call(b.db.dispose)


def in_client(client, fn: Callable[[], Awaitable[Any]]) -> Any:
    return client.portal.call(fn)


# -- repository -------------------------------------------------------------------
def test_conversation_crud(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:
            repo = ConversationRepository(s)
            first = await repo.create()
            assert first.title == "New conversation" and len(first.id) == 36
            assert isinstance(first.created_at, datetime) and isinstance(first.updated_at, datetime)
        ids = [first.id]
        for i in range(3):  # separate transactions: distinct created_at on PostgreSQL
            async with db.unit_of_work() as s:
                ids.append((await ConversationRepository(s).create(f"chat {i}")).id)
        async with db.sessionmaker() as s:
            repo = ConversationRepository(s)
            got = await repo.get(ids[2])
            assert got.title == "chat 1"
            listed = [c.id for c in await repo.list()]
            assert sorted(listed) == sorted(ids)
            if not backend.sqlite:  # SQLite's CURRENT_TIMESTAMP has one-second resolution
                assert listed == ids[::-1]
            assert [c.id for c in await repo.list(limit=2, offset=1)] == listed[1:3]
            assert await repo.list(limit=10, offset=10) == []
        async with db.unit_of_work() as s:
            updated = await ConversationRepository(s).update(ids[1], title="renamed")
            assert updated.updated_at >= updated.created_at
        async with db.unit_of_work() as s:
            assert (await ConversationRepository(s).get(ids[1])).title == "renamed"
            await ConversationRepository(s).delete(ids[0])
        async with db.sessionmaker() as s:
            with pytest.raises(ConversationNotFound):
                await ConversationRepository(s).get(ids[0])
            assert await backend.count(Conversation) == 3

    backend.run(body)


def test_delete_cascades_to_messages(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:
            repo = ConversationRepository(s)
            doomed, kept = await repo.create("doomed"), await repo.create("kept")
            for i in range(5):
                await repo.add_message(doomed.id, "user", f"d{i}")
            await repo.add_message(kept.id, "user", "k")
        async with db.unit_of_work() as s:  # through the repository
            await ConversationRepository(s).delete(doomed.id)
        assert await backend.counts() == (1, 1, 0)

        # ... and in the database itself (ON DELETE CASCADE; SQLite enforces
        # foreign keys only when asked, per connection).
        async with db.engine.begin() as conn:
            if backend.sqlite:
                await conn.exec_driver_sql("PRAGMA foreign_keys = ON")
            await conn.execute(text("DELETE FROM conversations WHERE id = :id"), {"id": kept.id})
        assert await backend.counts() == (0, 0, 0)

        # The ORM relationship: delete-orphan, and session.delete() of a conversation.
        async with db.unit_of_work() as s:
            conv = Conversation(title="orm", messages=[Message(seq=1, role="user", content="a")])
            s.add(conv)
        async with db.unit_of_work() as s:
            conv = await s.get(Conversation, conv.id)
            (await conv.awaitable_attrs.messages).clear()
        assert await backend.counts() == (1, 0, 0)
        async with db.unit_of_work() as s:
            await s.delete(await s.get(Conversation, conv.id))
        assert await backend.counts() == (0, 0, 0)

    backend.run(body)


def test_context_is_the_last_n_in_order_even_when_created_at_ties(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:  # ONE transaction: now() is the same for all 30
            repo = ConversationRepository(s)
            conv = await repo.create("ties")
            other = await repo.create("other")
            for i in range(30):
                await repo.add_message(conv.id, ("user", "assistant")[i % 2], f"m{i:02d}")
                await repo.add_message(other.id, "user", f"other {i}")
        async with db.sessionmaker() as s:
            repo = ConversationRepository(s)
            everything = await repo.get_all_messages(conv.id)
            assert [m.content for m in everything] == [f"m{i:02d}" for i in range(30)]
            if not backend.sqlite:  # the ties this test is about
                assert len({m.created_at for m in everything}) == 1
            assert [m.seq for m in everything] == list(range(1, 31))

            context = await repo.get_context_messages(conv.id)  # default 20
            assert [m.content for m in context] == [f"m{i:02d}" for i in range(10, 30)]
            assert [m.role for m in context][:2] == ["user", "assistant"]
            assert [m.content for m in await repo.get_context_messages(conv.id, limit=1)] == ["m29"]
            assert len(await repo.get_context_messages(conv.id, limit=200)) == 30
            with pytest.raises(ValueError):
                await repo.get_context_messages(conv.id, limit=0)

        async with db.unit_of_work() as s:  # a later transaction comes after all of them
            await ConversationRepository(s).add_message(conv.id, "system", "later")
        async with db.sessionmaker() as s:
            context = await ConversationRepository(s).get_context_messages(conv.id, limit=3)
            assert [m.content for m in context] == ["m28", "m29", "later"]

            empty = await ConversationRepository(s).create("empty")
            assert await ConversationRepository(s).get_context_messages(empty.id) == []
            assert await ConversationRepository(s).get_all_messages(empty.id) == []

    backend.run(body)


def test_context_query_uses_the_composite_index(backend):
    """One statement, and it reads the (conversation_id, created_at, seq) index."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    async def body(db: Database):
        async with db.unit_of_work() as s:
            repo = ConversationRepository(s)
            conv = await repo.create()
            for i in range(5):
                await repo.add_message(conv.id, "user", str(i))
        event.listen(db.engine.sync_engine, "before_cursor_execute", record)
        try:
            async with db.sessionmaker() as s:
                await ConversationRepository(s).get_context_messages(conv.id, limit=3)
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        assert len([q for q in seen if "messages" in q]) == 1
        query = seen[-1]
        async with db.engine.connect() as conn:
            if backend.sqlite:
                plan = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, (conv.id, 3, 0))).all()
                plan_text = " ".join(str(row[-1]) for row in plan)
            else:
                await conn.exec_driver_sql("SET enable_seqscan = off")  # a 5-row table would be scanned
                plan = (await conn.exec_driver_sql("EXPLAIN " + query, (conv.id, 3))).all()
                plan_text = " ".join(row[0] for row in plan)
        assert "ix_messages_conversation_id_created_at_seq" in plan_text, plan_text

    backend.run(body)


def test_unknown_conversation_raises_and_writes_nothing(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:
            await ConversationRepository(s).create("existing")
        before = await backend.counts()
        for call in (
            lambda r: r.get(UNKNOWN),
            lambda r: r.update(UNKNOWN, title="x"),
            lambda r: r.delete(UNKNOWN),
            lambda r: r.add_message(UNKNOWN, "user", "hello"),
            lambda r: r.get_all_messages(UNKNOWN),
            lambda r: r.get_context_messages(UNKNOWN),
        ):
            with pytest.raises(ConversationNotFound) as err:
                async with db.unit_of_work() as s:
                    await call(ConversationRepository(s))
            assert err.value.conversation_id == UNKNOWN
        assert await backend.counts() == before

    backend.run(body)


def test_roles_are_checked_by_the_repository_and_the_database(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:
            conv = await ConversationRepository(s).create()
        with pytest.raises(ValueError):
            async with db.unit_of_work() as s:
                await ConversationRepository(s).add_message(conv.id, "robot", "beep")
        with pytest.raises(IntegrityError):
            async with db.unit_of_work() as s:
                s.add(Message(conversation_id=conv.id, seq=1, role="robot", content="beep"))
        assert await backend.count(Message) == 0

    backend.run(body)


def test_attachments_round_trip(backend):
    attachments = [
        {"file_id": "f-1", "name": "résumé ✓.pdf", "size": 12345, "pages": [1, 2, 3]},
        {"nested": {"ok": True, "none": None, "ratio": 0.25}, "emoji": "🙂"},
    ]

    async def body(db: Database):
        async with db.unit_of_work() as s:
            repo = ConversationRepository(s)
            conv = await repo.create()
            with_files = await repo.add_message(conv.id, "user", "see attached", attachments)
            plain = await repo.add_message(conv.id, "assistant", "thanks")
            assert plain.attachments == []
        async with db.sessionmaker() as s:
            got = await ConversationRepository(s).get_all_messages(conv.id)
            assert [m.id for m in got] == [with_files.id, plain.id]
            assert got[0].attachments == attachments and got[1].attachments == []

    backend.run(body)


def test_file_metadata(backend):
    async def body(db: Database):
        async with db.unit_of_work() as s:
            meta = await FileRepository(s).create("notes.txt", "text/plain", 42)
        async with db.unit_of_work() as s:
            repo = FileRepository(s)
            got = await repo.get(meta.id)
            assert (got.filename, got.content_type, got.size) == ("notes.txt", "text/plain", 42)
            assert isinstance(got.created_at, datetime)
            with pytest.raises(ValueError):
                await repo.create("bad", "text/plain", -1)
            assert await repo.delete(meta.id) is True
            assert await repo.delete(meta.id) is False
            assert await repo.get(meta.id) is None
        with pytest.raises(IntegrityError):  # the database checks it too
            async with db.unit_of_work() as s:
                s.add(FileMetadata(filename="bad", content_type="x", size=-1))

    backend.run(body)


# -- HTTP API -----------------------------------------------------------------------
def test_api_flow(backend):
    with api(backend) as client:
        assert client.get("/health").json() == {"status": "ok", "database": True}

        created = client.post("/conversations", json={"title": "Trip planning"})
        assert created.status_code == 201, created.text
        conv = created.json()
        assert conv["title"] == "Trip planning" and len(conv["id"]) == 36
        assert client.post("/conversations", json={}).json()["title"] == "New conversation"
        listed = client.get("/conversations").json()
        assert {c["id"] for c in listed} >= {conv["id"]} and len(listed) == 2
        assert len(client.get("/conversations", params={"limit": 1}).json()) == 1

        for i in range(25):
            role = ("user", "assistant")[i % 2]
            r = client.post(f"/conversations/{conv['id']}/messages", json={"role": role, "content": f"m{i}"})
            assert r.status_code == 201, r.text
            assert r.json()["conversation_id"] == conv["id"] and r.json()["role"] == role
        context = client.get(f"/conversations/{conv['id']}/context").json()
        assert [m["content"] for m in context] == [f"m{i}" for i in range(5, 25)]
        context = client.get(f"/conversations/{conv['id']}/context", params={"limit": 3}).json()
        assert [m["content"] for m in context] == ["m22", "m23", "m24"]

        r = client.post(f"/conversations/{conv['id']}/messages",
                        json={"role": "user", "content": "with files", "attachments": [{"a": [1, {"b": None}]}]})
        assert r.json()["attachments"] == [{"a": [1, {"b": None}]}]
        last = client.get(f"/conversations/{conv['id']}/context", params={"limit": 1}).json()
        assert last[0]["attachments"] == [{"a": [1, {"b": None}]}]

        deleted = client.delete(f"/conversations/{conv['id']}")
        assert deleted.status_code == 204 and deleted.content == b""
        assert client.get(f"/conversations/{conv['id']}/context").status_code == 404
        assert in_client(client, backend.counts)[:2] == (1, 0)


def test_api_unknown_ids_are_404_and_write_nothing(backend):
    with api(backend) as client:
        conv = client.post("/conversations", json={"title": "kept"}).json()
        client.post(f"/conversations/{conv['id']}/messages", json={"role": "user", "content": "hi"})
        before = in_client(client, backend.counts)
        for method, path, body in (
            ("GET", f"/conversations/{UNKNOWN}/context", None),
            ("POST", f"/conversations/{UNKNOWN}/messages", {"role": "user", "content": "hello"}),
            ("DELETE", f"/conversations/{UNKNOWN}", None),
            ("GET", "/conversations/not-a-uuid/context", None),
            ("POST", f"/conversations/{'x' * 300}/messages", {"role": "user", "content": "hello"}),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert "not found" in r.json()["detail"]
        assert in_client(client, backend.counts) == before


@pytest.mark.parametrize("body", [
    {"role": "user", "content": "x" * (32 * 1024 + 1)},
    {"role": "user", "content": "é" * (16 * 1024 + 1)},  # 32 770 bytes in UTF-8
    {"role": "user", "content": ""},
    {"role": "robot", "content": "beep"},
    {"role": "user"},
    {"content": "no role"},
    {"role": "user", "content": 42},
    {"role": "user", "content": "hi", "attachments": "not a list"},
    {"role": "user", "content": "hi", "attachments": [{}] * 21},
    {"role": "user", "content": "hi", "attachments": [{"blob": "x" * (32 * 1024)}]},
    {"role": "user", "content": "hi", "extra": "field"},
    ["role", "user"],
], ids=lambda b: "body")
def test_api_rejects_bad_message_bodies_and_writes_nothing(backend, body):
    with api(backend) as client:
        conv = client.post("/conversations", json={}).json()
        before = in_client(client, backend.counts)
        r = client.post(f"/conversations/{conv['id']}/messages", json=body)
        assert r.status_code == 422, r.text
        assert in_client(client, backend.counts) == before
        assert client.get(f"/conversations/{conv['id']}/context").json() == []


def test_api_rejects_bad_requests_and_accepts_the_limits(backend):
    with api(backend) as client:
        conv = client.post("/conversations", json={}).json()
        before = in_client(client, backend.counts)
        bad = [
            client.post("/conversations", json={"title": "t" * 201}),
            client.post("/conversations", json={"title": ""}),
            client.post("/conversations", json={"title": None}),
            client.post("/conversations", json={"name": "x"}),
            client.post("/conversations", content=b"{not json", headers={"content-type": "application/json"}),
            client.post(f"/conversations/{conv['id']}/messages", content=b"\xff\xfe",
                        headers={"content-type": "application/json"}),
            client.get(f"/conversations/{conv['id']}/context", params={"limit": 0}),
            client.get(f"/conversations/{conv['id']}/context", params={"limit": 201}),
            client.get(f"/conversations/{conv['id']}/context", params={"limit": "ten"}),
            client.get("/conversations", params={"offset": -1}),
        ]
        assert [r.status_code for r in bad] == [422] * len(bad)
        assert in_client(client, backend.counts) == before

        ok = client.post("/conversations", json={"title": "t" * 200})
        assert ok.status_code == 201
        big = "é" * (16 * 1024)  # exactly 32 KiB of UTF-8
        r = client.post(f"/conversations/{conv['id']}/messages", json={"role": "system", "content": big})
        assert r.status_code == 201
        got = client.get(f"/conversations/{conv['id']}/context", params={"limit": 200}).json()
        assert [m["content"] for m in got] == [big]


def test_api_health_reports_an_unreachable_database():
    from fastapi.testclient import TestClient

    from bots.chat_bot.api import create_app

    db = Database.from_env(env={"DATABASE_URL": "postgresql+asyncpg://u:p@127.0.0.1:1/db"})
    with TestClient(create_app(db)) as client:
        r = client.get("/health")
    assert r.status_code == 503 and r.json()["database"] is False
