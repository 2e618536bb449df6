"""Restore a bot's database from a pg_dump archive, as the bot's own role.

The archive is checked before anything is touched (its checksum, and that
pg_restore can read its table of contents). The restore runs as the bot's role
with ``--no-owner --no-acl``, so every object it creates belongs to the bot and
no grant from the source database comes along. It is one transaction:
``pg_restore --single-transaction`` turns the archive into SQL wrapped in BEGIN
... COMMIT and psql runs it with ``ON_ERROR_STOP`` (replacing a non-empty
database drops the bot's objects inside that same transaction), so a failure
leaves the database exactly as it was.

Why the pipe instead of ``pg_restore --dbname``: pg_restore 17+ sends
``SET transaction_timeout`` to any server, which PostgreSQL 16 and older refuse;
in a script that line can be left out for them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from . import backup, databases, objects, roles
from .db import advisory_lock, as_role, connect, libpq_env, with_database
from .errors import BackupFailed, InvalidInput, NotManaged, ProvisionError
from .names import validate
from .project import Project
from .servers import Server

Progress = Callable[[str], None]

RESTORE_OPTIONS = ("--no-owner", "--no-acl", "--no-tablespaces", "--no-security-labels",
                   "--no-publications", "--no-subscriptions")
# Sent by pg_restore 17+ in every script; unknown to servers before 17.
_TRANSACTION_TIMEOUT = b"SET transaction_timeout = 0;\n"
# The header ends where the first object begins.
_FIRST_ENTRY = b"-- Name: "


class RestoreFailed(ProvisionError):
    pass


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Archive:
    path: Path
    pg_restore: Path
    entries: int
    checksum: bool  # verified against the .sha256 beside it
    dbname: str | None = None  # the database it was dumped from (its table of contents says)


@dataclass
class RestoreResult:
    bot: str
    database: str
    role: str
    file: str
    replaced: list[str] = field(default_factory=list)  # what was in the database before
    safety_backup: str | None = None
    objects: int = 0
    tables: int = 0
    checksum_verified: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_archive(path: Path, server_major: int, *, require_checksum: bool = True, label: str | None = None) -> Archive:
    """Check a backup file before a restore may use it; raises InvalidInput (exit 2) when it
    is missing, damaged, without a checksum (unless ``require_checksum`` is off), or not an
    archive pg_restore can read. ``label`` names it in messages (``stdin`` for a spooled dump)."""
    if not path.is_file():
        raise InvalidInput(f"no such backup file: {path}")
    checked = backup.verify_checksum(path)
    if not checked and require_checksum:
        raise InvalidInput(f"{path} has no checksum beside it ({backup.checksum_path(path).name}); "
                           "pass --no-checksum to restore a dump botfleet did not write")
    pg_restore = backup.find_tool("pg_restore", server_major, hint="install the PostgreSQL client tools of that version")
    if not pg_restore.with_name("psql").exists():
        raise BackupFailed(f"no psql beside {pg_restore}; install the PostgreSQL client tools")
    proc = subprocess.run([str(pg_restore), "--list", str(path)], capture_output=True, timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1].removeprefix("pg_restore: error: ") if lines else f"exit code {proc.returncode}"
        raise InvalidInput(f"{label or path} is not a pg_dump archive that pg_restore can read ({reason}); "
                           "nothing was restored")
    entries = sum(1 for line in proc.stdout.splitlines() if line and not line.startswith(b";"))
    dbname = next((line.split(b":", 1)[1].strip().decode(errors="replace") for line in proc.stdout.splitlines()
                   if line.startswith(b";") and line[1:].strip().lower().startswith(b"dbname:")), None)
    return Archive(path, pg_restore, entries, checked, dbname)


def restore(
    server: Server,
    project: Project,
    name: str,
    file: Path,
    *,
    confirm: Callable[[str], bool] = lambda _question: False,
    require_checksum: bool = True,
    from_bot: str | None = None,
    progress: Progress = _quiet,
    label: str | None = None,
) -> RestoreResult:
    """Restore ``file`` into bot ``name``'s database as the bot's role.

    Preconditions: the bot is in the registry and provisioned (its role, database
    and env file exist). A database that holds anything is replaced only when
    ``confirm(question)`` says yes, and only after a backup of what it held; a database holding
    objects of another owner is refused (``provision doctor --fix`` repairs that).
    Raises InvalidInput (nothing touched), NotManaged or RestoreFailed (database unchanged).
    ``label`` names the dump in messages instead of ``file`` (``stdin``: a dump read from it,
    spooled to a private temporary file).
    """
    shown, short = label or str(file), label or file.name
    conn, admin, admin_url = server.conn, server.admin, server.url
    assert conn is not None and admin is not None
    names = validate(name, admin_role=admin.role)
    entry = project.fleet.bots.get(name)
    if entry is None:
        raise InvalidInput(f"not in the fleet registry: {name} (see provision list)")
    progress(f"verifying {shown}")
    archive = verify_archive(file, admin.major, require_checksum=require_checksum, label=label)
    progress(f"{short}: " + ("checksum matches, " if archive.checksum else "no checksum, ")
             + f"{archive.entries} entries readable by {archive.pg_restore}")
    # Another bot's dump would hand this bot's role that bot's rows: only when the operator says so.
    source = validate(from_bot).database if from_bot else names.database
    if archive.dbname is not None and archive.dbname != source:
        hint = (f"pass --from-bot NAME (the bot whose database {archive.dbname} was) to restore it into {name} anyway"
                if not from_bot else f"--from-bot {from_bot} names database {source}")
        raise InvalidInput(f"{shown} is a dump of database {archive.dbname}, not of {names.database}: {hint}; "
                           "nothing was restored")
    if roles.inspect(conn, names.role, read_verifier=False) is None or databases.inspect(conn, names.database) is None:
        raise ProvisionError(f"{name} is not provisioned on this server; run: provision add-bot {name}")
    password = project.env(name).password(names.role)
    if password is None:
        raise ProvisionError(f"no password for {names.role} in {project.env_path(name)}; run: provision add-bot {name}")

    result = RestoreResult(bot=name, database=names.database, role=names.role, file=shown,
                           checksum_verified=archive.checksum)
    with advisory_lock(conn, name):
        with connect(with_database(admin_url, names.database)) as db_conn:
            present = objects.content(objects.inventory(db_conn))
        foreign = objects.not_owned_by(present, names.role)
        if foreign:
            shown = ", ".join(f"{o} (owner {o.owner})" for o in foreign[:3])
            raise NotManaged(f"{names.database} holds objects not owned by {names.role}: {shown}"
                             f"{' ...' if len(foreign) > 3 else ''}; run provision doctor --fix first")
        question = f"Replace the {len(present)} objects in {names.database} with {short} (after backing them up)?"
        if present and not confirm(question):
            raise InvalidInput(f"{names.database} is not empty ({len(present)} objects, e.g. {present[0]}); "
                               "pass --yes to replace its content (it is backed up first)")
        if present:
            result.replaced = [str(o) for o in present]
            progress(f"backing up the current content of {names.database} first")
            pg_dump = backup.find_tool("pg_dump", admin.major, hint="install the PostgreSQL client tools of that version")
            safety = backup.dump(admin_url, names.database, project.backups(name), name, server_major=admin.major,
                                 pg_dump=pg_dump)
            result.safety_backup = str(safety)
            progress(f"backup written: {safety}")
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (names.database,)).fetchone()
            if ended and ended[0]:
                progress(f"ended {ended[0]} session(s) on {names.database}")
        progress(f"restoring {short} into {names.database} as {names.role} (one transaction)")
        bot_conninfo = as_role(admin_url, names.role, password, names.database, application_name="botfleet-restore")
        error = _pipe(archive, bot_conninfo, drop_owned=bool(present), server_major=admin.major)
        if error:
            kept = f"; its previous content is also in {result.safety_backup}" if result.safety_backup else ""
            raise RestoreFailed(f"restore of {short} into {names.database} failed: {error}; "
                                f"the database was left as it was{kept}")
        with connect(with_database(admin_url, names.database)) as db_conn:
            databases.lock_down_schema(db_conn)
            after = objects.content(objects.inventory(db_conn))
    result.objects = len(after)
    result.tables = sum(1 for o in after if o.kind == "table")
    return result


def _pipe(archive: Archive, bot_conninfo: str, *, drop_owned: bool, server_major: int) -> str | None:
    """pg_restore --single-transaction (archive -> SQL in BEGIN ... COMMIT) | psql as the bot,
    stopping at the first error: psql then exits before COMMIT and the server rolls the
    whole transaction back. Returns None on success, else the first error line.
    The bot's password reaches psql only through its environment, never its arguments."""
    psql = archive.pg_restore.with_name("psql")
    inject = b"SET lock_timeout = '60s';\nDROP OWNED BY CURRENT_USER CASCADE;\n" if drop_owned else b""
    with tempfile.TemporaryFile() as restore_err, tempfile.TemporaryFile() as psql_err:
        producer = subprocess.Popen(
            [str(archive.pg_restore), *RESTORE_OPTIONS, "--single-transaction", "--file=-", str(archive.path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=restore_err,
        )
        consumer = subprocess.Popen(
            [str(psql), "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--file=-"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=psql_err, env=libpq_env(bot_conninfo),
        )
        assert producer.stdout is not None and consumer.stdin is not None
        try:
            problem = _relay(producer.stdout, consumer.stdin, inject, drop_timeout=server_major < 17)
        except BrokenPipeError:
            problem = None  # psql stopped at an error: its message says why
        except BaseException:
            problem = "interrupted"
            raise
        finally:
            if problem:  # psql must not see the end of its input: that would COMMIT
                consumer.kill()
                producer.kill()
            try:
                consumer.stdin.close()
            except BrokenPipeError:
                pass
            consumer.wait()
            if consumer.returncode != 0:
                producer.kill()
            producer.wait()
        if problem:
            return problem
        if consumer.returncode != 0:
            return _first_error(psql_err) or f"psql exited with code {consumer.returncode}"
        if producer.returncode != 0:
            return _first_error(restore_err) or f"pg_restore exited with code {producer.returncode}"
    return None


def _relay(src: IO[bytes], dst: IO[bytes], inject: bytes, *, drop_timeout: bool) -> str | None:
    """Copy the script, putting ``inject`` right after its opening BEGIN (so it is part of
    the one transaction) and leaving out what an older server cannot take. Returns a
    problem (and copies nothing more) when the script has no BEGIN before its first object."""
    begun = False
    for line in src:  # the header, line by line
        if line.startswith(_FIRST_ENTRY):
            if not begun:
                return "pg_restore wrote no BEGIN before the first object; nothing was restored"
            dst.write(line)
            break
        if drop_timeout and line == _TRANSACTION_TIMEOUT:
            continue
        dst.write(line)
        if not begun and line == b"BEGIN;\n":
            begun = True
            dst.write(inject)
    shutil.copyfileobj(src, dst, 1 << 20)
    return None


def _first_error(fh: IO[bytes]) -> str | None:
    fh.seek(0)
    lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if "ERROR:" in line or "error:" in line or "FATAL:" in line:
            return line.split("ERROR:", 1)[-1].split("FATAL:", 1)[-1].split("error:", 1)[-1].strip()
    return lines[-1] if lines else None
