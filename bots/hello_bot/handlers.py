"""aiogram handlers: every update refreshes its user; /start greets by display name.

Handlers return the reply method instead of awaiting it: aiogram sends it (as
the webhook response, or a call when polling), and tests can read it without
a network.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiogram import Dispatcher, Router
from aiogram.filters import CommandStart
from aiogram.types import Message
from sqlalchemy.ext.asyncio import AsyncSession

from shared import Database

from .models import User
from .repository import UserRepository


async def start(message: Message, user: User) -> Any:
    return message.answer(f"Hello, {user.display_name}! Nice to meet you.")


async def anything_else(message: Message, user: User, session: AsyncSession) -> Any:
    total = await UserRepository(session).count()
    return message.answer(f"{user.display_name}, I know {total} user{'s' if total != 1 else ''}. Send /start.")


def make_router() -> Router:
    """A fresh router per dispatcher (an aiogram router attaches to one parent only)."""
    router = Router(name="hello-bot")
    router.message.register(start, CommandStart())
    router.message.register(anything_else)
    return router


async def remember_user(handler: Callable[..., Awaitable[Any]], event: Any, data: dict[str, Any]) -> Any:
    """Outer update middleware: upsert the sender (runs after the session middleware)."""
    tg_user = data.get("event_from_user")
    if tg_user is None or tg_user.is_bot:
        return None  # channel posts and other bots: nobody to remember or greet
    data["user"] = await UserRepository(data["session"]).upsert(
        tg_user.id, username=tg_user.username, first_name=tg_user.first_name,
        last_name=tg_user.last_name, language_code=tg_user.language_code,
    )
    return await handler(event, data)


def build_dispatcher(db: Database) -> Dispatcher:
    """The bot's dispatcher: a unit of work per update, then the user upsert, then the router."""
    dp = Dispatcher()
    dp.update.outer_middleware(db.middleware())
    dp.update.outer_middleware(remember_user)
    dp.include_router(make_router())
    return dp
