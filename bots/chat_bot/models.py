"""chat-bot's schema: conversations, their messages, and uploaded files' metadata.

Message order is ``(created_at, seq)``. ``created_at`` is the server's ``now()``,
which is the *transaction* start time on PostgreSQL (and has one-second
resolution on SQLite), so messages written in one transaction tie on it.
``seq`` breaks the ties: a per-conversation counter taken from
``conversations.last_seq`` by ``ConversationRepository.add_message`` with one
``UPDATE ... RETURNING`` (which also locks the conversation row on PostgreSQL,
so concurrent appends to one conversation get distinct, increasing numbers in
commit order). It needs no autoincrement, which SQLite only offers on an
``INTEGER PRIMARY KEY`` (here the key is the uuid ``id``), so it behaves the
same on both databases. The composite index ``(conversation_id, created_at,
seq)`` serves the context-window query (the last N, read backwards).

Schemas come from migrations; ``ChatBase.metadata.create_all`` is for tests only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, CheckConstraint, DateTime, ForeignKey, Index, String, Text, func, text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared import Base, TimestampMixin

ROLES = ("user", "assistant", "system")
TITLE_MAX = 200


def new_id() -> str:
    return str(uuid.uuid4())


class ChatBase(Base):
    """chat-bot's own declarative base (its own MetaData)."""

    __abstract__ = True


# The bot's schema, for its migrations (migrations/env.py and provision check).
metadata = ChatBase.metadata


class Conversation(ChatBase, TimestampMixin):
    __tablename__ = "conversations"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(TITLE_MAX), nullable=False, default="New conversation")
    # The last ``Message.seq`` handed out in this conversation (see the module docstring).
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default=text("0"))

    # passive_deletes: the database's ON DELETE CASCADE removes the messages; the
    # ORM never loads a whole conversation just to delete it.
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", passive_deletes=True,
        order_by="(Message.created_at, Message.seq)",
    )

    __table_args__ = (Index("ix_conversations_created_at", "created_at"),)

    def __repr__(self) -> str:
        return f"Conversation(id={self.id!r}, title={self.title!r})"


class Message(ChatBase):
    __tablename__ = "messages"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    attachments: Mapped[list[Any]] = mapped_column(JSON, nullable=False, default=list, server_default=text("'[]'"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
        Index("ix_messages_conversation_id_created_at_seq", "conversation_id", "created_at", "seq"),
    )

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, seq={self.seq!r}, role={self.role!r})"


class FileMetadata(ChatBase):
    __tablename__ = "file_metadata"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    content_type: Mapped[str] = mapped_column(String(255), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)

    __table_args__ = (
        CheckConstraint("size >= 0", name="size_not_negative"),
        Index("ix_file_metadata_created_at", "created_at"),
    )
