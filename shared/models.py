"""Declarative base and mixins shared by every bot's models."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry

# Named constraints make Alembic autogenerate stable (and downgrades possible):
# without names, PostgreSQL invents them and SQLite has none to drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs, DeclarativeBase):
    """Base class for a bot's models. Each bot subclasses it once, so each bot
    has its own MetaData (its own schema history), with the shared naming convention."""

    __abstract__ = True
    metadata = MetaData(naming_convention=NAMING_CONVENTION)

    def __init_subclass__(cls, **kwargs):
        # A bot's own abstract base (``class HelloBase(Base): __abstract__ = True``)
        # gets its own registry and MetaData, so bots that share a process (the
        # fleet migrator) never see each other's tables in their schema.
        if cls.__dict__.get("__abstract__") and Base in cls.__bases__:
            own = registry(metadata=MetaData(naming_convention=NAMING_CONVENTION))
            cls._sa_registry = own
            cls.registry = own
            cls.metadata = own.metadata
        super().__init_subclass__(**kwargs)


class TimestampMixin:
    """Server-side, timezone-aware creation and update times."""

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )
