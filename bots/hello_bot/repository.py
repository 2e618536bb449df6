"""hello-bot's data access: one upsert per update, safe when updates race."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from .models import User

_FIELDS = ("username", "first_name", "last_name", "language_code")


async def upsert_user(session: AsyncSession, telegram_id: int, **fields: Any) -> User:
    """Create or refresh the user with ``telegram_id`` in one statement.

    INSERT ... ON CONFLICT DO UPDATE, so two updates from a new user arriving
    at once cannot both insert (the unique index would fail one of them).
    """
    values = {k: fields.get(k) for k in _FIELDS}
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(User).values(telegram_id=telegram_id, **values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[User.telegram_id],
        set_={**{k: stmt.excluded[k] for k in _FIELDS}, "is_active": True, "updated_at": func.now()},
    ).returning(User.id)
    user_id = (await session.execute(stmt)).scalar_one()
    user = await session.get(User, user_id, populate_existing=True)
    assert user is not None
    return user


async def count_users(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(User)) or 0)
