"""Files botfleet owns on disk: atomic writes (0600 for secrets), file locks, and the
temporary files a killed atomic write leaves behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


TEMP_SUFFIX = ".tmp"
# atomic_write's temporary files: mkstemp(prefix=".NAME.", suffix=".tmp") adds 8 characters.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


def atomic_write(path: Path, data: str, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The temporary file is created with ``mode`` from the start (mkstemp makes it
    0600), so a secret is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed) for the block. Its folder is
    made private (0700) when it does not exist yet: botfleet's state is nobody else's."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def temp_target(path: Path) -> str | None:
    """The name of the file an atomic_write temporary file was to become, or None when
    ``path`` is not named like one."""
    match = _TEMP_NAME.fullmatch(path.name)
    return match.group("target") if match else None


def _stale(path: Path, older_than: float) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime >= older_than


def stale_temp_files(folder: Path, older_than: float) -> list[Path]:
    """atomic_write's temporary files in ``folder`` (not below it) that nothing has touched for
    ``older_than`` seconds: left by a writer killed between creating and renaming one (an env
    file's may hold a password).

    A younger one is never listed: a running writer's temporary file lives from its mkstemp to
    its os.replace, milliseconds, and is not stale then; a minute-old one has no writer left."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p for p in folder.iterdir() if temp_target(p) is not None and _stale(p, older_than))


def remove_stale_temp_file(path: Path, older_than: float) -> bool:
    """Delete ``path`` when it is still a stale atomic_write temporary file (looked at again
    just before: a writer may have come back); returns whether it was deleted."""
    if temp_target(path) is None or not _stale(path, older_than):
        return False
    path.unlink(missing_ok=True)
    return True
