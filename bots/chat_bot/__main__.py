"""Serve chat-bot's API: ``python -m bots.chat_bot`` (DATABASE_URL..., HOST, PORT)."""

from __future__ import annotations

import os
import sys

from shared import ConfigError, Database


def main() -> int:
    try:
        import uvicorn
    except ImportError:
        print("error: uvicorn is not installed (pip install uvicorn)", file=sys.stderr)
        return 2
    from .api import create_app

    try:
        db = Database.from_env("chat-bot")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(db), host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
