"""hello-bot's schema: Telegram users."""

from __future__ import annotations

from sqlalchemy import BigInteger, String, true
from sqlalchemy.orm import Mapped, mapped_column

from shared import Base, TimestampMixin


class HelloBase(Base):
    """hello-bot's own declarative base (its own MetaData)."""

    __abstract__ = True


# The bot's schema, for its migrations (migrations/env.py and provision check).
metadata = HelloBase.metadata


class User(HelloBase, TimestampMixin):
    """A Telegram user who has written to the bot."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, unique=True, index=True)
    username: Mapped[str | None] = mapped_column(String(255))
    first_name: Mapped[str | None] = mapped_column(String(255))
    last_name: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=true())
    language_code: Mapped[str | None] = mapped_column(String(10))

    @property
    def full_name(self) -> str:
        return " ".join(part for part in (self.first_name, self.last_name) if part)

    @property
    def display_name(self) -> str:
        return self.username or self.full_name or f"User{self.telegram_id}"
