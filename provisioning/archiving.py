"""The server's archive as the commands use it: ``provision backup/backups/recover --server``,
``restore NAME --to`` and the scheduled dumps of ``backup --all --prune``.

Each function takes the project and how to reach its servers (as ``commands`` does),
validates its input before it touches anything, and returns a result to print.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import pitr
from .archive import RECEIVER, Archive, BaseBackup, Health, Window, require_barman
from .errors import InvalidInput
from .project import Project
from .registry import DEFAULT_SERVER
from .restore import RestoreResult
from .servers import Server, Servers

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class ServerBackup:
    server: str
    backup: BaseBackup
    changed: list[str] = field(default_factory=list)
    receiver_started: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backup": self.backup.as_dict()}


def _hba(servers: Servers, server: Server) -> Path | None:
    """The embedded server's pg_hba.conf (botfleet may add the archive's line), else None."""
    if server.source != "embedded":
        return None
    return servers.embedded().pgdata / "pg_hba.conf"


def arm(project: Project, servers: Servers, server: Server, progress: Progress = _quiet) -> tuple[Archive, list[str], bool]:
    """Converge the archive of an open server: role, configuration, synchronous setting,
    and a streaming WAL receiver. Returns the archive, what changed, and whether the
    receiver was (re)started."""
    assert server.conn is not None and server.admin is not None
    if not server.admin.superuser:
        raise InvalidInput(f"the archive is set up by a superuser (it creates the replication role {server.admin.role} "
                           "may not); use a superuser's admin URL")
    archive = Archive(project, server.name)
    settings = project.fleet.backup
    changed = archive.setup(server.conn, server.url, major=server.major, owned=server.owned, hba=_hba(servers, server),
                            settings=settings, progress=progress)
    if server.owned:
        changed += archive.set_synchronous(server.conn, settings.synchronous)
    elif settings.synchronous:
        progress(f"note: [backup] synchronous is applied only on a server botfleet runs; on this one set "
                 f"synchronous_standby_names = '{RECEIVER}' yourself")
    started = archive.ensure_receiver(synchronous=settings.synchronous and server.owned)
    if started:
        progress("WAL receiver started (barman receive-wal, in the background)")
    archive.wait_streaming(server.conn)
    for line in changed:
        progress(line)
    return archive, changed, started


def server_backup(project: Project, servers: Servers, name: str = DEFAULT_SERVER, *,
                  progress: Progress = _quiet) -> ServerBackup:
    """``provision backup --server``: set the archive up on first use (idempotent), then a base
    backup now and barman's retention."""
    project.require_fleet()
    require_barman()
    started = time.monotonic()
    with servers.opened(name) as server:
        archive, changed, receiver = arm(project, servers, server, progress)
        made = archive.backup(progress)
    progress(f"base backup {made.backup_id} done")
    return ServerBackup(server.name, made, changed, receiver, time.monotonic() - started)


def server_backups(project: Project, name: str = DEFAULT_SERVER) -> Window:
    """``provision backups --server``: the base backups and the recoverable window. Reads only."""
    project.require_fleet()
    archive = Archive(project, name)
    return archive.window(synchronous=project.fleet.backup.synchronous)


def health(project: Project, name: str = DEFAULT_SERVER) -> Health:
    return Archive(project, name).health(synchronous=project.fleet.backup.synchronous)


def _live(servers: Servers, name: str) -> Server | None:
    """The server open, when it answers; None when it is down (recovery from the archive alone)."""
    from .errors import ProvisionError

    try:
        return servers.open(name)
    except ProvisionError:
        return None


def recover_plan(project: Project, servers: Servers, to: str | None, into: Path, name: str = DEFAULT_SERVER, *,
                 progress: Progress = _quiet) -> tuple[Archive, pitr.Plan]:
    """Check a whole-server recovery (InvalidInput when it cannot be done; nothing changed)."""
    target = pitr.parse_time(to) if to else None
    project.require_fleet()
    archive = Archive(project, name)
    archive.require()
    server = _live(servers, name) if _embedded_running(servers, name) or name != DEFAULT_SERVER or servers.admin_url else None
    try:
        return archive, pitr.plan(archive, target, into, live=server.conn if server else None, progress=progress)
    finally:
        if server is not None:
            server.close()


def _embedded_running(servers: Servers, name: str) -> bool:
    import os

    from .servers import ENV_ADMIN_URL

    if name != DEFAULT_SERVER or servers.admin_url or os.environ.get(ENV_ADMIN_URL):
        return True
    return servers.embedded().status().running


def recover_server(archive: Archive, chosen: pitr.Plan, into: Path, *, progress: Progress = _quiet) -> pitr.Recovered:
    return pitr.recover_server(archive, chosen, into, progress)


@dataclass
class BackInTime:
    bot: str
    target: str
    backup_id: str
    dump: str
    restore: RestoreResult
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "restore": self.restore.as_dict()}


def restore_to(project: Project, servers: Servers, bot: str, to: str, *,
               confirm: Callable[[str], bool] = lambda _q: False, progress: Progress = _quiet) -> BackInTime:
    """``provision restore NAME --to TIME``: the bot's database as it was at TIME, taken from
    a scratch recovery of the archive and restored into the live server through the usual
    restore (safety backup of the current state first, one transaction, as the bot's role).
    The other bots are not touched and keep serving."""
    from . import backup as dumps
    from .restore import restore as restore_into

    started = time.monotonic()
    target = pitr.parse_time(to)
    project.require_fleet()
    entry = project.fleet.bots.get(bot)
    if entry is None:
        raise InvalidInput(f"not in the fleet registry: {bot} (see provision list)")
    archive = Archive(project, entry.server)
    archive.require()
    with servers.opened(entry.server) as server:
        assert server.conn is not None
        chosen = pitr.plan(archive, target, archive.root / "pitr-next", live=server.conn, progress=progress)
        with pitr.scratch_copy(archive, chosen, progress) as scratch:
            major = int((scratch.pgdata / "PG_VERSION").read_text().strip())
            with __import__("psycopg").connect(scratch.url, autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (entry.database,)).fetchone() is None:
                    raise InvalidInput(f"{bot} had no database at {chosen.target} ({entry.database} is not in the "
                                       "archive then); nothing was changed")
            progress(f"dumping {entry.database} as it was at {chosen.target}")
            path = dumps.dump(scratch.url, entry.database, project.backups(bot), bot, server_major=major)
        progress(f"point-in-time dump written: {path}")
        result = restore_into(server, project, bot, path, confirm=confirm, progress=progress)
    return BackInTime(bot, chosen.target or "", chosen.backup.backup_id, str(path), result, time.monotonic() - started)


def due_for_dump(project: Project, bot: str) -> bool:
    """Whether ``provision backup --all --prune`` dumps ``bot`` now: its newest botfleet dump is
    older than [backup] dump_every (or it has none)."""
    from .backup import _created, list_backups
    from .registry import RETENTION_RE

    match = RETENTION_RE.fullmatch(project.fleet.backup.dump_every.strip())
    if match is None:
        return True
    days = int(match.group(1)) * {"day": 1, "week": 7, "month": 30}[match.group(2)]
    found = list_backups(project.backups(bot), bot)
    if not found:
        return True
    age = dt.datetime.now(dt.timezone.utc) - _created(found[-1], bot)
    # a little slack: a daily cron line finds yesterday's dump due even if it ran a minute late
    return age >= dt.timedelta(days=days) - dt.timedelta(minutes=30)
