"""The stack's metrics exporter and the role it reads the server as.

``provision metrics`` run by hand reads the server as the admin. As a service of the compose
stack it must not: an exporter is a long-running process reachable over HTTP, so it gets a login
role of its own, ``botfleet_monitor``, with only what reading the statistics needs:

- membership in ``pg_monitor`` (PostgreSQL's predefined role for exactly this: every session in
  pg_stat_activity with its query, pg_locks, database sizes, pg_stat_statements);
- CONNECT on botfleet's own database only (where ``pg_stat_statements`` is created: the stack
  preloads it), and a CONNECTION LIMIT of 2 (one sampling connection, one spare for a restart
  that overlaps); it reads none of botfleet's tables there (nothing is granted to it);
- no SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, and no CONNECT on any bot's
  database (they are closed to PUBLIC), so it can read no bot's rows;
- a generated password that reaches the server only as a SCRAM verifier, kept in one 0444 secret
  file in the 0700 ``secrets/`` folder (like a bot's URL file), that the exporter reads as its
  non-root user and the stack's ``provision`` service creates the role from;
- one pg_hba line, TLS and SCRAM from the stack's networks, for botfleet's database only.

Every statement is composed with psycopg.sql; the password never appears in a statement (only
its verifier) nor on any command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import sql

from . import roles
from .budget import EXPORTER_CONNECTIONS, EXPORTER_MEMORY
from .db import STATE_DATABASE
from .errors import InvalidInput, ProvisionError

ROLE = "botfleet_monitor"
CONNECTION_LIMIT = EXPORTER_CONNECTIONS  # the budget reserves them
# The URL the exporter connects with (password included, like a bot's URL file).
URL_FILE = "secrets/botfleet-monitor.url"
# Where the exporter's container finds it, and the variable that tells `provision metrics`/`top`.
URL_FILE_ENV = "BOTFLEET_MONITOR_URL_FILE"
CONTAINER_URL_FILE = "/run/secrets/monitor_url"
PORT = 9187  # the port Prometheus's postgres_exporter made the custom one
MEMORY = EXPORTER_MEMORY


@dataclass(frozen=True)
class MonitorUrl:
    url: str  # with the password: never printed
    password: str

    def __repr__(self) -> str:
        return "MonitorUrl(<hidden>)"


def stack_url(password: str, tls_query: str) -> str:
    """The exporter's URL inside the stack: the monitoring role, TLS verified, botfleet's database."""
    return (f"postgresql://{ROLE}:{quote(password, safe='')}@postgres:5432/{STATE_DATABASE}"
            f"?application_name=botfleet-exporter&{tls_query}")


def read_url_file(path: Path) -> MonitorUrl | None:
    """The monitoring URL and its password from ``path``; None when the file is missing.
    A file that holds no such URL is a ProvisionError that does not quote it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ProvisionError(f"cannot read the monitoring URL file {path}: {err.strerror}") from None
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres") or parts.username != ROLE or not parts.password:
        raise ProvisionError(f"{path} does not hold a postgresql://{ROLE}:PASSWORD@HOST/... URL "
                             "(provision render writes it)")
    return MonitorUrl(text, unquote(parts.password))


def url_from_environment() -> str | None:
    """The URL named by BOTFLEET_MONITOR_URL_FILE (the exporter's container), else None."""
    name = os.environ.get(URL_FILE_ENV)
    if not name:
        return None
    found = read_url_file(Path(name))
    if found is None:
        raise InvalidInput(f"{URL_FILE_ENV} names {name}, which does not exist")
    return found.url


def converge(conn: psycopg.Connection, password: str) -> list[str]:
    """Make the monitoring role what it must be on this server (the admin's connection, as a
    superuser or a role that may grant pg_monitor). Returns what it changed (empty: nothing)."""
    role = sql.Identifier(ROLE)
    changed = roles.converge_service(conn, ROLE, password, connection_limit=CONNECTION_LIMIT)
    member = conn.execute("SELECT pg_has_role(%s, 'pg_monitor', 'MEMBER')", (ROLE,)).fetchone()[0]
    if not member:
        conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(role))
        changed.append("pg_monitor")
    if not conn.execute("SELECT has_database_privilege(%s, %s, 'CONNECT')", (ROLE, STATE_DATABASE)).fetchone()[0]:
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(STATE_DATABASE), role))
        changed.append(f"connect on {STATE_DATABASE}")
    # Statement figures per bot: the stack preloads pg_stat_statements; its view lives where the
    # exporter connects (the admin session is in botfleet's database).
    preloaded = conn.execute("SELECT 'pg_stat_statements' = ANY(string_to_array(replace("
                             "current_setting('shared_preload_libraries'), ' ', ''), ',')) "
                             "AND current_database() = %s AND NOT EXISTS (SELECT FROM pg_extension "
                             "WHERE extname = 'pg_stat_statements')", (STATE_DATABASE,)).fetchone()[0]
    if preloaded:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")  # named: the session is pinned
        changed.append("pg_stat_statements")
    return changed
