"""The one Alembic environment every bot shares (alembic's async template style).

Each bot's code has its own script directory, ``migrations/<code>/versions``,
and its own target metadata (``bots/<code>/models.py: metadata``); its
version table lives in the bot's own database.

Two ways in:

- ``provision migrate`` (the fast path) opens the connection itself, as the
  bot's own role, and passes it through ``config.attributes["connection"]``
  (a sync Connection handed out by ``AsyncConnection.run_sync``) together with
  ``config.attributes["target_metadata"]``. Nothing here starts an event loop
  then, so it works inside a running loop.
- plain ``alembic -c migrations/alembic.ini -n <code> upgrade head`` with the
  bot's ``DATABASE_URL`` (or ``DATABASE_URL_FILE``) in the environment: an
  async engine is built here and driven with ``asyncio.run``.

URLs never go through ini options (``%`` in a password breaks ConfigParser
interpolation): they come from attributes or the environment.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection

config = context.config
attributes = config.attributes


def target_metadata():
    metadata = attributes.get("target_metadata")
    if metadata is None:
        from provisioning.codes import load_metadata

        code = attributes.get("code") or config.get_main_option("botfleet_code")
        if not code:
            raise RuntimeError("no bot code: set botfleet_code in the alembic.ini section or pass target_metadata")
        root = Path(config.get_main_option("script_location") or ".").resolve().parent
        metadata = load_metadata(root, code)
    return metadata


def configure(**kwargs) -> None:
    hooks = {key: attributes[key] for key in ("on_version_apply", "process_revision_directives") if key in attributes}
    context.configure(target_metadata=target_metadata(), compare_type=True, **hooks, **kwargs)


def run_migrations_offline() -> None:
    """``--sql``: emit the DDL for the target dialect instead of running it."""
    configure(
        dialect_name=attributes.get("dialect_name", "postgresql"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from shared.database import tls_arguments
    from shared.settings import DatabaseSettings

    code = config.get_main_option("botfleet_code") or "bot"
    settings = DatabaseSettings.from_env(code.replace("_", "-"))
    url, connect_args = (settings.url, {}) if settings.is_sqlite else tls_arguments(settings.url, settings.source)
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run_async_migrations())
    else:
        raise RuntimeError(
            "an event loop is already running: open the connection yourself and pass it as "
            "config.attributes['connection'] (inside AsyncConnection.run_sync)"
        )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
