"""What lives inside a bot database: an inventory of its objects and their owners.

Used by ``restore`` (is the database empty? does anything belong to another
role?) and ``doctor`` (objects not owned by the bot, and the ALTER ... OWNER TO
that repairs each; privileges other roles were granted on the bot's objects, and
default privileges that would grant its future objects, with the REVOKE that
repairs each). Every statement is composed with psycopg.sql.

Covered: schemas, tables (plain, partitioned, foreign), views, materialized
views, free-standing sequences, types (composite, enum, range), domains,
functions, procedures and aggregates, large objects. Objects that belong to an
extension are the extension's (extensions cannot change owner); indexes,
TOAST tables and sequences owned by a column follow their table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

# ALTER <keyword> ... OWNER TO, per kind.
_KEYWORD = {
    "table": "TABLE", "foreign table": "FOREIGN TABLE", "view": "VIEW", "materialized view": "MATERIALIZED VIEW",
    "sequence": "SEQUENCE", "type": "TYPE", "domain": "DOMAIN", "routine": "ROUTINE", "schema": "SCHEMA",
    "large object": "LARGE OBJECT",
}

# The schema every database has; from PostgreSQL 15 on it belongs to
# pg_database_owner, i.e. to whoever owns the database: the bot.
PUBLIC_SCHEMA_OWNERS = ("pg_database_owner",)


@dataclass(frozen=True)
class DbObject:
    kind: str  # table, view, sequence, type, domain, routine, schema, large object, ...
    schema: str | None
    name: str
    owner: str
    oid: int
    args: tuple[str, ...] = ()  # routines: argument types as "schema.typname"
    signature: str = ""  # routines: the arguments as PostgreSQL prints them

    def __str__(self) -> str:
        where = f"{self.schema}.{self.name}" if self.schema else self.name
        if self.kind == "routine":
            where += f"({self.signature})"
        return f"{self.kind} {where}"

    def is_builtin_public_schema(self) -> bool:
        return self.kind == "schema" and self.name == "public"

    def owned_by(self, role: str) -> bool:
        if self.is_builtin_public_schema():
            return self.owner in (role, *PUBLIC_SCHEMA_OWNERS)
        return self.owner == role

    def target(self) -> sql.Composable:
        """The object as ALTER, GRANT and REVOKE name it (a routine with its argument types)."""
        if self.kind == "large object":
            target: sql.Composable = sql.Literal(self.oid)
        elif self.schema is None:
            target = sql.Identifier(self.name)
        else:
            target = sql.Identifier(self.schema, self.name)
        if self.kind == "routine":
            types = [sql.Identifier(*a.split(".", 1)) for a in self.args]
            target = sql.Composed([target, sql.SQL("("), sql.SQL(", ").join(types), sql.SQL(")")])
        return target

    def reassign(self, role: str) -> sql.Composed:
        """ALTER ... OWNER TO ``role`` for this object."""
        return sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(_KEYWORD[self.kind]), self.target(), sql.Identifier(role))


def inventory(conn: psycopg.Connection) -> list[DbObject]:
    """Every object of the kinds above in the database ``conn`` is connected to."""
    return Contents.read(conn).inventory()


def content(objects: list[DbObject]) -> list[DbObject]:
    """The objects that make a database "not empty" (everything but schema public)."""
    return [o for o in objects if not o.is_builtin_public_schema()]


def not_owned_by(objects: list[DbObject], role: str) -> list[DbObject]:
    return [o for o in objects if not o.owned_by(role)]


# --------------------------------------------------------------------------- privileges granted to others

# What a bot's objects grant to other roles. botfleet itself grants nothing inside a bot
# database (the bot owns everything and restore runs without ACLs), so every grant to a
# named role is someone else's doing (or the bot's own, to a role it should not trust).
# Grants to PUBLIC are left out: PUBLIC may not connect to a bot's database (the reconcile
# keeps it so, and reports PUBLIC's rights on schema public), so they open nothing; and
# PostgreSQL itself gives PUBLIC EXECUTE on every routine and USAGE on every type.
# GRANT/REVOKE ... ON <keyword>, per kind (views and the like are tables to GRANT).
_GRANT_KEYWORD = {
    "table": "TABLE", "foreign table": "TABLE", "view": "TABLE", "materialized view": "TABLE",
    "sequence": "SEQUENCE", "type": "TYPE", "domain": "DOMAIN", "routine": "ROUTINE", "schema": "SCHEMA",
    "large object": "LARGE OBJECT",
}
# pg_default_acl.defaclobjtype -> ALTER DEFAULT PRIVILEGES ... ON <keyword>
_DEFAULT_KEYWORD = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}
# In a bot's database the database's owner is the bot's role.
_DATABASE_OWNER = "pg_database_owner"


@dataclass(frozen=True)
class Grant:
    """Privileges on one object (or one of its columns) held by a role that does not own it."""

    target: DbObject
    grantee: str
    privileges: str  # e.g. "INSERT, SELECT"
    column: str | None = None

    def __str__(self) -> str:
        column = f" column {self.column}" if self.column else ""
        return f"{self.grantee} has {self.privileges} on {self.target}{column}"

    def revoke(self) -> sql.Composed:
        """REVOKE ALL of them; CASCADE also takes back what the grantee passed on with GRANT OPTION."""
        column = sql.SQL(" ({})").format(sql.Identifier(self.column)) if self.column else sql.SQL("")
        return sql.SQL("REVOKE ALL{} ON {} {} FROM {} CASCADE").format(
            column, sql.SQL(_GRANT_KEYWORD[self.target.kind]), self.target.target(), sql.Identifier(self.grantee))


@dataclass(frozen=True)
class DefaultGrant:
    """ALTER DEFAULT PRIVILEGES: what ``role``'s future objects of one type grant to ``grantee``."""

    role: str
    schema: str | None  # None: in every schema
    objtype: str  # pg_default_acl.defaclobjtype: r, S, f, T, n
    grantee: str
    privileges: str

    def __str__(self) -> str:
        where = f" in schema {self.schema}" if self.schema else ""
        return (f"default privileges of {self.role}{where}: {self.grantee} gets {self.privileges} on "
                f"every new {_DEFAULT_KEYWORD[self.objtype].lower()[:-1]}")

    def revoke(self) -> sql.Composed:
        where = sql.SQL(" IN SCHEMA {}").format(sql.Identifier(self.schema)) if self.schema else sql.SQL("")
        return sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}{} REVOKE ALL ON {} FROM {}").format(
            sql.Identifier(self.role), where, sql.SQL(_DEFAULT_KEYWORD[self.objtype]), sql.Identifier(self.grantee))


def _foreign(grantee: str | None, role: str) -> bool:
    """A named role other than ``role`` (pg_database_owner is ``role`` in its own database; PUBLIC: see above)."""
    return grantee is not None and grantee not in (role, _DATABASE_OWNER)


def foreign_grants(conn: psycopg.Connection, role: str) -> list[Grant]:
    """Privileges on objects in the database ``conn`` is connected to that named roles other
    than their owner and ``role`` hold."""
    return Contents.read(conn).foreign_grants(role)


def foreign_default_grants(conn: psycopg.Connection, role: str) -> list[DefaultGrant]:
    """Default privileges in the database ``conn`` is connected to that grant future objects to
    a named role other than their creator and ``role``."""
    return Contents.read(conn).foreign_default_grants(role)


# --------------------------------------------------------------------------- reading a database's contents

# What a new backend costs is mostly planning on an empty catalog cache: one query of five
# UNIONs with joins and NOT EXISTS took 5-6 ms in a new session (PostgreSQL 15), where these
# single-catalog reads take about 2, and the rows are put together here instead. Everything
# created after initdb has an OID of at least FirstNormalObjectId (the counter restarts there
# when it wraps), so the big catalogs are read through their OID index, past initdb's rows:
# initdb's own objects live in pg_catalog and information_schema, which are never reported
# (schema public, OID 2200, is read with every schema). Large objects may be created with any
# OID: their (usually empty) catalog is read whole.
FIRST_NORMAL_OID = 16384
# Catalog OIDs, the same in every PostgreSQL (pg_depend.classid / refclassid).
_PG_CLASS, _PG_TYPE, _PG_PROC, _PG_NAMESPACE = 1259, 1247, 1255, 2615
_NOT_SYSTEM = f"oid >= {FIRST_NORMAL_OID}"
_CONTENT_READS = (
    # relations: oid, schema oid, name, kind, owner, privileges (aclitem[] as text)
    f"SELECT oid::bigint, relnamespace::bigint, relname::text, relkind::text, "
    f"pg_get_userbyid(relowner)::text, relacl::text[] FROM pg_class "
    f"WHERE {_NOT_SYSTEM} AND relkind IN ('r', 'p', 'f', 'v', 'm', 'S', 'c')",
    # types: oid, schema oid, name, type, owner, relation of a composite type, privileges
    f"SELECT oid::bigint, typnamespace::bigint, typname::text, typtype::text, "
    f"pg_get_userbyid(typowner)::text, typrelid::bigint, typacl::text[] FROM pg_type WHERE {_NOT_SYSTEM} "
    "AND typtype IN ('c', 'd', 'e', 'r', 'm')",
    # routines: oid, schema oid, name, owner, argument type oids, printed arguments, privileges
    f"SELECT oid::bigint, pronamespace::bigint, proname::text, pg_get_userbyid(proowner)::text, "
    f"proargtypes::oid[]::bigint[], pg_get_function_identity_arguments(oid), proacl::text[] FROM pg_proc "
    f"WHERE {_NOT_SYSTEM}",
    # schemas, all of them (a handful of rows)
    "SELECT oid::bigint, nspname::text, pg_get_userbyid(nspowner)::text, nspacl::text[] "
    "FROM pg_namespace",
    # what belongs to an extension ('e'), and sequences owned by a column or an identity ('a', 'i')
    "SELECT classid::bigint, objid::bigint, refclassid::bigint, deptype::text FROM pg_depend "
    f"WHERE classid IN ({_PG_CLASS}, {_PG_TYPE}, {_PG_PROC}, {_PG_NAMESPACE}) "
    f"AND objid >= {FIRST_NORMAL_OID} AND deptype IN ('e', 'a', 'i')",
    "SELECT oid::bigint, pg_get_userbyid(lomowner)::text, lomacl::text[] FROM pg_largeobject_metadata",
    # column privileges: relation, column, privileges
    f"SELECT attrelid::bigint, attname::text, attacl::text[] FROM pg_attribute WHERE attrelid >= {FIRST_NORMAL_OID} "
    "AND attacl IS NOT NULL AND attnum > 0 AND NOT attisdropped",
    # default privileges: creator, schema oid (0: every schema), object type, privileges
    "SELECT pg_get_userbyid(defaclrole)::text, defaclnamespace::bigint, defaclobjtype::text, defaclacl::text[] "
    "FROM pg_default_acl",
    "SELECT evtname::text, pg_get_userbyid(evtowner)::text FROM pg_event_trigger ORDER BY 1",
)
# The reads as one text: constant, no parameters, so the simple protocol sends it in one round
# trip and runs it in one implicit transaction (one snapshot).
CONTENT_READS = ";\n".join(_CONTENT_READS)
_LARGE_OBJECT = 0  # (its catalog's oid is not needed: large objects are keyed apart)
_RELATION_KINDS = {"r": "table", "p": "table", "f": "foreign table", "v": "view", "m": "materialized view",
                   "S": "sequence", "c": "type"}
_DOMAIN_OR_TYPE = {"d": "domain"}
_TYPE_NAMES = """SELECT t.oid::bigint, n.nspname::text, t.typname::text
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY(%s)"""


def _user_schema(name: str) -> bool:
    return (name not in ("pg_catalog", "information_schema") and not name.startswith("pg_toast")
            and not name.startswith("pg_temp_"))


# aclitem's letters (PostgreSQL's ACL_ALL_RIGHTS_STR) and the names aclexplode gives them.
_PRIVILEGES = {"a": "INSERT", "r": "SELECT", "w": "UPDATE", "d": "DELETE", "D": "TRUNCATE", "x": "REFERENCES",
               "t": "TRIGGER", "X": "EXECUTE", "U": "USAGE", "C": "CREATE", "c": "CONNECT", "T": "TEMPORARY",
               "s": "SET", "A": "ALTER SYSTEM", "m": "MAINTAIN"}


def _role_at(text: str, i: int) -> tuple[str, int]:
    """The role name that starts at ``i`` of an aclitem's text, and where it ends: as PostgreSQL
    prints it, in double quotes (a quote doubled) unless it is all letters, digits and _."""
    if not text.startswith('"', i):
        j = i
        while j < len(text) and text[j] not in "=/":
            j += 1
        return text[i:j], j
    out, i = [], i + 1
    while True:
        j = text.index('"', i)
        out.append(text[i:j])
        if not text.startswith('"', j + 1):
            return "".join(out), j + 1
        out.append('"')
        i = j + 2


def acl_items(items: list[str] | None) -> list[tuple[str | None, str]]:
    """(grantee, privilege) for each privilege of an aclitem[] read as text[], as aclexplode
    would give them: one per privilege and grantor; None is PUBLIC."""
    out: list[tuple[str | None, str]] = []
    for item in items or ():
        grantee, i = _role_at(item, 0)
        if not item.startswith("=", i):
            raise ValueError(f"not an aclitem: {item!r}")
        letters = item[i + 1:item.index("/", i + 1)]
        out += [(grantee or None, _PRIVILEGES[c]) for c in letters if c != "*"]
    return out


@dataclass
class Contents:
    """The rows of :data:`CONTENT_READS` for one database, put together: the objects a bot's
    database holds (:meth:`inventory`), the privileges others hold on them
    (:meth:`foreign_grants`), default privileges (:meth:`foreign_default_grants`) and its event
    triggers. Objects of an extension are the extension's, and left out; so are indexes,
    TOAST tables and sequences owned by a column (they follow their table)."""

    relations: list[tuple]
    types: list[tuple]
    routines: list[tuple]
    schemas: list[tuple]
    depends: list[tuple]
    large_objects: list[tuple]
    columns: list[tuple]
    default_acls: list[tuple]
    event_triggers: list[tuple[str, str]]
    type_names: dict[int, str] = field(default_factory=dict)  # argument type oid -> "schema.typname"

    @classmethod
    def read(cls, conn: psycopg.Connection) -> "Contents":
        cur = conn.execute(CONTENT_READS)
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
        contents = cls(*results)
        contents.resolve_types(conn)
        return contents

    def resolve_types(self, conn: psycopg.Connection) -> None:
        """The argument types of the routines, by name (a second read, only when there are any)."""
        wanted = sorted({t for row in self.routines for t in row[4] or ()} - set(self.type_names))
        if wanted:
            for oid, schema, name in conn.execute(_TYPE_NAMES, (wanted,)).fetchall():
                self.type_names[oid] = f"{schema}.{name}"

    # -- the pieces ---------------------------------------------------------
    def _schema_names(self) -> dict[int, str]:
        return {row[0]: row[1] for row in self.schemas}

    def _targets(self, *, inventory: bool) -> dict[tuple[int, int], tuple[DbObject, list[str] | None]]:
        """The objects in user schemas that no extension owns, by (catalog oid, object oid), each
        with its privileges. ``inventory``: the objects of :meth:`inventory` (a composite type as
        its pg_class row, no sequence owned by a column); else those that carry privileges (a
        composite type as its pg_type row, every sequence, multirange types)."""
        schemas = self._schema_names()
        members = {(classid, objid) for classid, objid, _ref, deptype in self.depends if deptype == "e"}
        owned = {objid for classid, objid, refclassid, deptype in self.depends
                 if deptype in ("a", "i") and classid == _PG_CLASS and refclassid == _PG_CLASS}
        relkinds = {row[0]: row[3] for row in self.relations}

        def visible(catalog: int, oid: int, nsp: int) -> str | None:
            schema = schemas.get(nsp)
            return schema if schema is not None and _user_schema(schema) and (catalog, oid) not in members else None

        out: dict[tuple[int, int], tuple[DbObject, list[str] | None]] = {}
        for oid, nsp, name, kind, owner, acl in self.relations:
            if (schema := visible(_PG_CLASS, oid, nsp)) is None:
                continue
            if kind == "c" and not inventory:
                continue  # a composite type's privileges are its pg_type row's
            if not (inventory and kind == "S" and oid in owned):
                out[(_PG_CLASS, oid)] = DbObject(_RELATION_KINDS[kind], schema, name, owner, oid), acl
        wanted = ("d", "e", "r") if inventory else ("d", "e", "r", "m")
        for oid, nsp, name, typtype, owner, relid, acl in self.types:
            if (schema := visible(_PG_TYPE, oid, nsp)) is None:
                continue
            if typtype in wanted or (not inventory and typtype == "c" and relkinds.get(relid) == "c"):
                out[(_PG_TYPE, oid)] = DbObject(_DOMAIN_OR_TYPE.get(typtype, "type"), schema, name, owner, oid), acl
        for oid, nsp, name, owner, argtypes, signature, acl in self.routines:
            if (schema := visible(_PG_PROC, oid, nsp)) is None:
                continue
            args = tuple(self.type_names.get(t, "") for t in argtypes or ())
            out[(_PG_PROC, oid)] = DbObject("routine", schema, name, owner, oid, args, signature), acl
        for oid, name, owner, acl in self.schemas:
            if _user_schema(name) and (_PG_NAMESPACE, oid) not in members:
                out[(_PG_NAMESPACE, oid)] = DbObject("schema", None, name, owner, oid), acl
        for oid, owner, acl in self.large_objects:
            out[(_LARGE_OBJECT, oid)] = DbObject("large object", None, str(oid), owner, oid), acl
        return out

    def inventory(self) -> list[DbObject]:
        """Every object of the kinds above, ordered by kind, schema (none last), name."""
        return sorted((o for o, _acl in self._targets(inventory=True).values()),
                      key=lambda o: (o.kind, o.schema is None, o.schema or "", o.name))

    def foreign_grants(self, role: str) -> list[Grant]:
        """Privileges named roles other than the owner and ``role`` hold on the objects (PUBLIC's
        are left out: see above), all of one grantee on one object (or column) in one Grant."""
        targets = self._targets(inventory=False)
        held: dict[tuple[DbObject, str | None, str], list[str]] = {}

        def add(target: DbObject, column: str | None, acl: list[str] | None) -> None:
            for grantee, privilege in acl_items(acl):
                if grantee is not None and grantee != target.owner and _foreign(grantee, role):
                    held.setdefault((target, column, grantee), []).append(privilege)

        for target, acl in targets.values():
            add(target, None, acl)
        for relid, column, acl in self.columns:
            found = targets.get((_PG_CLASS, relid))
            if found is not None and found[0].kind != "sequence":
                add(found[0], column, acl)
        grants = [Grant(target, grantee, ", ".join(sorted(privileges)), column)
                  for (target, column, grantee), privileges in held.items()]
        return sorted(grants, key=lambda g: (g.target.kind, g.target.schema is None, g.target.schema or "",
                                             g.target.name, g.column is None, g.column or "", g.grantee))

    def foreign_default_grants(self, role: str) -> list[DefaultGrant]:
        """Default privileges that grant future objects to a named role other than their creator and ``role``."""
        schemas = self._schema_names()
        held: dict[tuple, list[str]] = {}
        for creator, nsp, objtype, acl in self.default_acls:
            if objtype not in _DEFAULT_KEYWORD:
                continue
            for grantee, privilege in acl_items(acl):
                if grantee is not None and grantee != creator and _foreign(grantee, role):
                    key = (creator, schemas.get(nsp) if nsp else None, objtype, grantee)
                    held.setdefault(key, []).append(privilege)
        return sorted((DefaultGrant(creator, schema, objtype, grantee, ", ".join(sorted(privileges)))
                       for (creator, schema, objtype, grantee), privileges in held.items()),
                      key=lambda d: (d.role, d.schema is None, d.schema or "", d.objtype, d.grantee))
