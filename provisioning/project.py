"""The operator's project folder: fleet.toml (loaded once per command), secrets, bot code, state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .envfile import EnvFile
from .registry import Fleet, Registry


class Project:
    """One project folder. ``fleet`` is fleet.toml, loaded (and validated) on first use and
    kept for the rest of the command; ``reload()`` reads it again after a change."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.registry = Registry(self.root)
        self._fleet: Fleet | None = None

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            self._fleet = self.registry.load()
        return self._fleet

    def reload(self) -> Fleet:
        self._fleet = None
        return self.fleet

    @contextlib.contextmanager
    def editing(self) -> Iterator[Fleet]:
        """Change fleet.toml under its lock (re-read there, so concurrent runs lose nothing);
        afterwards ``fleet`` is what was written."""
        with self.registry.editing() as fleet:
            yield fleet
        self._fleet = fleet

    @property
    def state_dir(self) -> Path:
        """botfleet's own local state (the embedded server, locks, logs): never committed."""
        return self.root / ".botfleet"

    def env_path(self, bot: str) -> Path:
        return self.root / "secrets" / f"{bot}.env"

    def env(self, bot: str) -> EnvFile:
        """The bot's credentials file as it is on disk now."""
        return EnvFile.read(self.env_path(bot))

    def backups(self, bot: str) -> Path:
        return self.root / "backups" / bot

    def code_dir(self, code: str) -> Path | None:
        for candidate in (code, code.replace("-", "_")):
            path = self.root / "bots" / candidate
            if path.is_dir():
                return path
        return None
