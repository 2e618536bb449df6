"""Container health check: ``python -m shared.health BOT`` exits 0 while the bot's database answers.

In a container the check asks the running bot, not the database: the bot checks its database
through its own pool every HEARTBEAT_S seconds (``async with db.heartbeat():``) and records the
outcome in the file BOTFLEET_HEALTH_FILE names (compose sets it, on the container's /tmp).
This check reads that file with the standard library alone: no second interpreter holding
SQLAlchemy in the container's memory limit, no new login on the server every 30 s per bot, and no
connection beyond the pool the role's CONNECTION LIMIT was sized for. A heartbeat older than
STALE_S (the bot's event loop is stuck) or one that recorded a failed check is unhealthy.

Where no heartbeat is kept (the variable unset, as outside containers, or a bot that never
started one), the check makes its own: a new connection and ``SELECT 1``.

Prints one line, never the URL's password.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HEALTH_FILE_ENV = "BOTFLEET_HEALTH_FILE"
HEARTBEAT_S = 10.0  # how often a bot checks its database through its pool
STALE_S = 45.0  # a heartbeat older than this is a bot that stopped checking
OK, UNREACHABLE = "ok", "unreachable"


def health_file(env: dict[str, str] | None = None) -> Path | None:
    """Where the heartbeat is kept: BOTFLEET_HEALTH_FILE, or None (no heartbeat)."""
    value = (os.environ if env is None else env).get(HEALTH_FILE_ENV, "").strip()
    return Path(value) if value else None


def record(path: Path, ok: bool) -> None:
    """Write the outcome of one check (the file's mtime is when), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{OK if ok else UNREACHABLE}\n")
    os.replace(tmp, path)


def read(path: Path) -> tuple[str, float] | None:
    """The last recorded outcome and its age in seconds; None when no heartbeat was recorded."""
    try:
        state = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return state, max(age, 0.0)


def verdict(bot: str, state: str, age: float) -> tuple[int, str]:
    """Exit code and line for a recorded heartbeat."""
    if age > STALE_S:
        return 1, (f"{bot}: no heartbeat for {age:.0f} s (the bot checks its database every {HEARTBEAT_S:.0f} s: "
                   "its event loop is blocked or it stopped checking)")
    if state == OK:
        return 0, f"{bot}: database ok ({age:.0f} s ago, through the bot's pool)"
    return 1, f"{bot}: database unreachable at the bot's last check ({age:.0f} s ago, through its pool)"


async def _check_directly(bot: str) -> int:
    from .database import Database

    db = Database.from_env(bot)
    try:
        ok = await db.healthcheck()
    finally:
        await db.dispose()
    print(f"{bot}: database {'ok' if ok else 'unreachable'} ({db.settings.safe_url})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bot = args[0] if args else "bot"
    path = health_file()
    beat = read(path) if path is not None else None
    if beat is not None:
        code, line = verdict(bot, *beat)
        print(line)
        return code
    import asyncio

    from .settings import ConfigError

    try:
        return asyncio.run(_check_directly(bot))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
