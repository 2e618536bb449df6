"""Container health check: ``python -m shared.health BOT`` exits 0 when the bot's database answers.

Reads the same environment as the bot (DATABASE_URL or DATABASE_URL_FILE) and
prints one line, never the URL's password.
"""

from __future__ import annotations

import asyncio
import sys

from .database import Database
from .settings import ConfigError


async def _check(bot: str) -> int:
    db = Database.from_env(bot)
    try:
        ok = await db.healthcheck()
    finally:
        await db.dispose()
    print(f"{bot}: database {'ok' if ok else 'unreachable'} ({db.settings.safe_url})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return asyncio.run(_check(args[0] if args else "bot"))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
