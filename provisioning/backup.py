"""pg_dump backups of one bot database, written 0600 with a checksum beside them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .db import libpq_env
from .embedded import wheel_bin_dir
from .errors import BackupFailed, InvalidInput


def _major(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def find_tool(tool: str, server_major: int, *, hint: str) -> Path:
    """The newest ``tool`` (pg_dump, pg_restore) we can find; it must be at least as new as the server."""
    candidates: list[Path] = []
    wheel = wheel_bin_dir()
    if wheel:
        candidates.append(wheel / tool)
    on_path = shutil.which(tool)
    if on_path:
        candidates.append(Path(on_path))
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}")))
    found = [(m, c) for c in candidates if c.exists() and (m := _major(c)) is not None]
    usable = [(m, c) for m, c in found if m >= server_major]
    if not usable:
        newest = max((m for m, _ in found), default=None)
        have = f"newest found is {newest}" if newest else "none found"
        raise BackupFailed(f"no {tool} for PostgreSQL {server_major} or newer ({have}); {hint}")
    return max(usable)[1]


def find_pg_dump(server_major: int) -> Path:
    """The newest pg_dump we can find; it must be at least as new as the server."""
    return find_tool("pg_dump", server_major, hint="install one or pass --no-backup")


def dump(url: str, dbname: str, dest_dir: Path, bot: str, *, server_major: int, pg_dump: Path | None = None) -> Path:
    """``pg_dump -Fc`` of ``dbname`` into ``dest_dir/<bot>-<UTC timestamp>.dump`` (mode 0600),
    plus ``.sha256``. Raises BackupFailed and leaves no partial file behind."""
    pg_dump = pg_dump or find_pg_dump(server_major)
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = dest_dir / f"{bot}-{stamp}.dump"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.run(
                [str(pg_dump), "--format=custom", "--no-password"],
                stdout=out, stderr=subprocess.PIPE, text=False, env=libpq_env(url, dbname), timeout=3600,
            )
        if proc.returncode != 0:
            raise BackupFailed(f"pg_dump of {dbname} failed: {tool_error(proc.stderr, proc.returncode)}; "
                               "nothing was removed")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fd = os.open(checksum_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{sha256_of(path)}  {path.name}\n")
    return path


# --- provision backup / restore: checksums, finding and pruning a bot's backups ---

# dump() names files <bot>-<UTC yyyymmddThhmmss + microseconds>Z.dump: sorted by name is sorted by time.
STAMP_RE = r"\d{8}T\d{12}Z"


def tool_error(stderr: bytes, returncode: int) -> str:
    """The cause in a PostgreSQL client tool's error output: its first "error:" line (the lines
    after it are hints such as "Is the server running ...?"), else its last line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else f"exit code {returncode}"


def checksum_path(path: Path) -> Path:
    """The ``.sha256`` file dump() writes beside a backup."""
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path) -> bool:
    """Check ``path`` against the checksum beside it: True when it matches, False
    when there is none; raises InvalidInput when it does not match."""
    side = checksum_path(path)
    if not side.exists():
        return False
    expected = side.read_text(encoding="utf-8", errors="replace").split()
    if not expected or sha256_of(path) != expected[0].lower():
        raise InvalidInput(f"{path} does not match its checksum {side.name}: the file is damaged or was changed; "
                           "nothing was restored")
    return True


def list_backups(dest_dir: Path, bot: str) -> list[Path]:
    """botfleet's complete backups of ``bot`` in ``dest_dir``, oldest first: files named as
    dump() names them, with the checksum dump() writes last. Anything else is left alone."""
    if not dest_dir.is_dir():
        return []
    pattern = re.compile(re.escape(bot) + "-" + STAMP_RE + r"\.dump")
    found = []
    for path in dest_dir.iterdir():
        if pattern.fullmatch(path.name) and path.is_file() and checksum_path(path).is_file():
            if path.name in checksum_path(path).read_text(encoding="utf-8", errors="replace"):
                found.append(path)
    return sorted(found, key=lambda p: p.name)


def prune(dest_dir: Path, bot: str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest of ``bot``'s botfleet backups (and their checksums);
    returns what was deleted. Files botfleet did not write are never touched."""
    if keep < 1:
        raise InvalidInput("--keep must be at least 1")
    old = list_backups(dest_dir, bot)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    return old


@dataclass
class BackupResult:
    bot: str
    status: str  # written | failed
    path: str | None = None
    size_bytes: int | None = None
    pruned: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "written"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backup_bot(url: str, dbname: str, dest_dir: Path, bot: str, *, server_major: int, keep: int | None = None) -> BackupResult:
    """One bot's backup for ``provision backup``: dump(), then (only when it worked)
    prune to the ``keep`` newest. Failures are returned, not raised, so one bot's
    failure never stops the others."""
    started = time.monotonic()
    try:
        pg_dump = find_tool("pg_dump", server_major, hint="install the PostgreSQL client tools of that version")
        path = dump(url, dbname, dest_dir, bot, server_major=server_major, pg_dump=pg_dump)
    except BackupFailed as err:
        message = str(err).removesuffix("; nothing was removed")
        return BackupResult(bot, "failed", error=message, seconds=time.monotonic() - started)
    pruned = prune(dest_dir, bot, keep) if keep is not None else []
    return BackupResult(bot, "written", str(path), path.stat().st_size, [str(p) for p in pruned],
                        seconds=time.monotonic() - started)
