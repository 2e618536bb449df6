"""Settings from the environment, validated at start-up: the database's, and a bot's own.

Errors name the variable at fault and never print the URL (it holds the password)
or a setting's value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# The fleet's pool defaults (shared-PostgreSQL seed): small pools so every bot fits.
DEFAULTS = {"DB_POOL_SIZE": 2, "DB_MAX_OVERFLOW": 3, "DB_POOL_TIMEOUT": 30, "DB_POOL_RECYCLE": 3600}
# Plain URLs are accepted and mapped to the async drivers.
ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
SUPPORTED = {"postgresql+asyncpg", "sqlite+aiosqlite"}


class ConfigError(Exception):
    """A start-up configuration error; the message names the variable and is safe to print."""


@dataclass(frozen=True)
class DatabaseSettings:
    url: URL
    pool_size: int = 2
    max_overflow: int = 3
    pool_timeout: int = 30
    pool_recycle: int = 3600
    source: str = "default"

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def safe_url(self) -> str:
        """The URL with the password hidden, for logs."""
        return self.url.render_as_string(hide_password=True)

    @classmethod
    def from_env(cls, bot: str = "bot", env: dict[str, str] | None = None) -> "DatabaseSettings":
        """Read DATABASE_URL or DATABASE_URL_FILE and DB_POOL_*.

        Neither URL set: ``sqlite+aiosqlite:///./<bot>.sqlite`` (zero-setup development).
        """
        env = dict(os.environ if env is None else env)
        raw, source = _raw_url(env, bot)
        try:
            url = make_url(raw)
        except (ArgumentError, ValueError):
            raise ConfigError(f"{source} is not a valid database URL (expected e.g. postgresql+asyncpg://user:pass@host/db)") from None
        drivername = ASYNC_DRIVERS.get(url.drivername, url.drivername)
        if drivername not in SUPPORTED:
            raise ConfigError(f"{source} uses driver {url.drivername!r}; use postgresql+asyncpg:// or sqlite+aiosqlite://")
        url = url.set(drivername=drivername)
        return cls(url=url, source=source, **{k.removeprefix("DB_").lower(): _int(env, k) for k in DEFAULTS})


def _raw_url(env: dict[str, str], bot: str) -> tuple[str, str]:
    direct, file_var = env.get("DATABASE_URL"), env.get("DATABASE_URL_FILE")
    if direct and file_var:
        raise ConfigError("both DATABASE_URL and DATABASE_URL_FILE are set; set only one")
    if file_var:
        try:
            value = Path(file_var).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"DATABASE_URL_FILE: cannot read {file_var}: {err.strerror}") from None
        if not value:
            raise ConfigError(f"DATABASE_URL_FILE: {file_var} is empty")
        return value, "DATABASE_URL_FILE"
    if direct:
        return direct, "DATABASE_URL"
    return f"sqlite+aiosqlite:///./{bot}.sqlite", "default"


def _int(env: dict[str, str], key: str) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return DEFAULTS[key]
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number (got {raw!r})") from None
    if value < 0 or (key == "DB_POOL_SIZE" and value == 0):
        raise ConfigError(f"{key} must be {'at least 1' if key == 'DB_POOL_SIZE' else 'zero or more'} (got {value})")
    return value


def setting(name: str, env: Mapping[str, str] | None = None, default: str | None = None,
            required: bool = False) -> str | None:
    """A bot's own setting ``name`` (``BOT_TOKEN``): the environment variable ``name``, or the
    content of the file that ``name_FILE`` names (a Docker secret, ``/run/secrets/BOT_TOKEN``;
    one trailing newline dropped). Set both, and it is a ConfigError. Neither set (or empty):
    ``default``, or a ConfigError when ``required``. An unreadable file is a ConfigError. The
    errors name the variables and the file, never the value.
    """
    env = os.environ if env is None else env
    file_var = f"{name}_FILE"
    direct, path = env.get(name), env.get(file_var)
    if direct and path:
        raise ConfigError(f"both {name} and {file_var} are set; set only one")
    value = direct
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{file_var}: cannot read {path}: {err.strerror or type(err).__name__}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file_var}: {path} is not UTF-8 text") from None
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if not value:
        if required:
            raise ConfigError(f"{name} is not set (set {name}, or {file_var} to a file holding it)")
        return default
    return value
