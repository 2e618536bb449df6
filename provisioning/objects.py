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

from dataclasses import dataclass

import psycopg
from psycopg import sql

_USER_SCHEMA = (
    "{n}.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND {n}.nspname NOT LIKE 'pg\\_toast%' AND {n}.nspname NOT LIKE 'pg\\_temp\\_%'"
)
_NOT_IN_EXTENSION = (
    "NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{catalog}'::regclass "
    "AND e.objid = {oid} AND e.deptype = 'e')"
)

_INVENTORY = f"""
SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'f' THEN 'foreign table'
                      WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                      ELSE 'type' END,
       n.nspname, c.relname, pg_get_userbyid(c.relowner), c.oid::bigint, NULL::text[]
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S', 'c') AND {_USER_SCHEMA.format(n="n")}
  AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
  AND NOT (c.relkind = 'S' AND EXISTS (
        SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END,
       n.nspname, t.typname, pg_get_userbyid(t.typowner), t.oid::bigint, NULL
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype IN ('d', 'e', 'r') AND {_USER_SCHEMA.format(n="n")}
  AND {_NOT_IN_EXTENSION.format(catalog="pg_type", oid="t.oid")}
UNION ALL
SELECT 'routine', n.nspname, p.proname, pg_get_userbyid(p.proowner), p.oid::bigint,
       ARRAY(SELECT tn.nspname || '.' || ty.typname
             FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(typ, i)
             JOIN pg_type ty ON ty.oid = a.typ JOIN pg_namespace tn ON tn.oid = ty.typnamespace
             ORDER BY a.i) || pg_get_function_identity_arguments(p.oid)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_proc", oid="p.oid")}
UNION ALL
SELECT 'schema', NULL, n.nspname, pg_get_userbyid(n.nspowner), n.oid::bigint, NULL
FROM pg_namespace n
WHERE {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
UNION ALL
SELECT 'large object', NULL, l.oid::text, pg_get_userbyid(l.lomowner), l.oid::bigint, NULL
FROM pg_largeobject_metadata l
ORDER BY 1, 2, 3
"""

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
    return inventory_of(conn.execute(_INVENTORY).fetchall())


def inventory_of(rows: list[tuple]) -> list[DbObject]:
    """:func:`inventory` from the rows of its query (INVENTORY), read by the caller."""
    objects = []
    for kind, schema, name, owner, oid, args in rows:
        # routines carry their argument types, then their printed signature last
        types, signature = (tuple(args[:-1]), args[-1]) if args else ((), "")
        objects.append(DbObject(kind, schema, name, owner, oid, types, signature))
    return objects


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
_ROUTINE_ARGS = """ARRAY(SELECT tn.nspname || '.' || ty.typname
             FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(typ, i)
             JOIN pg_type ty ON ty.oid = a.typ JOIN pg_namespace tn ON tn.oid = ty.typnamespace
             ORDER BY a.i) || pg_get_function_identity_arguments(p.oid)"""
_RELATION_KIND = ("CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' "
                  "WHEN 'f' THEN 'foreign table' ELSE 'table' END")
_ACLS = f"""
WITH acls(kind, schema, name, owner, oid, args, col, acl) AS (
  SELECT {_RELATION_KIND}, n.nspname, c.relname, c.relowner, c.oid::bigint, NULL::text[], NULL::text, c.relacl
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S') AND c.relacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
  UNION ALL
  SELECT {_RELATION_KIND}, n.nspname, c.relname, c.relowner, c.oid::bigint, NULL, a.attname::text, a.attacl
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v', 'm')
    AND {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
  UNION ALL
  SELECT 'schema', NULL, n.nspname, n.nspowner, n.oid::bigint, NULL, NULL, n.nspacl
  FROM pg_namespace n
  WHERE n.nspacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND {_NOT_IN_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
  UNION ALL
  SELECT 'routine', n.nspname, p.proname, p.proowner, p.oid::bigint, {_ROUTINE_ARGS}, NULL, p.proacl
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE p.proacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND {_NOT_IN_EXTENSION.format(catalog="pg_proc", oid="p.oid")}
  UNION ALL
  SELECT CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END, n.nspname, t.typname, t.typowner, t.oid::bigint,
         NULL, NULL, t.typacl
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
  WHERE t.typacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND (t.typtype IN ('d', 'e', 'r', 'm')
         OR (t.typtype = 'c' AND EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = t.typrelid AND r.relkind = 'c')))
    AND {_NOT_IN_EXTENSION.format(catalog="pg_type", oid="t.oid")}
  UNION ALL
  SELECT 'large object', NULL, l.oid::text, l.lomowner, l.oid::bigint, NULL, NULL, l.lomacl
  FROM pg_largeobject_metadata l WHERE l.lomacl IS NOT NULL
)
SELECT kind, schema, name, pg_get_userbyid(owner), oid, args, col,
       CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END,
       string_agg(x.privilege_type, ', ' ORDER BY x.privilege_type)
FROM acls, aclexplode(acls.acl) x
WHERE x.grantee <> acls.owner
GROUP BY kind, schema, name, owner, oid, args, col, x.grantee
ORDER BY 1, 2, 3, 7, 8
"""
_DEFAULT_ACLS = """
SELECT pg_get_userbyid(d.defaclrole), n.nspname, d.defaclobjtype::text,
       CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END,
       string_agg(x.privilege_type, ', ' ORDER BY x.privilege_type)
FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace, aclexplode(d.defaclacl) x
WHERE x.grantee <> d.defaclrole
GROUP BY d.defaclrole, n.nspname, d.defaclobjtype, x.grantee
ORDER BY 1, 2, 3, 4
"""

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
    return foreign_grants_of(conn.execute(_ACLS).fetchall(), role)


def foreign_grants_of(rows: list[tuple], role: str) -> list[Grant]:
    """:func:`foreign_grants` from the rows of its query (ACLS), read by the caller."""
    found = []
    for kind, schema, name, owner, oid, args, column, grantee, privileges in rows:
        if _foreign(grantee, role):
            types, signature = (tuple(args[:-1]), args[-1]) if args else ((), "")
            found.append(Grant(DbObject(kind, schema, name, owner, oid, types, signature), grantee, privileges, column))
    return found


def foreign_default_grants(conn: psycopg.Connection, role: str) -> list[DefaultGrant]:
    """Default privileges in the database ``conn`` is connected to that grant future objects to
    a named role other than their creator and ``role``."""
    return foreign_default_grants_of(conn.execute(_DEFAULT_ACLS).fetchall(), role)


def foreign_default_grants_of(rows: list[tuple], role: str) -> list[DefaultGrant]:
    """:func:`foreign_default_grants` from the rows of its query (DEFAULT_ACLS), read by the caller."""
    return [DefaultGrant(owner, schema, objtype, grantee, privileges)
            for owner, schema, objtype, grantee, privileges in rows
            if objtype in _DEFAULT_KEYWORD and _foreign(grantee, role)]


# The queries, for a caller that sends several at once (doctor: one round trip).
INVENTORY, ACLS, DEFAULT_ACLS = _INVENTORY, _ACLS, _DEFAULT_ACLS
