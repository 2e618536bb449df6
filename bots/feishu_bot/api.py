"""feishu-bot's HTTP API (FastAPI): ``create_app(db, verification_token)``.

POST /webhook/event answers Feishu's URL verification and records every event
once: the verification token is checked on every request (401 missing, 403
wrong), bodies over ``max_body`` bytes are 413 (by Content-Length and by what
actually arrives), malformed bodies are 400, and a duplicate delivery is 200
with ``{"duplicate": true}``. The unit of work ends before the response is
sent, so a 200 means the event is committed and anything else wrote nothing.
GET /health is 200 when the database answers, else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shared import Database

from .events import BadEvent, FeishuEvent, load_body, parse
from .repository import EventRepository


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            raise BadEvent(400, "invalid Content-Length")
        if len(declared) > 18 or int(declared) > limit:
            raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class EventStore:
    """The webhook's unit of work: one per delivery, through ``db``, around ``EventRepository``.

    SQLite has one writer at a time (and an in-memory database is a single
    connection shared by every session), so on SQLite the units of work are
    serialized here; on PostgreSQL they run concurrently and the
    ``ON CONFLICT`` statements keep duplicates out.
    """

    def __init__(self, db: Database):
        self.db = db
        self._lock = asyncio.Lock() if db.settings.is_sqlite else contextlib.nullcontext()

    async def store(self, event: FeishuEvent) -> bool:
        """Record the event (committed on return), and when it is new, its sender's session and
        message; True when new."""
        async with self._lock, self.db.unit_of_work() as session:
            return await EventRepository(session).record(event)


def create_app(db: Database, verification_token: str, max_body: int = 64 * 1024) -> FastAPI:
    """The webhook over ``db``; the app disposes of ``db``'s pool when it shuts down."""
    if not verification_token:
        raise ValueError("verification_token must not be empty")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db.heartbeat():  # the container's health check (shared.health) reads it
            yield
        await db.dispose()  # in the server's own event loop, where the pooled connections live

    app = FastAPI(title="feishu-bot", lifespan=lifespan)
    events = EventStore(db)

    @app.post("/webhook/event")
    async def webhook_event(request: Request) -> JSONResponse:
        try:
            raw = await _read_body(request, max_body)
            event = parse(load_body(raw), verification_token)
        except _TooLarge:
            return JSONResponse({"detail": f"the body is larger than {max_body} bytes"}, status_code=413)
        except BadEvent as err:
            return JSONResponse({"detail": err.detail}, status_code=err.status)
        if event.challenge is not None:
            return JSONResponse({"challenge": event.challenge})
        new = await events.store(event)
        return JSONResponse({"ok": True, "duplicate": not new})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await db.healthcheck()
        return JSONResponse({"database": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    return app
