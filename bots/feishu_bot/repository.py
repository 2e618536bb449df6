"""feishu-bot's data access: each event recorded exactly once, even when deliveries race.

``EventRepository(session)`` takes the delivery's session and never commits: the
delivery's unit of work does (``EventStore`` in api.py). Every write is one
``INSERT ... ON CONFLICT`` statement, so concurrent duplicate deliveries cannot both
insert: on PostgreSQL the later ones wait for the first transaction and then do
nothing (or update, for sessions).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from shared import dialect_insert

from .events import FeishuEvent
from .models import Event, Message, UserSession


class EventRepository:
    """The webhook event log, per-user sessions, and received messages."""

    def __init__(self, session: AsyncSession):
        self.session = session

    async def record(self, event: FeishuEvent) -> bool:
        """Record the event, and when it is new, its sender's session and message; True when new."""
        new = await self.record_event(event.event_id, event.event_type, event.payload)
        if new and event.open_id:
            await self.touch_session(event.open_id, event.event_id, event.event_type)
        if new and event.message:
            m = event.message
            await self.record_message(message_id=m.message_id, event_id=event.event_id, chat_id=m.chat_id,
                                      sender_open_id=event.open_id, message_type=m.message_type, content=m.content)
        return new

    async def record_event(self, event_id: str, event_type: str, payload: dict[str, Any]) -> bool:
        """Record the event unless it is already recorded; True when it was new."""
        stmt = (
            dialect_insert(self.session, Event)
            .values(event_id=event_id, event_type=event_type, payload=payload)
            .on_conflict_do_nothing(index_elements=[Event.event_id])
            .returning(Event.id)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none() is not None

    async def touch_session(self, open_id: str, event_id: str, event_type: str) -> UserSession:
        """Create or refresh ``open_id``'s session with its latest event (its ``state`` is kept)."""
        stmt = dialect_insert(self.session, UserSession).values(
            open_id=open_id, state={}, last_event_id=event_id, last_event_type=event_type,
            last_event_at=func.now(), event_count=1,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[UserSession.open_id],
            set_={
                "last_event_id": stmt.excluded.last_event_id,
                "last_event_type": stmt.excluded.last_event_type,
                "last_event_at": func.now(),
                "event_count": UserSession.event_count + 1,
                "updated_at": func.now(),
            },
        ).returning(UserSession.id)
        session_id = (await self.session.execute(stmt)).scalar_one()
        found = await self.session.get(UserSession, session_id, populate_existing=True)
        assert found is not None
        return found

    async def record_message(
        self, *, message_id: str, event_id: str, chat_id: str | None, sender_open_id: str | None,
        message_type: str | None, content: str | None,
    ) -> bool:
        """Keep a received message once (by Feishu's message_id); True when it was new."""
        stmt = (
            dialect_insert(self.session, Message)
            .values(message_id=message_id, event_id=event_id, chat_id=chat_id, sender_open_id=sender_open_id,
                    message_type=message_type, content=content)
            .on_conflict_do_nothing(index_elements=[Message.message_id])
            .returning(Message.id)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none() is not None
