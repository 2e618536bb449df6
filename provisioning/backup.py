"""pg_dump backups of one bot database, written 0600 with a checksum beside them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from .db import libpq_env
from .embedded import wheel_bin_dir
from .errors import BackupFailed


def _major(binary: Path) -> int | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def find_pg_dump(server_major: int) -> Path:
    """The newest pg_dump we can find; it must be at least as new as the server."""
    candidates: list[Path] = []
    wheel = wheel_bin_dir()
    if wheel:
        candidates.append(wheel / "pg_dump")
    on_path = shutil.which("pg_dump")
    if on_path:
        candidates.append(Path(on_path))
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump")))
    found = [(m, c) for c in candidates if c.exists() and (m := _major(c)) is not None]
    usable = [(m, c) for m, c in found if m >= server_major]
    if not usable:
        newest = max((m for m, _ in found), default=None)
        have = f"newest found is {newest}" if newest else "none found"
        raise BackupFailed(
            f"no pg_dump for PostgreSQL {server_major} or newer ({have}); install one or pass --no-backup"
        )
    return max(usable)[1]


def dump(url: str, dbname: str, dest_dir: Path, bot: str, *, server_major: int) -> Path:
    """``pg_dump -Fc`` of ``dbname`` into ``dest_dir/<bot>-<UTC timestamp>.dump`` (mode 0600),
    plus ``.sha256``. Raises BackupFailed and leaves no partial file behind."""
    pg_dump = find_pg_dump(server_major)
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
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            raise BackupFailed(f"pg_dump of {dbname} failed: {lines[-1] if lines else proc.returncode}; nothing was removed")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    checksum = path.with_suffix(".dump.sha256")
    fd = os.open(checksum, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{digest.hexdigest()}  {path.name}\n")
    return path
