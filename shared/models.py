"""Declarative base and mixins shared by every bot's models."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import DateTime, MetaData, func, orm
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import Mapped, mapped_column

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql import FromClause

# Named constraints make Alembic autogenerate stable (and downgrades possible):
# without names, PostgreSQL invents them and SQLite has none to drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs):
    """Base class for a bot's models. Each bot subclasses it once, abstract::

        class HelloBase(Base):
            __abstract__ = True

        metadata = HelloBase.metadata   # the bot's schema, for its migrations

        class User(HelloBase, TimestampMixin):
            __tablename__ = "users"

    That class is the bot's declarative base, with its own ``registry`` and ``MetaData``
    (the shared naming convention); every non-abstract class below it is mapped by that
    registry. A direct subclass that is not abstract raises TypeError.
    """

    # Not a DeclarativeBase: all subclasses of one share its registry, and bots that share a
    # process (the fleet migrator, the tests) must not see each other's tables, nor clash on
    # class names (two bots have a ``Message``) in relationship strings. So each bot's base
    # gets its own registry here, and its classes are mapped with the registry's public
    # ``map_declaratively`` (what the ``@registry.mapped`` decorator does).
    __abstract__ = True

    if TYPE_CHECKING:  # what mapping adds, for type checkers
        registry: ClassVar[orm.registry]
        metadata: ClassVar[MetaData]
        __table__: ClassVar[FromClause]
        __mapper__: ClassVar[Mapper[Any]]

        def __init__(self, **kwargs: Any) -> None: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if Base in cls.__bases__:
            if not cls.__dict__.get("__abstract__", False):
                raise TypeError(
                    f"{cls.__name__}: subclass shared.Base once per bot with __abstract__ = True, "
                    "and map your tables on that class"
                )
            cls.registry = orm.registry(metadata=MetaData(naming_convention=NAMING_CONVENTION))
            cls.metadata = cls.registry.metadata
        elif not cls.__dict__.get("__abstract__", False):
            cls.registry.map_declaratively(cls)
        super().__init_subclass__(**kwargs)


class TimestampMixin:
    """Server-side, timezone-aware creation and update times."""

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now(), nullable=False
    )
