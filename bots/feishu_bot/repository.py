"""feishu-bot's data access: each event recorded exactly once, even when deliveries race.

Every write is one ``INSERT ... ON CONFLICT`` statement, so concurrent duplicate
deliveries cannot both insert: on PostgreSQL the later ones wait for the first
transaction and then do nothing (or update, for sessions).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from .models import Event, Message, UserSession


def _insert(session: AsyncSession, model: type) -> Any:
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


async def record_event(session: AsyncSession, event_id: str, event_type: str, payload: dict[str, Any]) -> bool:
    """Record the event unless it is already recorded; True when it was new."""
    stmt = (
        _insert(session, Event)
        .values(event_id=event_id, event_type=event_type, payload=payload)
        .on_conflict_do_nothing(index_elements=[Event.event_id])
        .returning(Event.id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def touch_session(session: AsyncSession, open_id: str, event_id: str, event_type: str) -> UserSession:
    """Create or refresh ``open_id``'s session with its latest event (its ``state`` is kept)."""
    stmt = _insert(session, UserSession).values(
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
    session_id = (await session.execute(stmt)).scalar_one()
    found = await session.get(UserSession, session_id, populate_existing=True)
    assert found is not None
    return found


async def record_message(
    session: AsyncSession, *, message_id: str, event_id: str, chat_id: str | None, sender_open_id: str | None,
    message_type: str | None, content: str | None,
) -> bool:
    """Keep a received message once (by Feishu's message_id); True when it was new."""
    stmt = (
        _insert(session, Message)
        .values(message_id=message_id, event_id=event_id, chat_id=chat_id, sender_open_id=sender_open_id,
                message_type=message_type, content=content)
        .on_conflict_do_nothing(index_elements=[Message.message_id])
        .returning(Message.id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None
