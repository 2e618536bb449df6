"""chat-bot's HTTP API (FastAPI): ``create_app(db)``.

One unit of work per request (``db.session_dependency``), ended before the
response is sent, so a 2xx means the write is committed and an error means
nothing was written. Unknown conversation ids are 404; bodies that fail
validation are 422 and never reach the database.
"""

# No ``from __future__ import annotations``: FastAPI must see the real
# ``Session`` annotation, which is local to create_app.
import enum
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.ext.asyncio import AsyncSession

from shared import Database

from .models import TITLE_MAX
from .repository import ConversationNotFound, ConversationRepository

CONTENT_MAX_BYTES = 32 * 1024      # UTF-8 bytes of one message's content
ATTACHMENTS_MAX = 20               # attachments per message
ATTACHMENTS_MAX_BYTES = 32 * 1024  # their JSON, all together
CONTEXT_MAX = 200


class Role(str, enum.Enum):
    user = "user"
    assistant = "assistant"
    system = "system"


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field("New conversation", min_length=1, max_length=TITLE_MAX)


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str = Field(min_length=1)
    attachments: list[dict[str, Any]] = Field(default_factory=list, max_length=ATTACHMENTS_MAX)

    @field_validator("content")
    @classmethod
    def _content_size(cls, value: str) -> str:
        if len(value.encode("utf-8")) > CONTENT_MAX_BYTES:
            raise ValueError(f"content must be at most {CONTENT_MAX_BYTES} bytes (UTF-8)")
        return value

    @field_validator("attachments")
    @classmethod
    def _attachments_size(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(json.dumps(value, ensure_ascii=False).encode("utf-8")) > ATTACHMENTS_MAX_BYTES:
            raise ValueError(f"attachments must be at most {ATTACHMENTS_MAX_BYTES} bytes of JSON")
        return value


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    title: str
    created_at: datetime
    updated_at: datetime


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    conversation_id: str
    role: Role
    content: str
    attachments: list[Any]
    created_at: datetime


def create_app(db: Database) -> FastAPI:
    """The API over ``db`` (the caller owns ``db`` and disposes of it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db.heartbeat():  # the container's health check (shared.health) reads it
            yield

    app = FastAPI(title="chat-bot", lifespan=lifespan)
    # scope="function": commit (or roll back) before the response is sent.
    Session = Annotated[AsyncSession, Depends(db.session_dependency, scope="function")]

    @app.exception_handler(ConversationNotFound)
    async def not_found(request: Request, exc: ConversationNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"conversation {exc.conversation_id[:64]!r} not found"},
                            status_code=status.HTTP_404_NOT_FOUND)

    @app.post("/conversations", status_code=status.HTTP_201_CREATED, response_model=ConversationOut)
    async def create_conversation(body: ConversationCreate, session: Session) -> ConversationOut:
        conversation = await ConversationRepository(session).create(body.title)
        return ConversationOut.model_validate(conversation)

    @app.get("/conversations", response_model=list[ConversationOut])
    async def list_conversations(
        session: Session,
        limit: Annotated[int, Query(ge=1, le=CONTEXT_MAX)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[ConversationOut]:
        found = await ConversationRepository(session).list(limit=limit, offset=offset)
        return [ConversationOut.model_validate(c) for c in found]

    @app.get("/conversations/{conversation_id}/context", response_model=list[MessageOut])
    async def context(
        conversation_id: str, session: Session, limit: Annotated[int, Query(ge=1, le=CONTEXT_MAX)] = 20
    ) -> list[MessageOut]:
        messages = await ConversationRepository(session).get_context_messages(conversation_id, limit)
        return [MessageOut.model_validate(m) for m in messages]

    @app.post("/conversations/{conversation_id}/messages", status_code=status.HTTP_201_CREATED,
              response_model=MessageOut)
    async def add_message(conversation_id: str, body: MessageCreate, session: Session) -> MessageOut:
        message = await ConversationRepository(session).add_message(
            conversation_id, body.role.value, body.content, body.attachments
        )
        return MessageOut.model_validate(message)

    @app.delete("/conversations/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_conversation(conversation_id: str, session: Session) -> Response:
        await ConversationRepository(session).delete(conversation_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await db.healthcheck()
        return JSONResponse({"status": "ok" if ok else "unavailable", "database": ok},
                            status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE)

    return app
