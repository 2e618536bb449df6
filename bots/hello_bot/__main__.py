"""Run hello-bot with long polling: ``BOT_TOKEN=... python -m bots.hello_bot``."""

from __future__ import annotations

import asyncio
import os
import sys

from shared import ConfigError, Database


async def main() -> int:
    token = os.environ.get("BOT_TOKEN")
    if not token:
        print("error: BOT_TOKEN is not set", file=sys.stderr)
        return 2
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
