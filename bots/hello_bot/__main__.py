"""Run hello-bot with long polling: ``BOT_TOKEN=... python -m bots.hello_bot``
(or ``BOT_TOKEN_FILE=/run/secrets/BOT_TOKEN``)."""

from __future__ import annotations

import asyncio
import sys

from shared import ConfigError, Database, setting


async def main() -> int:
    token = setting("BOT_TOKEN", required=True)  # a ConfigError (exit 2) names it, never its value
    from aiogram import Bot

    from .handlers import build_dispatcher

    db = Database.from_env("hello-bot")
    try:
        await build_dispatcher(db).start_polling(Bot(token))
    finally:
        await db.dispose()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
