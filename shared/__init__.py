"""The shared async data layer every bot uses (SQLAlchemy 2.0; asyncpg or aiosqlite).

    from shared import Base, TimestampMixin, Database, setting

    token = setting("BOT_TOKEN", required=True)  # BOT_TOKEN, or the file BOT_TOKEN_FILE names
    db = Database.from_env("hello-bot")        # DATABASE_URL / DATABASE_URL_FILE / DB_POOL_*
    async with db.unit_of_work() as session:   # commits on success, rolls back on error
        session.add(...)
    await db.dispose()
"""

from .database import Database, dialect_insert, healthcheck
from .models import NAMING_CONVENTION, Base, TimestampMixin
from .settings import ConfigError, DatabaseSettings, setting

__all__ = [
    "Base", "ConfigError", "Database", "DatabaseSettings", "NAMING_CONVENTION", "TimestampMixin", "dialect_insert",
    "healthcheck", "setting",
]
