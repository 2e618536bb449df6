"""hello-bot's data access: one upsert per update, safe when updates race.

``UserRepository(session)`` takes the update's session and never commits: the
update's unit of work does (``db.middleware()`` in handlers.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared import dialect_insert

from .models import User

_FIELDS = ("username", "first_name", "last_name", "language_code")


class UserRepository:
    """Telegram users."""

    def __init__(self, session: AsyncSession):
        self.session = session

    async def upsert(self, telegram_id: int, **fields: Any) -> User:
        """Create or refresh the user with ``telegram_id`` in one statement.

        INSERT ... ON CONFLICT DO UPDATE, so two updates from a new user arriving
        at once cannot both insert (the unique index would fail one of them).
        """
        values = {k: fields.get(k) for k in _FIELDS}
        stmt = dialect_insert(self.session, User).values(telegram_id=telegram_id, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[User.telegram_id],
            set_={**{k: stmt.excluded[k] for k in _FIELDS}, "is_active": True, "updated_at": func.now()},
        ).returning(User.id)
        user_id = (await self.session.execute(stmt)).scalar_one()
        user = await self.session.get(User, user_id, populate_existing=True)
        assert user is not None
        return user

    async def count(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(User)) or 0)
