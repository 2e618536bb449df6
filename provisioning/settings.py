"""A bot's own settings (``BOT_TOKEN``, ...): extra ``KEY=VALUE`` lines in its credentials file.

They live in ``secrets/NAME.env`` (0600, never in fleet.toml or a compose file)
beside botfleet's own keys, which they may not use: ``DATABASE_URL*``,
``DB_POOL_*`` and the other pool keys are reserved. add-bot, rotate-password,
apply, restore and render rewrite that file keeping every line they do not own
(:meth:`EnvFile.kept_lines`), so a setting survives them.

Writes are atomic (:meth:`EnvFile.write`) and done under one lock per project
(``.botfleet/config.lock``), reading the file again inside it, so concurrent
``config set`` runs lose nothing. Values are written by the quoting rule of
:mod:`provisioning.envfile` and never appear in an error, a result's repr or
progress.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .envfile import OWNED, EnvFile, format_value, unwritable
from .errors import InvalidInput
from .files import file_lock
from .project import Project

KEY_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
RESERVED_PREFIXES = ("DATABASE_URL", "DB_POOL_")  # botfleet's own keys, and the *_FILE forms of them
MASK = "********"


def check_key(key: str) -> str:
    """``key`` when it is a setting a bot may have; InvalidInput (one line) when not."""
    if KEY_RE.fullmatch(key) is None:
        raise InvalidInput(f"{key[:64]!r} is not a setting name: A-Z, 0-9 and '_', not starting with a digit "
                           "(e.g. BOT_TOKEN)")
    if key in OWNED or key.startswith(RESERVED_PREFIXES):
        raise InvalidInput(f"{key} is reserved: botfleet writes DATABASE_URL* and the DB_POOL_* settings itself "
                           "(add-bot --pool-size ...)")
    return key


def check_value(key: str, value: str) -> str:
    """``value`` when the env file can hold it (see provisioning.envfile); the error names the
    key and the character class at fault, never the value."""
    why = unwritable(value)
    if why is not None:
        raise InvalidInput(f"the value of {key} holds {why}: an env file cannot hold it safely "
                           "(one line; no ', \\, tab or other control character)")
    return value


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict, each key and value checked; InvalidInput (never
    showing a value) for a malformed one, a bad or reserved key, or a key given twice."""
    out: dict[str, str] = {}
    for i, pair in enumerate(pairs, 1):
        if "=" not in pair:  # not shown: it may well be a value typed without its key
            raise InvalidInput(f"setting {i} is not KEY=VALUE (e.g. BOT_TOKEN=123:abc; unset a key with "
                               "provision config unset)")
        key, value = pair.split("=", 1)
        check_key(key)
        if key in out:
            raise InvalidInput(f"{key} is given twice")
        out[key] = check_value(key, value)
    if not out:
        raise InvalidInput("give at least one KEY=VALUE")
    return out


def check_values(values: Mapping[str, str]) -> dict[str, str]:
    """A mapping of settings, each key and value checked (InvalidInput)."""
    if not values:
        raise InvalidInput("give at least one KEY=VALUE")
    for key, value in values.items():
        if not isinstance(value, str):
            raise InvalidInput(f"the value of {key} must be a string")
        check_value(check_key(key), value)
    return dict(values)


def _key_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip()


def read(project: Project, bot: str) -> dict[str, str]:
    """The bot's own settings in its env file (every key botfleet does not own), in file order."""
    return of(project.env(bot))


def of(env: EnvFile) -> dict[str, str]:
    """The bot's own settings in an env file already read."""
    return {k: v for k, v in env.values.items() if k not in OWNED}


def missing(project: Project, bot: str, have: Mapping[str, str] | None = None) -> list[str]:
    """The settings the bot's code requires (its ``REQUIRED_SETTINGS``) that are not set, or set
    empty, in its env file (``have``: its settings, when already read)."""
    return lacking(project.root, project.fleet.bots[bot].code, read(project, bot) if have is None else have)


def lacking(root: Path, code: str, have: Mapping[str, str],
            required: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The settings ``code`` requires that ``have`` lacks or has empty. ``required``: each code's
    REQUIRED_SETTINGS read so far, filled in here (a fleet-wide caller reads each code once)."""
    from .codes import required_settings

    memo = {} if required is None else required
    if code not in memo:
        memo[code] = required_settings(root, code)
    return [key for key in memo[code] if not have.get(key)]


def set_command(bot: str, keys: list[str]) -> str:
    """The command that sets ``keys`` (never a value)."""
    return f"provision config set {bot} " + " ".join(f"{k}=..." for k in keys)


def missing_hint(bot: str, keys: list[str]) -> str:
    """One line: what is missing and the command that sets it."""
    return f"{bot} needs {', '.join(keys)} ({set_command(bot, keys)})"


@dataclass
class Changed:
    """What a ``config set`` / ``config unset`` did (keys only: never a value)."""

    bot: str
    env_file: str
    changed: list[str] = field(default_factory=list)  # set to a new value, or removed
    unchanged: list[str] = field(default_factory=list)  # already had that value / were not set
    created: bool = False  # the env file did not exist before
    missing: list[str] = field(default_factory=list)  # required by the bot's code and still not set

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def lock(project: Project) -> Iterator[None]:
    """The lock every change of a bot's settings is made under (one per project)."""
    with file_lock(project.state_dir / "config.lock"):
        yield


def set_values(project: Project, bot: str, values: Mapping[str, str]) -> Changed:
    """Set (add or replace) settings in the bot's env file, atomically and under the lock.
    A key already set is replaced where it stands (a second line for it is dropped); a new
    one is appended. The file is created (0600) when the bot has none yet."""
    values = check_values(values)
    with lock(project):
        env = project.env(bot)
        result = Changed(bot, str(env.path), created=not env.exists)
        pending = dict(values)
        lines: list[str] = []
        for line in env.lines:
            key = _key_of(line)
            if key in values:
                if key not in pending:
                    continue  # a duplicate line for a key already written
                value = pending.pop(key)
                (result.unchanged if env.values.get(key) == value else result.changed).append(key)
                line = f"{key}={format_value(value)}"
            lines.append(line)
        for key, value in pending.items():
            result.changed.append(key)
            lines.append(f"{key}={format_value(value)}")
        text = "".join(f"{line}\n" for line in lines)
        if text != env.text:
            env.write(text)
    return result


def unset(project: Project, bot: str, keys: Iterable[str]) -> Changed:
    """Remove settings from the bot's env file (every line of each key), atomically and under
    the lock; a key that is not set is reported unchanged."""
    keys = list(dict.fromkeys(check_key(k) for k in keys))
    if not keys:
        raise InvalidInput("give at least one KEY")
    with lock(project):
        env = project.env(bot)
        result = Changed(bot, str(env.path))
        present = {_key_of(line) for line in env.lines}
        result.changed = [k for k in keys if k in present]
        result.unchanged = [k for k in keys if k not in present]
        if result.changed:
            env.write("".join(f"{line}\n" for line in env.lines if _key_of(line) not in keys))
    return result
