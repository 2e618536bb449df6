"""What lives inside a bot database: an inventory of its objects and their owners.

Used by ``restore`` (is the database empty? does anything belong to another
role?) and ``doctor`` (objects not owned by the bot, and the ALTER ... OWNER TO
that repairs each). Every statement is composed with psycopg.sql.

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

    def reassign(self, role: str) -> sql.Composed:
        """ALTER ... OWNER TO ``role`` for this object."""
        keyword = sql.SQL(_KEYWORD[self.kind])
        if self.kind == "large object":
            target: sql.Composable = sql.Literal(self.oid)
        elif self.schema is None:
            target = sql.Identifier(self.name)
        else:
            target = sql.Identifier(self.schema, self.name)
        if self.kind == "routine":
            types = [sql.Identifier(*a.split(".", 1)) for a in self.args]
            target = sql.Composed([target, sql.SQL("("), sql.SQL(", ").join(types), sql.SQL(")")])
        return sql.SQL("ALTER {} {} OWNER TO {}").format(keyword, target, sql.Identifier(role))


def inventory(conn: psycopg.Connection) -> list[DbObject]:
    """Every object of the kinds above in the database ``conn`` is connected to."""
    objects = []
    for kind, schema, name, owner, oid, args in conn.execute(_INVENTORY).fetchall():
        # routines carry their argument types, then their printed signature last
        types, signature = (tuple(args[:-1]), args[-1]) if args else ((), "")
        objects.append(DbObject(kind, schema, name, owner, oid, types, signature))
    return objects


def content(objects: list[DbObject]) -> list[DbObject]:
    """The objects that make a database "not empty" (everything but schema public)."""
    return [o for o in objects if not o.is_builtin_public_schema()]


def not_owned_by(objects: list[DbObject], role: str) -> list[DbObject]:
    return [o for o in objects if not o.owned_by(role)]
