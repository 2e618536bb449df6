"""Data access for chat-bot: conversations, their messages, and file metadata.

Repositories take a session and never commit: the caller's unit of work does
(``async with db.unit_of_work() as session``, or ``Depends(db.session_dependency)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, Select, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from .models import ROLES, Conversation, FileMetadata, Message


class ConversationNotFound(LookupError):
    """No conversation has this id."""

    def __init__(self, conversation_id: str):
        super().__init__(f"conversation {conversation_id!r} not found")
        self.conversation_id = conversation_id


def _context_query() -> Select[tuple[Message]]:
    """The context-window statement, built once (building it costs more than the
    query on a warm server): the newest ``:limit`` rows of ``:conversation_id``
    read backwards along the ``(conversation_id, created_at, seq)`` index, then
    re-ordered oldest first."""
    recent = (
        select(Message).where(Message.conversation_id == bindparam("conversation_id"))
        .order_by(Message.created_at.desc(), Message.seq.desc())
        .limit(bindparam("limit", type_=Integer))
        .subquery("recent")
    )
    m = aliased(Message, recent)
    return select(m).order_by(m.created_at, m.seq)


_CONTEXT_QUERY = _context_query()


class ConversationRepository:
    """Conversations and their messages."""

    def __init__(self, session: AsyncSession):
        self.session = session

    # -- conversations ----------------------------------------------------------
    async def create(self, title: str | None = None) -> Conversation:
        conversation = Conversation() if title is None else Conversation(title=title)
        self.session.add(conversation)
        await self.session.flush()
        return conversation

    async def get(self, conversation_id: str) -> Conversation:
        conversation = await self.session.get(Conversation, conversation_id)
        if conversation is None:
            raise ConversationNotFound(conversation_id)
        return conversation

    async def exists(self, conversation_id: str) -> bool:
        found = await self.session.scalar(select(Conversation.id).where(Conversation.id == conversation_id))
        return found is not None

    async def list(self, limit: int = 50, offset: int = 0) -> Sequence[Conversation]:
        """Newest first."""
        stmt = (
            select(Conversation).order_by(Conversation.created_at.desc(), Conversation.id.desc())
            .limit(limit).offset(offset)
        )
        return (await self.session.scalars(stmt)).all()

    async def update(self, conversation_id: str, *, title: str) -> Conversation:
        conversation = await self.get(conversation_id)
        conversation.title = title
        await self.session.flush()
        return conversation

    async def delete(self, conversation_id: str) -> None:
        """Delete a conversation and all its messages."""
        gone = await self.session.execute(
            delete(Conversation).where(Conversation.id == conversation_id).returning(Conversation.id)
        )
        if gone.first() is None:
            raise ConversationNotFound(conversation_id)
        # PostgreSQL's ON DELETE CASCADE has already removed the messages; SQLite
        # enforces foreign keys only with PRAGMA foreign_keys=ON, so say it here too.
        await self.session.execute(delete(Message).where(Message.conversation_id == conversation_id))

    # -- messages -----------------------------------------------------------------
    async def add_message(
        self, conversation_id: str, role: str, content: str, attachments: list[Any] | None = None
    ) -> Message:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
        # One statement checks the conversation exists, takes the next seq, locks
        # the row (PostgreSQL) until commit, and bumps updated_at.
        # RETURNING the entity with populate_existing refreshes a Conversation
        # already in the session (its last_seq and updated_at stay current).
        conversation = await self.session.scalar(
            update(Conversation).where(Conversation.id == conversation_id)
            .values(last_seq=Conversation.last_seq + 1).returning(Conversation)
            .execution_options(populate_existing=True)
        )
        if conversation is None:
            raise ConversationNotFound(conversation_id)
        message = Message(
            conversation_id=conversation_id, seq=conversation.last_seq, role=role, content=content,
            attachments=list(attachments or []),
        )
        self.session.add(message)
        await self.session.flush()
        return message

    async def get_all_messages(self, conversation_id: str) -> Sequence[Message]:
        """Every message, oldest first."""
        messages = (await self.session.scalars(
            select(Message).where(Message.conversation_id == conversation_id)
            .order_by(Message.created_at, Message.seq)
        )).all()
        if not messages and not await self.exists(conversation_id):
            raise ConversationNotFound(conversation_id)
        return messages

    async def get_context_messages(self, conversation_id: str, limit: int = 20) -> Sequence[Message]:
        """The most recent ``limit`` messages, oldest first, in one query.

        The inner query walks the ``(conversation_id, created_at, seq)`` index
        backwards and stops after ``limit`` rows; the outer one re-orders those.
        An existence check runs only when the result is empty.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1 (got {limit})")
        messages = (await self.session.scalars(
            _CONTEXT_QUERY, {"conversation_id": conversation_id, "limit": limit}
        )).all()
        if not messages and not await self.exists(conversation_id):
            raise ConversationNotFound(conversation_id)
        return messages


class FileRepository:
    """Metadata of uploaded files (the bytes live elsewhere)."""

    def __init__(self, session: AsyncSession):
        self.session = session

    async def create(self, filename: str, content_type: str, size: int) -> FileMetadata:
        if size < 0:
            raise ValueError(f"size must be zero or more (got {size})")
        meta = FileMetadata(filename=filename, content_type=content_type, size=size)
        self.session.add(meta)
        await self.session.flush()
        return meta

    async def get(self, file_id: str) -> FileMetadata | None:
        return await self.session.get(FileMetadata, file_id)

    async def delete(self, file_id: str) -> bool:
        gone = await self.session.execute(delete(FileMetadata).where(FileMetadata.id == file_id).returning(FileMetadata.id))
        return gone.first() is not None
