"""feishu-bot: the webhook records every Feishu event exactly once, on in-memory
SQLite and on PostgreSQL as a provisioned bot's own role (SCRAM over TCP).

Every test runs on both databases (the ``backend`` fixture). On PostgreSQL the tables
come from the bot's own migrations, run by `provision add-bot --code feishu-bot` as
its role; ``create_all`` is for in-memory SQLite only.
Database work for an app runs in the TestClient's own event loop (``client.portal``),
where the app's pooled connections live; the app disposes of its pool on shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select

from bots.feishu_bot.api import EventStore, create_app
from bots.feishu_bot.events import parse
from bots.feishu_bot.models import Event, FeishuBase, Message, UserSession
from bots.feishu_bot.repository import EventRepository
from shared import NAMING_CONVENTION, Database

from .conftest import assert_no_leak, provisioned_bot_env

TOKEN = "v3rification-t0ken-of-the-test-app"
MAX_BODY = 4096
URL = "/webhook/event"


@dataclass
class Backend:
    kind: str
    name: str
    env: dict[str, str]

    def database(self, **env: str) -> Database:
        return Database.from_env(self.name, env={**self.env, **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", "feishu-bot", {"DATABASE_URL": "sqlite+aiosqlite:///:memory:"})
    # Its schema comes from migrations/feishu_bot, run by add-bot as the bot's role.
    name, env = provisioned_bot_env(request.getfixturevalue("scram_code_fleet"), "feishu", "feishu-bot")
    return Backend("postgresql", name, env)


async def create_tables(db: Database) -> None:
    """In-memory SQLite only: on PostgreSQL add-bot already migrated the schema."""
    if db.engine.dialect.name == "sqlite":
        async with db.engine.begin() as conn:
            await conn.run_sync(FeishuBase.metadata.create_all)


async def _counts(db: Database) -> dict[str, int]:
    async with db.sessionmaker() as session:
        return {m.__tablename__: await session.scalar(select(func.count()).select_from(m))
                for m in (Event, UserSession, Message)}


async def _all(db: Database, model: type) -> list[Any]:
    async with db.sessionmaker() as session:
        return list((await session.scalars(select(model).order_by(model.id))).all())


@dataclass
class App:
    client: TestClient
    db: Database

    def post(self, body: Any, **kwargs: Any):
        if isinstance(body, (dict, list)):
            return self.client.post(URL, content=json.dumps(body).encode(), **kwargs)
        return self.client.post(URL, content=body, **kwargs)

    def call(self, fn, *args):
        """Run ``fn(*args)`` (a coroutine function) in the app's event loop."""
        return self.client.portal.call(fn, *args)

    def counts(self) -> dict[str, int]:
        return self.call(_counts, self.db)

    def rows(self, model: type) -> list[Any]:
        return self.call(_all, self.db, model)


@pytest.fixture
def app(backend):
    db = backend.database()
    with TestClient(create_app(db, TOKEN, max_body=MAX_BODY)) as client:
        client.portal.call(create_tables, db)
        yield App(client, db)


NOTHING = {"events": 0, "user_sessions": 0, "messages": 0}


def v2_event(event_id: str, open_id: str = "ou_alice", *, token: str | None = TOKEN,
             event_type: str = "im.message.receive_v1", text: str = "hi") -> dict[str, Any]:
    header = {"event_id": event_id, "create_time": "1700000000000", "event_type": event_type,
              "tenant_key": "tenant", "app_id": "cli_test"}
    if token is not None:
        header["token"] = token
    return {
        "schema": "2.0", "header": header,
        "event": {
            "sender": {"sender_id": {"open_id": open_id, "union_id": "on_x", "user_id": "u1"}, "sender_type": "user"},
            "message": {"message_id": f"om_{event_id}", "chat_id": "oc_chat", "chat_type": "p2p",
                        "message_type": "text", "content": json.dumps({"text": text})},
        },
    }


def v1_event(uuid: str, open_id: str = "ou_bob", *, token: str | None = TOKEN) -> dict[str, Any]:
    body = {"uuid": uuid, "ts": "1700000000.0", "type": "event_callback",
            "event": {"type": "p2p_chat_create", "open_id": open_id, "chat_id": "oc_chat"}}
    if token is not None:
        body["token"] = token
    return body


# -- URL verification ---------------------------------------------------------
def test_url_verification_answers_the_challenge_only_with_the_right_token(app):
    ok = app.post({"type": "url_verification", "challenge": "ch-123", "token": TOKEN})
    assert ok.status_code == 200 and ok.json() == {"challenge": "ch-123"}
    wrong = app.post({"type": "url_verification", "challenge": "ch-123", "token": "not-the-token"})
    assert wrong.status_code == 403 and "ch-123" not in wrong.text
    missing = app.post({"type": "url_verification", "challenge": "ch-123"})
    assert missing.status_code == 401
    no_challenge = app.post({"type": "url_verification", "token": TOKEN})
    assert no_challenge.status_code == 400
    assert app.counts() == NOTHING


# -- rejected requests write nothing -------------------------------------------
@pytest.mark.parametrize("make, status", [
    (lambda: v2_event("ev-wrong", token="wrong-token"), 403),
    (lambda: v2_event("ev-wrong", token="t\u00f6ken-non-ascii"), 403),
    (lambda: v2_event("ev-wrong", token=TOKEN + "x"), 403),
    (lambda: v2_event("ev-missing", token=None), 401),
    (lambda: {**v2_event("ev-v1-place", token=None), "token": TOKEN}, 401),  # 2.0 reads header.token only
    (lambda: v1_event("uuid-wrong", token="wrong-token"), 403),
    (lambda: v1_event("uuid-missing", token=None), 401),
    (lambda: {**v1_event("uuid-int"), "token": 12345}, 401),
])
def test_events_with_a_wrong_or_missing_token_are_refused_and_write_nothing(app, make, status):
    response = app.post(make())
    assert response.status_code == status
    assert TOKEN not in response.text
    assert app.counts() == NOTHING


def test_oversized_bodies_are_413_by_content_length_and_by_the_real_length(app):
    big = v2_event("ev-big", text="x" * MAX_BODY)
    assert app.post(big).status_code == 413  # Content-Length says so

    def chunks():  # no Content-Length (chunked): the body itself is measured
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    streamed = app.client.post(URL, content=chunks())
    assert streamed.status_code == 413
    assert app.counts() == NOTHING

    # A body of exactly max_body bytes is accepted.
    body = v2_event("ev-exact", text="")
    pad = MAX_BODY - len(json.dumps(body).encode())
    body = v2_event("ev-exact", text="y" * pad)
    assert len(json.dumps(body).encode()) == MAX_BODY
    assert app.post(body).status_code == 200
    assert app.counts() == {"events": 1, "user_sessions": 1, "messages": 1}


@pytest.mark.parametrize("declared, status", [(b"10", 413), (b"99999999999999999999999", 413), (b"-1", 400),
                                              (b"ten", 400)])
def test_content_length_is_checked_and_a_low_one_does_not_hide_the_real_length(backend, declared, status):
    """At the ASGI level, where a client can send a Content-Length that lies."""
    db = backend.database()
    asgi = create_app(db, TOKEN, max_body=100)
    body = json.dumps(v2_event("ev-lie", text="z" * 500)).encode()
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": URL, "raw_path": URL.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-length", declared), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}

    async def scenario():
        try:
            await create_tables(db)
            await asgi(scope, receive, send)
            return await _counts(db)
        finally:
            await db.dispose()

    assert asyncio.run(scenario()) == NOTHING
    assert sent[0]["status"] == status


@pytest.mark.parametrize("body", [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'"a string"',
    b"",
    b'{"schema": "2.0", "header": {"token": "' + TOKEN.encode() + b'", "event_id": 1e999, "event_type": "x"}}',
    b'{"schema": "2.0", "header": {"token": "' + TOKEN.encode() + b'", "event_id": NaN, "event_type": "x"}}',
    b"[" * 2000 + b"]" * 2000,  # deeper than the parser allows, within max_body
    json.dumps({**v2_event("ev-1"), "schema": "2.0", "header": "not an object"}).encode(),
    json.dumps({"encrypt": "c2VjcmV0"}).encode(),
])
def test_malformed_bodies_are_400_and_write_nothing(app, body):
    assert app.post(body).status_code == 400
    assert app.counts() == NOTHING


@pytest.mark.parametrize("change", [
    lambda b: b["header"].pop("event_id"),
    lambda b: b["header"].update(event_id=""),
    lambda b: b["header"].update(event_id=12345),
    lambda b: b["header"].update(event_id="e" * 129),
    lambda b: b["header"].pop("event_type"),
    lambda b: b["header"].update(event_id="ev-nul\u0000"),
    lambda b: b["event"]["message"].update(content="nul \u0000 in content"),
])
def test_events_without_a_usable_event_id_or_type_are_400_and_write_nothing(app, change):
    body = v2_event("ev-bad")
    change(body)
    assert app.post(body).status_code == 400
    v1 = v1_event("uuid-bad")
    v1.pop("uuid")
    assert app.post(v1).status_code == 400
    assert app.counts() == NOTHING


# -- recording -----------------------------------------------------------------
def test_duplicate_deliveries_are_recorded_once_and_the_session_follows_new_events(app):
    first = app.post(v2_event("ev-1", text="hello"))
    assert first.status_code == 200 and first.json() == {"ok": True, "duplicate": False}
    again = app.post(v2_event("ev-1", text="hello"))
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert app.counts() == {"events": 1, "user_sessions": 1, "messages": 1}

    assert app.post(v2_event("ev-2", text="second")).json()["duplicate"] is False
    assert app.post(v1_event("uuid-3", open_id="ou_bob")).json()["duplicate"] is False
    assert app.post(v1_event("uuid-3", open_id="ou_bob")).json()["duplicate"] is True

    events = app.rows(Event)
    assert [(e.event_id, e.event_type) for e in events] == [
        ("ev-1", "im.message.receive_v1"), ("ev-2", "im.message.receive_v1"), ("uuid-3", "p2p_chat_create")]
    assert events[0].payload["event"]["sender"]["sender_id"]["open_id"] == "ou_alice"
    for event in events:  # the verification token is not kept in the log
        assert_no_leak(TOKEN, json.dumps(event.payload), where="stored payload")

    sessions = {s.open_id: s for s in app.rows(UserSession)}
    alice, bob = sessions["ou_alice"], sessions["ou_bob"]
    assert (alice.event_count, alice.last_event_id, alice.state) == (2, "ev-2", {})
    assert alice.last_event_at is not None and alice.updated_at is not None
    assert (bob.event_count, bob.last_event_id, bob.last_event_type) == (1, "uuid-3", "p2p_chat_create")

    messages = app.rows(Message)
    assert [(m.message_id, m.event_id, m.sender_open_id, json.loads(m.content)["text"]) for m in messages] == [
        ("om_ev-1", "ev-1", "ou_alice", "hello"), ("om_ev-2", "ev-2", "ou_alice", "second")]


def test_repository_keeps_the_bots_session_state(backend):
    db = backend.database()

    async def scenario():
        try:
            await create_tables(db)
            async with db.unit_of_work() as session:
                repo = EventRepository(session)
                assert await repo.record_event("ev-a", "t", {"k": [1, "two", None]}) is True
                assert await repo.record_event("ev-a", "t", {"other": True}) is False
                created = await repo.touch_session("ou_carol", "ev-a", "t")
                assert created.event_count == 1 and created.state == {}
                created.state = {"step": 2, "lang": "zh"}
            async with db.unit_of_work() as session:
                touched = await EventRepository(session).touch_session("ou_carol", "ev-b", "t2")
                assert (touched.event_count, touched.last_event_id) == (2, "ev-b")
                assert touched.state == {"step": 2, "lang": "zh"}
            events = await _all(db, Event)
            assert [(e.event_id, e.payload) for e in events] == [("ev-a", {"k": [1, "two", None]})]
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_the_database_has_the_conventionally_named_constraints(backend):
    assert FeishuBase.metadata.naming_convention == NAMING_CONVENTION
    assert set(FeishuBase.metadata.tables) == {"events", "user_sessions", "messages"}
    db = backend.database()

    def names(sync_conn) -> set[str]:
        found = set()
        inspector = inspect(sync_conn)
        for table in ("events", "user_sessions", "messages"):
            found |= {c["name"] for c in inspector.get_unique_constraints(table)}
            found |= {c["name"] for c in inspector.get_foreign_keys(table)}
            found |= {i["name"] for i in inspector.get_indexes(table)}
            if backend.kind == "postgresql":  # SQLite does not keep primary key names
                found.add(inspector.get_pk_constraint(table)["name"])
        return found

    async def scenario():
        try:
            await create_tables(db)
            async with db.engine.connect() as conn:
                return await conn.run_sync(names)
        finally:
            await db.dispose()

    found = asyncio.run(scenario())
    expected = {"uq_events_event_id", "uq_user_sessions_open_id", "uq_messages_message_id",
                "fk_messages_event_id_events", "ix_events_event_type", "ix_messages_chat_id"}
    if backend.kind == "postgresql":
        expected |= {"pk_events", "pk_user_sessions", "pk_messages"}
    assert expected <= found


def test_twenty_concurrent_deliveries_as_separate_units_of_work(backend):
    """Separate units of work at once, up to the pool's five connections on PostgreSQL
    (SQLite has one writer at a time, so EventStore serializes them there)."""
    db = backend.database()  # the provisioned pool (2 + 3): the role's connection limit
    event = parse(v2_event("ev-race", open_id="ou_racer"), TOKEN)

    async def race():
        try:
            await create_tables(db)
            store = EventStore(db)
            results = await asyncio.gather(*(store.store(event) for _ in range(20)))
            return results, await _counts(db), await _all(db, UserSession)
        finally:
            await db.dispose()

    results, counts, sessions = asyncio.run(race())
    assert results.count(True) == 1 and results.count(False) == 19
    assert counts == {"events": 1, "user_sessions": 1, "messages": 1}
    assert [(s.open_id, s.event_count) for s in sessions] == [("ou_racer", 1)]


def test_twenty_concurrent_deliveries_over_http(app):
    body = json.dumps(v2_event("ev-http-race", open_id="ou_racer")).encode()
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: app.post(body), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    duplicates = [r.json()["duplicate"] for r in responses]
    assert duplicates.count(False) == 1 and duplicates.count(True) == 19
    assert app.counts() == {"events": 1, "user_sessions": 1, "messages": 1}
    assert [(s.open_id, s.event_count) for s in app.rows(UserSession)] == [("ou_racer", 1)]


# -- health and start-up ---------------------------------------------------------
def test_health(app, backend):
    assert app.client.get("/health").json() == {"database": "ok"}
    broken = Database.from_env(env={"DATABASE_URL": "postgresql+asyncpg://u:pw@127.0.0.1:1/db"})
    with TestClient(create_app(broken, TOKEN)) as client:
        response = client.get("/health")
    assert response.status_code == 503 and response.json() == {"database": "unavailable"}


def test_an_empty_verification_token_is_refused(backend):
    with pytest.raises(ValueError):
        create_app(backend.database(), "")


def test_main_needs_a_token_and_uvicorn_and_never_prints_the_url(backend):
    env = {k: v for k, v in os.environ.items() if k not in ("FEISHU_VERIFICATION_TOKEN", "DATABASE_URL")}
    env.update(backend.env)
    cmd = [sys.executable, "-m", "bots.feishu_bot"]
    no_token = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert no_token.returncode == 2 and "FEISHU_VERIFICATION_TOKEN" in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1
    if importlib.util.find_spec("uvicorn") is None:
        no_server = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                   env={**env, "FEISHU_VERIFICATION_TOKEN": TOKEN})
        assert no_server.returncode == 2 and "uvicorn is not installed" in no_server.stderr
        assert len(no_server.stderr.strip().splitlines()) == 1
    bad_url = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             env={**env, "FEISHU_VERIFICATION_TOKEN": TOKEN,
                                  "DATABASE_URL": "mysql://u:pw-s3cret@h/db"})
    assert bad_url.returncode == 2 and "DATABASE_URL" in bad_url.stderr
    assert len(bad_url.stderr.strip().splitlines()) == 1
    assert_no_leak("pw-s3cret", bad_url.stdout, bad_url.stderr)
    token_file = subprocess.run(cmd, capture_output=True, text=True, timeout=60,  # the token as a Docker secret
                                env={**env, "FEISHU_VERIFICATION_TOKEN_FILE": "/nonexistent/token",
                                     "DATABASE_URL": "mysql://u:pw-s3cret@h/db"})
    assert token_file.returncode == 2 and "FEISHU_VERIFICATION_TOKEN_FILE: cannot read" in token_file.stderr
    assert len(token_file.stderr.strip().splitlines()) == 1
    both = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**env, "FEISHU_VERIFICATION_TOKEN": TOKEN, "FEISHU_VERIFICATION_TOKEN_FILE": "/x"})
    assert both.returncode == 2 and "both FEISHU_VERIFICATION_TOKEN and" in both.stderr
    for proc in (no_token, bad_url, token_file, both):
        assert_no_leak(TOKEN, proc.stdout, proc.stderr)
        if backend.kind == "postgresql":
            password = backend.env["DATABASE_URL"].split(":")[2].split("@")[0]
            assert_no_leak(password, proc.stdout, proc.stderr)
