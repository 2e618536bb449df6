"""The operator's project folder: fleet.toml (loaded once per command), secrets, bot code, state."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .envfile import EnvFile
from .errors import InvalidInput
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
            self.check_private()
            self._fleet = self.registry.load()
        return self._fleet

    def check_private(self) -> None:
        """Refuse (InvalidInput) a project whose secrets could be read or chosen by someone else:
        secrets/, backups/ or .botfleet/ that is a symbolic link or writable by group or others,
        or a bot's env file that is a symbolic link (botfleet would follow it and write a password
        where another user decides). Run where fleet.toml is loaded: before any command acts."""
        for folder in (self.root / "secrets", self.root / "backups", self.state_dir):
            if folder.is_symlink():
                raise InvalidInput(f"{folder} is a symbolic link: botfleet keeps secrets and state only in a folder "
                                   "of the project's own (replace the link with a real folder)")
            if folder.is_dir() and folder.stat().st_mode & 0o022:
                mode = stat.S_IMODE(folder.stat().st_mode)
                raise InvalidInput(f"{folder} is writable by group or others (mode {mode:04o}): another user could "
                                   f"swap its files; chmod go-w {folder}")
        # os.scandir: the entries' types come with the listing (no lstat per file; 1,000 bots' env files)
        try:
            with os.scandir(self.root / "secrets") as entries:
                links = sorted(e.path for e in entries if e.name.endswith(".env") and e.is_symlink())
        except (FileNotFoundError, NotADirectoryError):
            links = []
        if links:
            raise InvalidInput(f"{links[0]} is a symbolic link: a bot's credentials file must be a file of its own "
                               "(replace the link with the file)")

    def require_fleet(self) -> None:
        """Refuse (InvalidInput, exit 2) a folder that holds no fleet.toml. A read-only command
        (list, plan, doctor, budget, current, backups) calls this before it chooses a server:
        run in the wrong folder it must not create one there (39 MB and a running PostgreSQL)."""
        if not self.registry.exists():
            raise InvalidInput(f"no fleet here: {self.root} has no fleet.toml; start one with provision add-bot NAME, "
                               "or name the fleet's folder with --project-dir DIR (or BOTFLEET_HOME); nothing was created")

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
