"""`provision` commands for migrations: migrate, current, history, revision, downgrade, check, new-bot."""

from __future__ import annotations
