"""feishu-bot's schema: the webhook event log, per-user sessions, and received messages.

``events.event_id`` is unique: a delivery Feishu retries (or sends twice at
once) is recorded once (``EventRepository.record_event``). Constraint names come
from the shared naming convention. Schemas come from migrations;
``FeishuBase.metadata.create_all`` is for tests only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared import Base, TimestampMixin

ID_MAX = 128  # event ids, open ids, message and chat ids (Feishu's are 32-60 characters)
TYPE_MAX = 128

JSONType = JSON().with_variant(JSONB(), "postgresql")


class FeishuBase(Base):
    """feishu-bot's own declarative base (its own MetaData)."""

    __abstract__ = True


# The bot's schema, for its migrations (migrations/env.py and provision check).
metadata = FeishuBase.metadata


class Event(FeishuBase):
    """One webhook event, as received (the verification token removed from the payload)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(ID_MAX), unique=True, nullable=False)
    event_type: Mapped[str] = mapped_column(String(TYPE_MAX), index=True, nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True, nullable=False
    )


class UserSession(FeishuBase, TimestampMixin):
    """One Feishu user (by open_id): the bot's conversation state and their latest event."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    open_id: Mapped[str] = mapped_column(String(ID_MAX), unique=True, nullable=False)
    # The bot's own per-user state; event recording never overwrites it.
    state: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict, server_default=text("'{}'"))
    last_event_id: Mapped[str | None] = mapped_column(String(ID_MAX))
    last_event_type: Mapped[str | None] = mapped_column(String(TYPE_MAX))
    last_event_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    event_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))


class Message(FeishuBase):
    """A message the bot received (``im.message.receive_v1``): the conversation history."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str] = mapped_column(String(ID_MAX), unique=True, nullable=False)
    event_id: Mapped[str] = mapped_column(
        String(ID_MAX), ForeignKey("events.event_id", ondelete="CASCADE"), index=True, nullable=False
    )
    chat_id: Mapped[str | None] = mapped_column(String(ID_MAX), index=True)
    sender_open_id: Mapped[str | None] = mapped_column(String(ID_MAX), index=True)
    message_type: Mapped[str | None] = mapped_column(String(TYPE_MAX))
    content: Mapped[str | None] = mapped_column(Text)  # Feishu's JSON-encoded content string
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
