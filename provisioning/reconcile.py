"""One bot reconciled, once: desired state, observed state, the changes between them, converge.

- desired: the bot's fleet.toml entry (``role_spec``, ``database_spec``, the env file
  add-bot writes);
- observed (:func:`observe`): its role and database on the server and, over ONE
  connection into its database, what is inside (PUBLIC's rights on schema
  public, the migration revision, and whatever more a caller asks to read
  there); its env file;
- changes (:func:`changes`): each difference once, with the words ``plan`` prints,
  the finding and fix ``doctor`` prints, and whether it is safe to apply
  unattended (``doctor --fix`` applies only those);
- converge (:func:`converge`): add-bot's and apply's one way of making the server
  and the env file match, under the bot's advisory lock.

``add-bot``, ``plan``/``apply`` and ``doctor`` all use it; doctor keeps only its
audit-only checks (memberships, grants, foreign objects, strays, file modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from . import databases, passwords, pool, quota, roles
from .db import AdminInfo, advisory_lock, connect, with_database
from .envfile import EnvFile, database_url
from .names import derive
from .errors import MissingCredentials, NotManaged, ProvisionError, one_line
from .project import Project
from .registry import GUARDS, BotEntry, Fleet
from .servers import Server
from .settings import lock as settings_lock

# The bot database admits its owner's limit plus one for the admin's own
# backup and maintenance sessions (superusers are not counted anyway).
DATABASE_ADMIN_MARGIN = 1
MARKER_PREFIX = "botfleet bot "

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def marker(bot: str) -> str:
    """The comment botfleet puts on the roles and databases it owns."""
    return f"{MARKER_PREFIX}{bot}"


def role_spec(entry: BotEntry, fleet: Fleet | None = None, *, skip: tuple[str, ...] = (),
              suspended: bool | None = False) -> roles.RoleSpec:
    """The role a registry entry converges to: its timeouts and ``fleet``'s guards for it
    (GUARDS: its own values, else [defaults]'s; one the admin cannot set there is in ``skip``,
    neither set nor reset), NOLOGIN while ``suspended`` (an enforced quota, see quota.py; None:
    unknown, LOGIN is left as it is)."""
    guards = fleet.guards(entry) if fleet is not None else {}
    return roles.RoleSpec(
        name=entry.role,
        connection_limit=entry.connection_limit,
        settings={
            "statement_timeout": entry.statement_timeout,
            "idle_in_transaction_session_timeout": entry.idle_in_transaction_session_timeout,
            **{k: v for k, v in guards.items() if k not in skip},
        },
        comment=marker(entry.name),
        managed=tuple(k for k in GUARDS if k not in skip) if fleet is not None else (),
        login=None if suspended is None else not suspended,
    )


@dataclass(frozen=True)
class RoleContext:
    """What the server adds to a bot's role spec: the guards the admin cannot set there (each
    with why, a one-line note) and whether an enforced quota suspends the bot."""

    problems: dict[str, str]
    suspended: bool | None  # None: botfleet's record of enforced quotas is there but unreadable to this admin

    def spec(self, entry: BotEntry, fleet: Fleet | None) -> roles.RoleSpec:
        return role_spec(entry, fleet, skip=tuple(self.problems), suspended=self.suspended)

    def notes(self, entry: BotEntry, fleet: Fleet | None) -> list[str]:
        """One line per guard the bot is to have that the admin could not set."""
        wanted = fleet.guards(entry) if fleet is not None else {}
        out = [f"{entry.name}: {key} = {wanted[key]} not applied: {why}"
               for key, why in self.problems.items() if key in wanted]
        if self.suspended is None:
            out.append(f"{entry.name}: this admin may not read botfleet's record of enforced quotas "
                       f"({quota.TABLE} in its database); the role's LOGIN attribute is left as it is")
        return out


def role_context(conn: psycopg.Connection, entry: BotEntry) -> RoleContext:
    """Read from the server what :class:`RoleContext` holds for ``entry``. A guard the bot does not
    want (unset) is checked too: botfleet resets it on the role, which needs the same right."""
    return RoleContext(roles.setting_problems(conn, list(GUARDS)), quota.is_suspended(conn, entry.role))


def database_spec(entry: BotEntry) -> databases.DatabaseSpec:
    """The database a registry entry converges to."""
    return databases.DatabaseSpec(
        name=entry.database, owner=entry.role,
        connection_limit=entry.connection_limit + DATABASE_ADMIN_MARGIN, comment=marker(entry.name),
    )


def expected_env(fleet: Fleet, entry: BotEntry, env: EnvFile, password: str) -> str:
    """The env file add-bot writes for ``entry`` with ``password`` (the lines it does not own kept)."""
    host, port = fleet.endpoint(entry)
    url = database_url(entry.role, password, host, port, entry.database)
    return env.rendered(entry.name, url, entry.pool_size, entry.max_overflow)


# --------------------------------------------------------------------------- observe


@dataclass
class Observed:
    """What is there for one bot, read once."""

    role: roles.RoleState | None
    database: databases.DatabaseState | None
    env: EnvFile = field(repr=False)
    looked_inside: bool = False
    public_schema_open: bool = False
    revision: str | None = None
    inside_error: str | None = None  # the database could not be looked inside
    extra: Any = None  # what the caller's ``read_inside`` returned
    context: RoleContext | None = None  # read with the fleet's (observe_many); else role_context() reads it
    # Whether the env file's password is the one behind the role's verifier (None: not worked out
    # yet). observe_many works it out in its pool's threads (PBKDF2, the client's costliest step,
    # runs there while the other threads wait on the server); else _env_changes does.
    password_matches: bool | None = None

    @property
    def exists(self) -> bool:
        return self.role is not None or self.database is not None


def observe(server: Server, project: Project, entry: BotEntry, *, inside: bool = True,
            read_inside: Callable[[psycopg.Connection], Any] | None = None) -> Observed:
    """The bot's role, database and env file; with ``inside``, one connection into its
    database (when it accepts connections) for the schema, the revision and ``read_inside``."""
    observed = _observe_outside(server, project, entry)
    if inside:
        _look_inside(server.url, entry, observed, read_inside)
    return observed


def observe_many(server: Server, project: Project, entries: list[BotEntry], *,
                 read_inside: Callable[[BotEntry], Callable[[psycopg.Connection], Any] | None] | None = None,
                 session: Callable[[BotEntry, Observed], psycopg.Connection | None] | None = None,
                 meanwhile: Callable[[list[Observed]], Any] | None = None,
                 ) -> list[Observed]:
    """:func:`observe` of each of ``entries`` (all on ``server``), in their order: the catalog
    reads on the admin connection, then the looks inside the bot databases through a small
    bounded pool of connections at once (pool.py), one connection per bot database.
    ``read_inside(entry)``: what to read inside that bot's database, as :func:`observe`'s.
    ``session(entry, observed)`` (run in the pool's threads, once the role, database and env file
    are observed): a connection into the bot's database that the look inside may use instead of
    an admin one (doctor's login as the bot), or None; see :func:`_look_inside`.
    ``meanwhile(observed)``: client work for this thread while the pool's threads wait on the
    server (plan renders the stack then), given the observations as they are before the looks
    inside: it may read their role, database and env file, nothing the looks fill in."""
    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    # The catalogs once for the fleet: its roles, its databases, the guards this admin cannot set.
    role_states = roles.inspect_many(conn, [e.role for e in entries], read_verifier=admin.superuser)
    database_states = databases.inspect_many(conn, [e.database for e in entries])
    problems = roles.setting_problems(conn, list(GUARDS)) if entries else {}
    suspended = quota.suspended_many(conn, [e.role for e in entries if e.role in role_states])
    out = []
    for entry in entries:
        observed = Observed(role=role_states.get(entry.role), database=database_states.get(entry.database),
                            env=project.env(entry.name))
        if observed.role is not None:
            observed.context = RoleContext(problems, suspended[entry.role])
        out.append(observed)

    def look(i: int) -> None:
        observed = out[i]
        opened = session(entries[i], observed) if session is not None else None
        if observed.role is not None and observed.role.verifier is not None:
            password = observed.env.password(entries[i].role)
            if password is not None:
                # A session that logged in with this password (doctor's, over SCRAM) is the server's
                # own check of it against the role's verifier: no PBKDF2 of it here (1 ms a bot).
                # Without one (a login trusted by pg_hba uses no password), the check is made here.
                observed.password_matches = (True if opened is not None and opened.pgconn.used_password
                                             else passwords.verifier_matches(password, observed.role.verifier))
        _look_inside(server.url, entries[i], observed, read_inside(entries[i]) if read_inside else None, opened)

    jobs = pool.jobs(server.conn, len(entries))
    if meanwhile is None:
        pool.visit(range(len(entries)), look, jobs)
    else:
        pool.visit_meanwhile(range(len(entries)), look, jobs, lambda: meanwhile(out))
    return out


def _observe_outside(server: Server, project: Project, entry: BotEntry) -> Observed:
    assert server.conn is not None and server.admin is not None
    return Observed(
        role=roles.inspect(server.conn, entry.role, read_verifier=server.admin.superuser),
        database=databases.inspect(server.conn, entry.database),
        env=project.env(entry.name),
    )


# The admin's session in a bot's database is pinned (db.PINNED_SETTINGS); the bot's version table
# is named with its schema (where the bot's default search_path puts it: public) and read only
# when it is a plain table: a view (or a rule) there would run the bot's functions as the admin.
VERSION_TABLE = sql.Identifier("public", "alembic_version")
_LOOK = sql.SQL("SELECT ({}), EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = 'alembic_version'"
                " AND c.relkind = 'r')").format(sql.SQL(databases._PUBLIC_ON_SCHEMA))
_VERSION = sql.SQL("SELECT version_num FROM ONLY {}").format(VERSION_TABLE)


def _look_inside(url: str, entry: BotEntry, observed: Observed,
                 read_inside: Callable[[psycopg.Connection], Any] | None,
                 opened: psycopg.Connection | None = None) -> None:
    """One connection into the bot's database (when it accepts connections): its schema, its
    revision and ``read_inside``; what stops it is ``inside_error``. Touches only ``observed``
    and a connection of its own (observe_many runs it in threads).

    ``opened``: a connection into the bot's database already made (doctor's login as the bot),
    used instead of a new admin one and closed here. The reads there are the same queries, of
    catalogs every role may read; should any of them fail there (a privilege the bot lacks, one
    of its own timeouts), the admin's connection reads everything again, as without it."""
    if observed.database is None or not observed.database.allow_connections:
        if opened is not None:
            opened.close()
        return
    observed.looked_inside = True
    if opened is not None:
        try:
            with opened:
                _read_inside(opened, observed, read_inside)
            return
        except psycopg.Error:
            observed.public_schema_open, observed.revision, observed.extra = False, None, None
    try:
        with connect(with_database(url, entry.database)) as db_conn:
            _read_inside(db_conn, observed, read_inside)
    except (ProvisionError, psycopg.Error) as err:
        observed.inside_error = one_line(err)


def _read_inside(db_conn: psycopg.Connection, observed: Observed,
                 read_inside: Callable[[psycopg.Connection], Any] | None) -> None:
    # databases.public_schema_open and migrate.revision_of, in two round trips, not three
    row = db_conn.execute(_LOOK).fetchone()
    assert row is not None
    observed.public_schema_open = bool(row[0])
    if row[1]:
        version = db_conn.execute(_VERSION).fetchone()
        observed.revision = version[0] if version else None
    if read_inside is not None:
        observed.extra = read_inside(db_conn)


# --------------------------------------------------------------------------- changes

# Change targets: what converge touches to apply it.
ROLE, DATABASE, SCHEMA, ENV, PASSWORD, CREATE_ROLE, CREATE_DATABASE, INSIDE = (
    "role", "database", "schema", "env", "password", "create-role", "create-database", "inside")


@dataclass
class Change:
    check: str  # doctor's category: attributes, limits, marker, ownership, access, env-file, password, missing
    target: str  # ROLE, DATABASE, SCHEMA, ENV, PASSWORD, CREATE_ROLE, CREATE_DATABASE, INSIDE
    words: str  # as plan lists it
    finding: str  # as doctor reports it
    fix: str  # the SQL statement or command that repairs it
    safe: bool  # may be applied unattended (doctor --fix): never a create, a password or an env file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _role_changes(conn: psycopg.Connection, entry: BotEntry, state: roles.RoleState, spec: roles.RoleSpec) -> list[Change]:
    d = roles.diff(spec, state)
    ident = sql.Identifier(entry.role)
    q = lambda stmt: stmt.as_string(conn)  # noqa: E731
    out = []
    if d.wrong_flags:
        wanted = roles.wanted_flags(spec)
        words = [roles.flag_sql(f, wanted[f]) for f in d.wrong_flags]
        has = " ".join(roles.flag_sql(f, not wanted[f]) for f in d.wrong_flags)
        stmt = sql.SQL("ALTER ROLE {} WITH {}").format(ident, sql.SQL(" ").join(sql.SQL(w) for w in words))
        why = " while its quota is enforced (provision quota enforce lifts it once under quota)" \
            if spec.login is False else ""
        out.append(Change("attributes", ROLE, "role attributes (" + " ".join(words) + ")",
                          f"role {entry.role} has {has}{why}", q(stmt), True))
    if d.connection_limit is not None:
        stmt = sql.SQL("ALTER ROLE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(d.connection_limit))
        out.append(Change("limits", ROLE, f"role connection limit {state.connection_limit} -> {d.connection_limit}",
                          f"role {entry.role} connection limit is {state.connection_limit}, the registry says "
                          f"{d.connection_limit}", q(stmt), True))
    for key, want in d.settings.items():
        have = state.settings.get(key)
        stmt = sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(key), sql.Literal(want))
        out.append(Change("limits", ROLE, f"role {key} {have or 'unset'} -> {want}",
                          f"role {entry.role} {key} is {have or 'unset'}, the registry says {want}", q(stmt), True))
    for key in d.unset:
        stmt = sql.SQL("ALTER ROLE {} RESET {}").format(ident, sql.Identifier(key))
        out.append(Change("limits", ROLE, f"role {key} {state.settings[key]} -> unset",
                          f"role {entry.role} {key} is {state.settings[key]}, the registry sets none", q(stmt), True))
    if d.comment:
        stmt = sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(spec.comment))
        out.append(Change("marker", ROLE, "role marker comment", f"role {entry.role} lacks botfleet's marker comment",
                          q(stmt), True))
    if d.valid_until:
        stmt = sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(ident, sql.Literal("infinity"))
        out.append(Change("login", ROLE, f"role password expiry ({d.valid_until}) lifted",
                          f"the password of role {entry.role} expires at {d.valid_until} (VALID UNTIL, which botfleet "
                          "never sets): its bot cannot log in after that", q(stmt), True))
    for database, settings in d.database_settings.items():
        stmt = sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(ident, sql.Identifier(database))
        shown = ", ".join(settings)
        out.append(Change("limits", ROLE, f"role settings in database {database} ({shown}) reset",
                          f"role {entry.role} has settings of its own in database {database} ({shown}): they override "
                          "the registry's", q(stmt), True))
    return out


def _database_changes(conn: psycopg.Connection, entry: BotEntry, state: databases.DatabaseState) -> list[Change]:
    spec = database_spec(entry)
    d = databases.diff(spec, state)
    ident = sql.Identifier(entry.database)
    q = lambda stmt: stmt.as_string(conn)  # noqa: E731
    out = []
    if d.owner:
        stmt = sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(spec.owner))
        out.append(Change("ownership", DATABASE, f"database owner {state.owner} -> {spec.owner}",
                          f"database {entry.database} is owned by {state.owner}, not by {spec.owner}", q(stmt), True))
    if d.connection_limit:
        stmt = sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(ident, sql.Literal(spec.connection_limit))
        out.append(Change("limits", DATABASE,
                          f"database connection limit {state.connection_limit} -> {spec.connection_limit}",
                          f"database {entry.database} connection limit is {state.connection_limit}, the registry says "
                          f"{spec.connection_limit}", q(stmt), True))
    if d.allow_connections:
        stmt = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident)
        out.append(Change("access", DATABASE, "database accepts connections again",
                          f"database {entry.database} refuses all connections", q(stmt), True))
    if d.public:
        stmt = sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident)
        out.append(Change("access", DATABASE, "revoke PUBLIC access to the database",
                          f"PUBLIC (every role) has {state.public_privileges} on database {entry.database}", q(stmt), True))
    if d.comment:
        stmt = sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(spec.comment))
        out.append(Change("marker", DATABASE, "database marker comment",
                          f"database {entry.database} lacks botfleet's marker comment", q(stmt), True))
    if d.settings:
        stmt = sql.SQL("ALTER DATABASE {} RESET ALL").format(ident)
        shown = ", ".join(d.settings)
        out.append(Change("settings", DATABASE, f"database settings ({shown}) reset",
                          f"database {entry.database} has settings for every session in it ({shown}), which botfleet "
                          "never sets (its owner, the bot, may): they reach every other role's sessions there "
                          "(botfleet's own pin theirs)", q(stmt), True))
    return out


def _env_changes(fleet: Fleet, entry: BotEntry, observed: Observed) -> list[Change]:
    env, rel = observed.env, entry.env_file
    rewrite = f"provision add-bot {entry.name}  (rewrites it from the registry, keeping the password)"
    renew = f"provision add-bot {entry.name}  (writes it with a new password)"
    password = env.password(entry.role)
    if password is None:
        state = "missing" if not env.exists else "no usable DATABASE_URL"
        finding = f"{env.path} is missing" if not env.exists else f"{env.path} has no DATABASE_URL for role {entry.role}"
        return [Change("env-file", ENV, f"{rel}: {state}; written with a new password (set on the server)",
                       finding, renew, False)]
    out = []
    expected = expected_env(fleet, entry, env, password)
    if env.text != expected:
        diffs = env.differences(expected)
        words = [f"{label} {have or '-'} -> {want}" for label, have, want in diffs] or ["rewritten in add-bot's format"]
        out += [Change("env-file", ENV, f"{rel}: {w}", "", rewrite, False) for w in words]
        if diffs:  # a format-only difference is no finding
            out[-len(words)].finding = (f"{env.path} does not match the registry: "
                                        + ", ".join(f"{label} {have} (registry: {want})" for label, have, want in diffs))
    role = observed.role
    if role is not None and role.verifier_read and role.verifier is None:
        out.append(Change("password", PASSWORD, f"server password set to the one in {rel} (the role has none)",
                          f"role {entry.role} has no password on the server (its bot cannot log in)",
                          f"provision add-bot {entry.name}  (sets the server's password to the env file's)", False))
    elif role is not None and role.verifier is not None and not (
            observed.password_matches if observed.password_matches is not None
            else passwords.verifier_matches(password, role.verifier)):
        out.append(Change("password", PASSWORD, f"server password reset to the one in {rel}",
                          f"the password in {env.path} is not the role's password on the server",
                          f"provision add-bot {entry.name}  (sets the server's password to the env file's)", False))
    return out


def changes(server: Server, project: Project, entry: BotEntry, observed: Observed) -> list[Change]:
    """Every difference between the bot's entry and what ``observed`` found, each once.
    Empty when the bot is as fleet.toml says."""
    assert server.conn is not None
    fleet = project.fleet
    out: list[Change] = []
    if observed.role is None:
        out.append(Change("missing", CREATE_ROLE, f"create the missing role {entry.role}; {entry.env_file} gets a new password",
                          f"role {entry.role} does not exist on the server",
                          f"provision add-bot {entry.name}  (creates it with a new password)", False))
    else:
        spec = (observed.context or role_context(server.conn, entry)).spec(entry, fleet)
        out += _role_changes(server.conn, entry, observed.role, spec)
    if observed.database is None:
        latest = sorted(project.backups(entry.name).glob(f"{entry.name}-*.dump"))
        then = f", then: provision restore {entry.name} {latest[-1]}" if latest else ""
        out.append(Change("missing", CREATE_DATABASE, f"create the missing database {entry.database} (empty)",
                          f"database {entry.database} does not exist on the server",
                          f"provision add-bot {entry.name}  (creates it empty){then}", False))
    else:
        out += _database_changes(server.conn, entry, observed.database)
    if observed.inside_error:
        out.append(Change("access", INSIDE, f"cannot look inside {entry.database}: {observed.inside_error}",
                          f"cannot look inside {entry.database}: {observed.inside_error}", "", False))
    elif observed.public_schema_open:
        out.append(Change("access", SCHEMA, "revoke PUBLIC rights on schema public",
                          f"PUBLIC has rights on schema public in {entry.database}",
                          f"REVOKE ALL ON SCHEMA public FROM PUBLIC  (in {entry.database})", True))
    if observed.role is not None:  # a missing role means a new password: the env file follows it
        out += _env_changes(fleet, entry, observed)
    return out


def ours(entry: BotEntry, observed: Observed, kind: str) -> bool:
    """Whether the bot's existing role (``kind`` "role") or database is botfleet's for this bot.

    A role: it carries botfleet's marker for this bot. A database: it carries the marker AND
    its owner is the bot's own marked role (a comment alone is what any database's owner can
    write), or it is one an interrupted add-bot left half made (owned by that role, never
    opened), which the rerun finishes."""
    state = observed.role if kind == "role" else observed.database
    if state is None:
        return True
    role_ours = observed.role is not None and observed.role.comment == marker(entry.name)
    if kind == "role":
        return role_ours
    database = observed.database
    assert database is not None
    if database.comment == marker(entry.name):
        return role_ours and database.owner == entry.role
    return role_ours and databases.half_made(database_spec(entry), database)


def check_managed(entry: BotEntry, observed: Observed, *, known: bool) -> None:
    """Refuse (NotManaged) a role or database with the bot's name that botfleet did not make
    for this bot, unless fleet.toml already names the bot (``known``: the operator says it is its)."""
    for kind, name in (("role", entry.role), ("database", entry.database)):
        if not ours(entry, observed, kind) and not known:
            raise NotManaged(f"{kind} {name!r} already exists and was not created by botfleet; "
                             "refusing to take it over (drop or rename it, or choose another bot name)")


# --------------------------------------------------------------------------- converge


@dataclass
class Converged:
    bot: str
    status: str  # created | already provisioned | repaired
    changes: list[str] = field(default_factory=list)
    password_changed: bool = False
    notes: list[str] = field(default_factory=list)  # guards the admin could not set, one line each


def converge(server: Server, project: Project, entry: BotEntry, *, known: bool, rotate: bool = False,
             credentials_only: bool = False, progress: Progress = _quiet) -> Converged:
    """Make the server and the env file match ``entry``, under the bot's advisory lock:
    role, database, lock-down, password (kept unless ``rotate`` or it cannot be
    recovered), env file. Raises NotManaged for names botfleet did not create (unless ``known``).

    ``credentials_only`` (the compose stack's provisioning service): the env file is only
    read, never written, and its password is the one the server gets, also for a role that
    is missing; a bot without one is refused (MissingCredentials)."""
    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    # The env file is read and rewritten under the settings' lock, so a `config set` running
    # at the same moment is never lost (the stack's service only reads: no lock, no file).
    files = contextlib.nullcontext() if credentials_only else settings_lock(project)
    with advisory_lock(conn, entry.name), files:
        observed = observe(server, project, entry, inside=False)
        check_managed(entry, observed, known=known)
        role_state, db_state, env = observed.role, observed.database, observed.env
        repaired: list[str] = []

        # The password: keep the one the bot already has, unless asked to rotate or it
        # cannot be recovered. The env file is written before the server changes, so a
        # crash in between is repaired by the next run.
        password = env.password(entry.role)
        set_password = new_password = False
        if credentials_only:
            if password is None:
                raise MissingCredentials(
                    f"{entry.name}: no credentials for role {entry.role} in {env.path}: run provision add-bot "
                    f"{entry.name} where the fleet is managed, then provision render")
            set_password = role_state is None or role_state.verifier is None or not passwords.verifier_matches(
                password, role_state.verifier)
            if role_state is not None and role_state.verifier is not None and set_password:
                repaired.append("password on the server set to the one in the credentials file")
        elif rotate or password is None or role_state is None:
            if role_state is not None:
                repaired.append("password rotated" if rotate else "password reset (its env file was missing)")
            password = passwords.generate()
            set_password = new_password = True
        elif role_state.verifier_read and role_state.verifier is None:
            repaired.append("password on the server set to the one in the env file (the role had none)")
            set_password = True
        elif role_state.verifier is not None and not passwords.verifier_matches(password, role_state.verifier):
            repaired.append("password on the server reset to the one in the env file")
            set_password = True
        elif role_state.verifier is None and not admin.superuser:
            # Without superuser the verifier cannot be read: re-send it (same password,
            # new salt) so the server surely matches the env file.
            set_password = True

        text = expected_env(project.fleet, entry, env, password)
        if not credentials_only and env.text != text:
            progress(f"writing {env.path}")
            env.write(text)

        verifier = passwords.scram_verifier(conn, password, entry.role) if set_password else None
        context = role_context(conn, entry)
        spec = context.spec(entry, project.fleet)
        notes = context.notes(entry, project.fleet)
        if role_state is None:
            progress(f"creating role {entry.role}")
            roles.create(conn, spec, verifier)  # type: ignore[arg-type]
        else:
            repaired += [c.words for c in _role_changes(conn, entry, role_state, spec) if c.check != "marker"]
            roles.converge(conn, spec, role_state, verifier)
        if not admin.superuser:
            _grant_admin_membership(conn, admin, entry.role)

        if db_state is None:
            progress(f"creating database {entry.database}")
            databases.create(conn, database_spec(entry))
            if role_state is not None:
                repaired.append("created the missing database")
        else:
            repaired += [c.words.replace("revoke PUBLIC", "revoked PUBLIC")
                         for c in _database_changes(conn, entry, db_state) if c.check != "marker"]
            databases.converge(conn, database_spec(entry), db_state)
        with connect(with_database(server.url, entry.database)) as bot_conn:
            schema = databases.lock_down_schema(bot_conn)
        if db_state is not None:
            repaired += schema

    if role_state is None and db_state is None:
        status = "created"
    elif repaired:
        status = "repaired"
    else:
        status = "already provisioned"
    return Converged(entry.name, status, repaired, new_password, notes)


def _grant_admin_membership(conn: psycopg.Connection, admin: AdminInfo, role: str) -> None:
    """A CREATEROLE admin (not superuser) must act as the bot role: to create the
    database OWNER it (SET), then to revoke, comment on and drop it as its
    owner (INHERIT). PostgreSQL 16 no longer gives a role's creator either."""
    query = ("SELECT pg_has_role(current_user, %(r)s, 'SET') AND pg_has_role(current_user, %(r)s, 'USAGE')"
             if admin.major >= 16 else "SELECT pg_has_role(current_user, %(r)s, 'USAGE')")
    member = conn.execute(query, {"r": role}).fetchone()
    if member and member[0]:
        return
    stmt = "GRANT {} TO {} WITH SET TRUE, INHERIT TRUE" if admin.major >= 16 else "GRANT {} TO {}"
    conn.execute(sql.SQL(stmt).format(sql.Identifier(role), sql.Identifier(admin.role)))


def repair(server: Server, entry: BotEntry, target: str, fleet: Fleet | None = None) -> Callable[[], None]:
    """The unattended repair of one safe change's target (doctor --fix): converge that
    part of the bot again from a fresh look (the server may have moved on). ``fleet``: for
    its [defaults] guards (without it only the timeouts are repaired on the role)."""
    conn = server.conn
    assert conn is not None

    def run() -> None:
        if target == ROLE:
            state = roles.inspect(conn, entry.role, read_verifier=False)
            if state is not None:
                spec = role_context(conn, entry).spec(entry, fleet)
                roles.converge(conn, spec, state, None)
        elif target == DATABASE:
            state = databases.inspect(conn, entry.database)
            if state is not None:
                databases.converge(conn, database_spec(entry), state)
        elif target == SCHEMA:
            with connect(with_database(server.url, entry.database)) as db_conn:
                databases.lock_down_schema(db_conn)
        else:
            raise ValueError(f"no unattended repair for {target}")
    return run


# --------------------------------------------------------------------------- remove


@dataclass
class Removed:
    bot: str
    status: str  # removed | not provisioned
    backup: str | None = None
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def remove(server: Server, project: Project, name: str, *, backup: bool = True, progress: Progress = _quiet) -> Removed:
    """Back up, then drop one bot's database and role, its env file and registry entry.

    Refuses (NotManaged) to drop objects botfleet did not create. With ``backup`` a
    failed pg_dump stops everything before anything is dropped. Removing a bot that
    is already gone is a no-op. The caller validated ``name``.
    """
    from . import backup as backups

    conn, admin = server.conn, server.admin
    assert conn is not None and admin is not None
    names = derive(name)
    known = name in project.fleet.bots
    env_path = project.env_path(name)
    result = Removed(bot=name, status="removed")
    with advisory_lock(conn, name):
        role_state = roles.inspect(conn, names.role, read_verifier=False)
        db_state = databases.inspect(conn, names.database)
        check_managed(BotEntry(name=name, code=name), Observed(role_state, db_state, EnvFile(env_path)), known=known)
        if not (known or role_state or db_state or env_path.exists()):
            return Removed(bot=name, status="not provisioned")
        if db_state and backup:
            progress(f"backing up {names.database} with pg_dump")
            path = backups.dump(server.url, names.database, project.backups(name), name, server_major=admin.major)
            result.backup = str(path)
            progress(f"backup written: {path} ({path.stat().st_size} bytes)")
        if db_state:
            progress(f"ending sessions and dropping database {names.database}")
            databases.drop(conn, names.database)
            result.dropped.append(f"database {names.database}")
        if role_state:
            progress(f"dropping role {names.role}")
            roles.drop(conn, names.role)
            result.dropped.append(f"role {names.role}")
        try:
            quota.forget(conn, names.role)  # an enforced quota's record and size samples go with its role
        except psycopg.errors.InsufficientPrivilege:
            progress(f"note: this admin may not remove {names.role} from botfleet's record of enforced quotas "
                     f"({quota.TABLE}); a superuser can (provision quota enforce lifts it if the bot comes back)")
        if env_path.exists():
            env_path.unlink()
            result.dropped.append(f"env file {env_path}")
        with project.editing() as fleet:
            if fleet.bots.pop(name, None) is not None:
                result.dropped.append("registry entry")
    return result
