"""Authoring and checking a code's migrations: new revisions, autogenerate, drift checks.

Autogenerate compares a bot code's models with a database at the head of its
migrations. That database is a throwaway *scratch* database on the admin's
server, migrated to head and dropped afterwards, so authoring a revision never
depends on (or touches) any deployed bot's data.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from . import codes
from .db import advisory_lock, with_database
from .errors import ProvisionError
from .migrate import Target, alembic_config, metadata_for, migrate_one, script_directory

SCRATCH_PREFIX = "botfleet_scratch_"


def scratch_prefix(root: Path) -> str:
    """How a project's scratch databases are named: botfleet's prefix, then a hash of the project's
    folder (no path on the server), so ``doctor`` finds the ones its own project's killed runs left
    and never touches another fleet's on the same server."""
    return f"{SCRATCH_PREFIX}{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}_"


@contextlib.contextmanager
def scratch_database(conn: psycopg.Connection, admin_url: str, root: Path) -> Iterator[str]:
    """A new empty database owned by the admin, dropped (with its sessions) afterwards.

    Its advisory lock is held on ``conn`` from before it exists until it is gone: a scratch
    database whose lock nobody holds was left by a run that died, which ``doctor --fix`` drops."""
    name = scratch_prefix(root) + secrets.token_hex(4)
    with advisory_lock(conn, name):
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
        try:
            # Its sessions keep the usual search_path (migrations create tables there): no other
            # role may connect to plant look-alikes in it (PUBLIC's default CONNECT goes).
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
            yield with_database(admin_url, name, pin=False)  # the admin's own: migrations create tables there
        finally:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _at_head(root: Path, package: str, conninfo: str) -> None:
    outcome = migrate_one(Target(bot=f"scratch ({package})", root=str(root), package=package,
                                 database="scratch", conninfo=conninfo))
    if not outcome.ok:
        raise ProvisionError(f"code {package}: its migrations do not apply to an empty database: {outcome.error}")


def _sync_engine(conninfo: str):
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=NullPool)


def model_differences(conn: psycopg.Connection, admin_url: str, root: Path, package: str) -> list[str]:
    """What autogenerate would add to code ``package``'s migrations (empty: in sync)."""
    metadata = metadata_for(str(root), package)
    with scratch_database(conn, admin_url, root) as conninfo:
        _at_head(root, package, conninfo)
        engine = _sync_engine(conninfo)
        try:
            with engine.connect() as sync_conn:
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True, "target_metadata": metadata})
                diffs = compare_metadata(ctx, metadata)
        finally:
            engine.dispose()
    return [_describe(d) for d in diffs]


def _describe(diff) -> str:
    if isinstance(diff, list):  # column modifications come grouped
        return "; ".join(_describe(d) for d in diff)
    op, *rest = diff
    target = next((getattr(x, "name", None) for x in rest if getattr(x, "name", None)), None)
    table = next((str(x) for x in rest if isinstance(x, str)), None)
    return " ".join(str(x) for x in (op, table, target) if x)


def new_revision(
    conn: psycopg.Connection | None, admin_url: str | None, root: Path, code: str, message: str, *, autogenerate: bool
) -> Path | None:
    """Write a new revision file for ``code``; with ``autogenerate`` its operations
    come from the models (None when the models match the migrations: nothing written)."""
    found = codes.with_migrations(root, code)
    script = script_directory(str(root), found.package)
    if len(script.get_heads()) > 1:
        raise ProvisionError(f"code {found.package} has several heads; merge them first")
    cfg = alembic_config(root, found.package)
    cfg.attributes["target_metadata"] = metadata_for(str(root), found.package)
    written: list[Path] = []

    def keep_only_changes(context, revision, directives) -> None:
        if autogenerate and directives and directives[0].upgrade_ops.is_empty():
            directives[:] = []

    cfg.attributes["process_revision_directives"] = keep_only_changes
    if not autogenerate:
        scripts = command.revision(cfg, message=message, version_path=str(found.versions))
        written += [Path(s.path) for s in _as_list(scripts)]
    else:
        assert conn is not None and admin_url is not None
        with scratch_database(conn, admin_url, root) as conninfo:
            _at_head(root, found.package, conninfo)
            engine = _sync_engine(conninfo)
            try:
                with engine.connect() as sync_conn:
                    cfg.attributes["connection"] = sync_conn
                    scripts = command.revision(cfg, message=message, autogenerate=True, version_path=str(found.versions))
                    written += [Path(s.path) for s in _as_list(scripts)]
            finally:
                engine.dispose()
    script_directory.cache_clear()
    return written[0] if written else None


def _as_list(scripts) -> list:
    if scripts is None:
        return []
    return scripts if isinstance(scripts, list) else [scripts]
