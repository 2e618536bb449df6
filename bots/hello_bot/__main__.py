"""Run hello-bot with long polling: ``BOT_TOKEN=... python -m bots.hello_bot``
(or ``BOT_TOKEN_FILE=/run/secrets/BOT_TOKEN``; ``TELEGRAM_API_URL`` for a self-hosted Bot API server).

Telegram out of reach when the bot starts (a network outage, DNS) is waited out with a
capped backoff, one log line per try, instead of a crash loop; once polling runs, aiogram
retries on its own. A token Telegram refuses ends the bot (exit 2): retrying cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import sys

from shared import ConfigError, Database, setting

log = logging.getLogger("hello-bot")
BACKOFF_S = (1, 2, 5, 10, 30, 60)


async def main() -> int:
    token = setting("BOT_TOKEN", required=True)  # a ConfigError (exit 2) names it, never its value
    api = setting("TELEGRAM_API_URL")
    from aiogram import Bot

    session = None
    if api:
        from aiogram.client.session.aiohttp import AiohttpSession
        from aiogram.client.telegram import TelegramAPIServer

        session = AiohttpSession(api=TelegramAPIServer.from_base(api))
    db = Database.from_env("hello-bot")
    bot = Bot(token, session=session)
    # SIGTERM (docker stop) and SIGINT end the bot at once, whether it polls or waits for Telegram.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    polling = asyncio.create_task(_poll(bot, db))
    stopping = asyncio.create_task(stop.wait())
    try:
        async with db.heartbeat():  # the container's health check (shared.health) reads it
            await asyncio.wait({polling, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not polling.done():
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
            return 0
        return polling.result()
    finally:
        stopping.cancel()
        await bot.session.close()
        await db.dispose()


async def _poll(bot, db: Database) -> int:
    from aiogram.exceptions import TelegramNetworkError, TelegramUnauthorizedError

    from .handlers import build_dispatcher

    for attempt in itertools.count():
        try:
            await build_dispatcher(db).start_polling(bot, handle_signals=False)
            return 0
        except TelegramNetworkError as err:
            wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            log.warning("Telegram is out of reach (%s); trying again in %ss", str(err).splitlines()[0], wait)
            await asyncio.sleep(wait)
        except TelegramUnauthorizedError:
            log.error("Telegram refused BOT_TOKEN (unauthorized): set the right one with provision config set")
            return 2
    return 1  # not reached: itertools.count() never ends


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
