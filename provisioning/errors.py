"""The project's exception tree: every message is one line a user can act on.

Exit codes follow the CLI convention: 2 for bad input (nothing was touched),
1 for a failure while talking to the server or the file system.
"""

from __future__ import annotations


class ProvisionError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


class InvalidInput(ProvisionError):
    """Bad input: refused before anything was changed."""

    exit_code = 2


class InvalidBotName(InvalidInput):
    pass


class NotManaged(ProvisionError):
    """A role or database with a bot's name exists but botfleet did not create it."""


class MissingCredentials(ProvisionError):
    """A bot's credentials file is missing or holds no password for its role."""


class ServerUnreachable(ProvisionError):
    pass


class AuthenticationFailed(ProvisionError):
    pass


class InsufficientPrivilege(ProvisionError):
    pass


class BackupFailed(ProvisionError):
    pass


class LockTimeout(ProvisionError):
    pass


class StackInvalid(ProvisionError):
    """A rendered compose file failed validation (a bug in the templates, or a registry the stack cannot hold)."""


def one_line(err: BaseException) -> str:
    """An error as one line: a server's primary message, else the first line of its text."""
    diag = getattr(err, "diag", None)
    if diag is not None and getattr(diag, "message_primary", None):
        return diag.message_primary
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
