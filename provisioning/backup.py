"""pg_dump backups of one bot database, written 0600 with a checksum beside them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

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


def _pg_dump(pg_dump: Path, url: str, dbname: str, out: IO[bytes], left: str) -> None:
    """``pg_dump -Fc`` of ``dbname`` onto the file ``out`` (credentials through libpq's
    environment, never argv); BackupFailed with its cause and ``left`` (what the failure left)."""
    proc = subprocess.run(
        [str(pg_dump), "--format=custom", "--no-password"],
        stdout=out, stderr=subprocess.PIPE, text=False, env=libpq_env(url, dbname), timeout=3600,
    )
    if proc.returncode != 0:
        raise BackupFailed(f"pg_dump of {dbname} failed: {tool_error(proc.stderr, proc.returncode)}; {left}")


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
            _pg_dump(pg_dump, url, dbname, out, "nothing was removed")
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
    sha256: str | None = None  # of a dump written to a stream (a file's is in its .sha256)

    @property
    def ok(self) -> bool:
        return self.status == "written"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dump_to(url: str, dbname: str, out: IO[bytes], bot: str, *, server_major: int) -> BackupResult:
    """``pg_dump -Fc`` of ``dbname`` onto ``out`` (``provision backup NAME --output -``).

    The dump is spooled to an anonymous temporary file (0600, gone when closed) and copied to
    ``out`` only once pg_dump has succeeded: a failed dump writes nothing, so a pipe never
    receives a truncated archive that looks whole. The result carries its size and sha256
    (``path`` None). Raises BackupFailed."""
    started = time.monotonic()
    pg_dump = find_tool("pg_dump", server_major, hint="install the PostgreSQL client tools of that version")
    with tempfile.TemporaryFile() as spool:
        _pg_dump(pg_dump, url, dbname, spool, "nothing was written")
        spool.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: spool.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        size = spool.tell()
    return BackupResult(bot, "written", None, size, sha256=digest.hexdigest(), seconds=time.monotonic() - started)


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


# --- provision backups: what is in backups/, with each dump's checksum state ---


def checksum_state(path: Path) -> str:
    """``ok`` (the .sha256 beside it matches), ``missing`` (none, or it does not name the file)
    or ``mismatch`` (the file is damaged or was changed)."""
    side = checksum_path(path)
    try:
        words = side.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return "missing"
    if not words or (len(words) > 1 and words[1].lstrip("*") != path.name):
        return "missing"
    return "ok" if sha256_of(path) == words[0].lower() else "mismatch"


@dataclass
class DumpFile:
    """One dump in backups/NAME/."""

    bot: str
    path: str
    size_bytes: int
    created: str  # UTC, ISO 8601: from the name botfleet gives it, else the file's mtime
    age_seconds: int
    checksum: str  # ok | missing | mismatch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _created(path: Path, bot: str) -> dt.datetime:
    match = re.fullmatch(re.escape(bot) + "-(" + STAMP_RE + r")\.dump", path.name)
    if match:
        return dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)


def list_dumps(root: Path, bots: list[str]) -> list[DumpFile]:
    """Every ``*.dump`` file in ``root/NAME/`` for each of ``bots`` (symbolic links and other
    files left out), oldest first per bot, with its size, age and checksum state. Reads only."""
    now = dt.datetime.now(dt.timezone.utc)
    found: list[DumpFile] = []
    for bot in bots:
        folder = root / bot
        if not folder.is_dir() or folder.is_symlink():
            continue
        files = [p for p in folder.glob("*.dump") if p.is_file() and not p.is_symlink()]
        for path in sorted(files, key=lambda p: (_created(p, bot), p.name)):
            created = _created(path, bot)
            found.append(DumpFile(bot, str(path), path.stat().st_size, created.isoformat().replace("+00:00", "Z"),
                                  max(0, int((now - created).total_seconds())), checksum_state(path)))
    return found
