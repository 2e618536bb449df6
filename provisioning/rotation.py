"""Password rotation: a new generated password for a provisioned bot.

This is add-bot's own rotation (``BotOptions.rotate_password``): the env file is
rewritten atomically (0600) first, then only the SCRAM-SHA-256 verifier computed
on the client is sent to the server. PostgreSQL checks a password when a session
starts, never again: the bot's open sessions keep working until its container is
recreated with the new env file.
"""

from __future__ import annotations

from typing import Callable

import psycopg

from . import roles
from .db import AdminInfo
from .errors import InvalidInput, ProvisionError
from .fleet import AddResult, BotOptions, Project, add_bot
from .names import validate

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def rotate(
    conn: psycopg.Connection,
    admin: AdminInfo,
    admin_url: str,
    project: Project,
    name: str,
    progress: Progress = _quiet,
) -> AddResult:
    """Give a provisioned registry bot a new password (and repair any drift add-bot repairs).

    Refuses (ProvisionError) a bot whose role is missing on the server: add-bot creates it.
    """
    names = validate(name, admin_role=admin.role)
    if name not in project.registry.load().bots:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    if roles.inspect(conn, names.role, read_verifier=False) is None:
        raise ProvisionError(f"{name}: role {names.role} does not exist on this server; run: provision add-bot {name}")
    progress(f"{name}: new password, env file first, then the server")
    return add_bot(conn, admin, admin_url, project, name, BotOptions(rotate_password=True), progress)


def recreate_command(bots: list[str]) -> str:
    """The command that restarts the bots' containers with their new env files
    (each bot's compose service is named after the bot)."""
    return "docker compose up -d --force-recreate " + " ".join(bots)
