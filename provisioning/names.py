"""Bot names and the PostgreSQL names derived from them."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import InvalidBotName

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")
# A bot code: the package bots/<code> (``hello-bot`` and ``hello_bot`` name the same one).
CODE_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")


def canonical_code(code: str) -> str:
    """The one spelling of a bot code: ``hello-bot`` (``hello_bot``, its package's name, is the
    same code and is accepted everywhere; fleet.toml and every output say ``hello-bot``)."""
    return code.replace("_", "-")

# Names that collide with PostgreSQL's own objects or with roles an operator
# already has; refused whatever the admin role is called.
RESERVED = frozenset(
    {
        "postgres", "template0", "template1", "public", "admin", "root",
        "botfleet", "default", "all", "none", "current-user", "session-user",
        "current-role", "user", "role", "replication", "superuser",
        "information-schema",
    }
)


@dataclass(frozen=True)
class BotNames:
    """The names one bot gets on the server."""

    bot: str
    database: str
    role: str


@functools.lru_cache(maxsize=8192)  # BotNames is frozen; a fleet-wide command asks for each bot's many times
def derive(name: str) -> BotNames:
    """The database and role names of a bot (the one place they are derived)."""
    stem = name.replace("-", "_")
    return BotNames(bot=name, database=f"{stem}_db", role=f"{stem}_user")


def code_package(code: str) -> str:
    """The one spelling of a bot code: its package name (``hello-bot`` -> ``hello_bot``)."""
    return code.replace("-", "_")


def validate(name: str, *, admin_role: str | None = None) -> BotNames:
    """Check a bot name and return its database and role names.

    Raises InvalidBotName (exit code 2) for anything but a slug
    ``^[a-z][a-z0-9-]{0,39}$`` that is not reserved.
    """
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise InvalidBotName(
            f"invalid bot name {name!r}: use 1-40 characters a-z, 0-9 and '-', starting with a letter"
        )
    stem = name.replace("-", "_")
    derived = {f"{stem}_db", f"{stem}_user"}
    # PostgreSQL reserves role names that start with pg_ ("pg" gives the role pg_user)
    reserved = name in RESERVED or any(n.startswith("pg_") for n in (stem, *derived))
    if admin_role is not None and (admin_role in derived or admin_role in {name, stem}):
        reserved = True
    if reserved:
        raise InvalidBotName(f"bot name {name!r} is reserved; choose another name")
    return derive(name)
