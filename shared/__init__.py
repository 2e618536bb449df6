"""The shared async data layer every bot uses (SQLAlchemy 2.0; asyncpg or aiosqlite).

    from shared import Base, TimestampMixin, Database, setting

    token = setting("BOT_TOKEN", required=True)  # BOT_TOKEN, or the file BOT_TOKEN_FILE names
    db = Database.from_env("hello-bot")        # DATABASE_URL / DATABASE_URL_FILE / DB_POOL_*
    async with db.heartbeat():                 # the container's health check reads it (shared.health)
        async with db.unit_of_work() as session:   # commits on success, rolls back on error
            session.add(...)
    await db.dispose()

The names are loaded when first used (PEP 562), so ``python -m shared.health``, the container's
health check, starts without importing SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .database import Database, dialect_insert, healthcheck
    from .models import NAMING_CONVENTION, Base, TimestampMixin
    from .settings import ConfigError, DatabaseSettings, setting

_WHERE = {
    "Database": "database", "dialect_insert": "database", "healthcheck": "database",
    "NAMING_CONVENTION": "models", "Base": "models", "TimestampMixin": "models",
    "ConfigError": "settings", "DatabaseSettings": "settings", "setting": "settings",
}
__all__ = ["Base", "ConfigError", "Database", "DatabaseSettings", "NAMING_CONVENTION", "TimestampMixin",
           "dialect_insert", "healthcheck", "setting"]  # the keys of _WHERE (tests/test_shared.py)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
