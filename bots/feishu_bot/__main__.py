"""Serve feishu-bot's webhook: ``FEISHU_VERIFICATION_TOKEN=... python -m bots.feishu_bot``
(or ``FEISHU_VERIFICATION_TOKEN_FILE``; DATABASE_URL / DATABASE_URL_FILE / DB_POOL_*, HOST, PORT)."""

from __future__ import annotations

import os
import sys

from shared import ConfigError, Database, setting


def main() -> int:
    try:
        token = setting("FEISHU_VERIFICATION_TOKEN", required=True)
        db = Database.from_env("feishu-bot")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("error: uvicorn is not installed (pip install uvicorn)", file=sys.stderr)
        return 2
    from .api import create_app

    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    uvicorn.run(create_app(db, token), host=host, port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
