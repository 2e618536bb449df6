"""Engine, sessions, unit of work, health check, and framework glue for bots.

Framework glue (FastAPI dependency, aiogram middleware) is duck-typed, so this
module imports neither framework: they are optional extras of each bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import await_only

from . import health
from .settings import ConfigError, DatabaseSettings

log = logging.getLogger("shared.database")


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# A new connection refused because the server is full for a moment (53300: another bot's
# connection storm holds slots until PostgreSQL refuses it, as it checks a role's CONNECTION
# LIMIT only after the backend started) or is starting up (57P03) is tried again a few times
# before the error reaches the bot: 1.55 s in all. Any other error is raised at once.
CONNECT_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
_TRANSIENT_SQLSTATES = frozenset({"53300", "57P03"})


def _sqlstate(err: BaseException) -> str | None:
    """The SQLSTATE of a driver error, through SQLAlchemy's and the adapter's wrapping."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and code:
            return code
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None


def _retry_transient_connects(engine: AsyncEngine) -> None:
    """New connections of ``engine`` retried on a full or starting server (CONNECT_RETRY_DELAYS);
    the wait is an asyncio sleep, so the bot's event loop keeps serving meanwhile."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        for delay in (*CONNECT_RETRY_DELAYS, None):
            try:
                return dialect.connect(*cargs, **cparams)
            except Exception as err:
                if delay is None or _sqlstate(err) not in _TRANSIENT_SQLSTATES:
                    raise
                await_only(asyncio.sleep(delay))
        return None  # not reached: the last attempt returns or raises


def tls_arguments(url: URL, source: str) -> tuple[URL, dict[str, Any]]:
    """libpq's ``sslmode``/``sslrootcert`` in a URL (the compose stack's bots get
    ``sslmode=verify-full&sslrootcert=...``), as asyncpg's ``ssl`` argument: SQLAlchemy would
    hand them to asyncpg as keywords it does not know. Other query parameters pass through."""
    query = dict(url.query)
    mode, root = query.pop("sslmode", None), query.pop("sslrootcert", None)
    if mode is None and root is None:
        return url, {}
    mode = str(mode or "prefer")
    if mode not in _SSL_MODES:
        raise ConfigError(f"{source}: sslmode must be one of {', '.join(_SSL_MODES)}")
    url = url.set(query=query)
    if mode == "disable":
        return url, {"ssl": False}
    if mode in ("allow", "prefer", "require"):
        return url, {"ssl": mode}
    try:
        context = ssl.create_default_context(cafile=str(root) if root else None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{source}: cannot load sslrootcert {root}: {getattr(err, 'strerror', None) or err}") from None
    context.check_hostname = mode == "verify-full"
    return url, {"ssl": context}


def make_engine(settings: DatabaseSettings, *, application_name: str | None = None, echo: bool = False) -> AsyncEngine:
    """An async engine with the fleet's pool settings where the driver takes them.

    PostgreSQL: QueuePool sized by the settings, pre-ping, recycle. SQLite: no
    pool arguments (in-memory databases share one connection via StaticPool so
    every session sees the same data).
    """
    kwargs: dict[str, Any] = {"echo": echo}
    url = settings.url
    if settings.is_sqlite:
        if settings.url.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(
            pool_size=settings.pool_size, max_overflow=settings.max_overflow, pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle, pool_pre_ping=True,
        )
        url, connect_args = tls_arguments(url, settings.source)
        if application_name:
            connect_args["server_settings"] = {"application_name": application_name}
        if connect_args:
            kwargs["connect_args"] = connect_args
    try:
        engine = create_async_engine(url, **kwargs)
    except (NoSuchModuleError, ImportError) as err:
        missing = getattr(err, "name", None) or settings.url.drivername
        raise ConfigError(
            f"{settings.source}: the driver for {settings.url.drivername!r} is not installed ({missing}); "
            "pip install asyncpg (PostgreSQL) or aiosqlite (SQLite)"
        ) from None
    if not settings.is_sqlite:
        _retry_transient_connects(engine)
    return engine


def dialect_insert(session: AsyncSession, model: type) -> Any:
    """``INSERT INTO model`` in the dialect of ``session``'s database (PostgreSQL or SQLite).

    Both dialects' inserts have ``on_conflict_do_nothing`` / ``on_conflict_do_update``, so a
    repository writes one race-free upsert that runs on both.
    """
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(model)


async def healthcheck(engine: AsyncEngine, timeout: float = 5.0) -> bool:
    """``SELECT 1`` within ``timeout`` seconds; False on any failure (never raises)."""
    async def probe() -> bool:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT 1"))).scalar_one() == 1

    try:
        return await asyncio.wait_for(probe(), timeout)
    except Exception:  # noqa: BLE001 - a health check reports, it does not raise
        return False


class Database:
    """One bot's engine and session factory."""

    def __init__(self, settings: DatabaseSettings, *, application_name: str | None = None, echo: bool = False):
        self.settings = settings
        self.engine = make_engine(settings, application_name=application_name, echo=echo)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_env(cls, bot: str = "bot", env: dict[str, str] | None = None, **kwargs: Any) -> "Database":
        return cls(DatabaseSettings.from_env(bot, env), application_name=bot, **kwargs)

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def session_dependency(self) -> AsyncIterator[AsyncSession]:
        """FastAPI dependency: ``Depends(db.session_dependency)``, one unit of work per request."""
        async with self.unit_of_work() as session:
            yield session

    def middleware(self) -> Callable[..., Awaitable[Any]]:
        """aiogram 3 middleware: ``dp.update.middleware(db.middleware())``, a session per update
        in ``data["session"]``, committed when the handler succeeds."""
        async def session_middleware(handler: Callable[..., Awaitable[Any]], event: Any, data: dict[str, Any]) -> Any:
            async with self.unit_of_work() as session:
                data["session"] = session
                return await handler(event, data)

        return session_middleware

    async def healthcheck(self, timeout: float = 5.0) -> bool:
        return await healthcheck(self.engine, timeout)

    @contextlib.asynccontextmanager
    async def heartbeat(self, path: str | os.PathLike[str] | None = None,
                        every: float = health.HEARTBEAT_S) -> AsyncIterator[None]:
        """While the block runs, check the database through this pool every ``every`` seconds and
        record the outcome in ``path`` (default: BOTFLEET_HEALTH_FILE; neither: nothing is kept),
        for the container's health check, ``python -m shared.health``. The file is removed when
        the block ends."""
        target = Path(path) if path is not None else health.health_file()
        if target is None:
            yield
            return
        beating = asyncio.create_task(self._beat(target, every), name=f"heartbeat {target}")
        try:
            yield
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            with contextlib.suppress(OSError):
                target.unlink()

    async def _beat(self, path: Path, every: float) -> None:
        was: bool | None = None
        while True:
            ok = await self.healthcheck()
            try:
                health.record(path, ok)
            except OSError as err:  # a read-only /tmp: the health check falls back to its own connection
                log.warning("heartbeat stopped: cannot write %s (%s)", path, err.strerror or err)
                return
            if ok != was and (was is not None or not ok):
                log.warning("database %s (heartbeat)", "answers again" if ok else "unreachable")
            was = ok
            await asyncio.sleep(every)

    async def dispose(self) -> None:
        """Close every pooled connection (call on shutdown)."""
        await self.engine.dispose()
