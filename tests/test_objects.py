"""What objects.Contents makes of a bot database, against a reference: the catalog queries it
replaced (one query per question, joined and filtered in SQL, which a new backend spent 5-6 ms
planning). On a real database holding every kind of object the inventory covers, owned by the
bot, by another role and by the admin, with privileges granted every way doctor reports, in
an extension or not: the inventory, the foreign grants and the default privileges must be the
same, object for object, and the doctor's repairs must be written from them alike.
"""

from __future__ import annotations

import pytest
from psycopg import sql

from provisioning import objects

from .conftest import RUN_ID

# ---- the reference: the SQL these lists came from before (kept here only as the test's oracle)
_USER_SCHEMA = ("{n}.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND {n}.nspname NOT LIKE 'pg\\_toast%' AND {n}.nspname NOT LIKE 'pg\\_temp\\_%'")
_NOT_IN_EXTENSION = ("NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{catalog}'::regclass "
                     "AND e.objid = {oid} AND e.deptype = 'e')")
_ARGS = """ARRAY(SELECT tn.nspname || '.' || ty.typname
             FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(typ, i)
             JOIN pg_type ty ON ty.oid = a.typ JOIN pg_namespace tn ON tn.oid = ty.typnamespace
             ORDER BY a.i) || pg_get_function_identity_arguments(p.oid)"""
REFERENCE_INVENTORY = f"""
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
SELECT 'routine', n.nspname, p.proname, pg_get_userbyid(p.proowner), p.oid::bigint, {_ARGS}
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_proc", oid="p.oid")}
UNION ALL
SELECT 'schema', NULL, n.nspname, pg_get_userbyid(n.nspowner), n.oid::bigint, NULL
FROM pg_namespace n
WHERE {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
UNION ALL
SELECT 'large object', NULL, l.oid::text, pg_get_userbyid(l.lomowner), l.oid::bigint, NULL
FROM pg_largeobject_metadata l
"""
_KIND = ("CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' "
         "WHEN 'f' THEN 'foreign table' ELSE 'table' END")
REFERENCE_ACLS = f"""
WITH acls(kind, schema, name, owner, oid, args, col, acl) AS (
  SELECT {_KIND}, n.nspname, c.relname, c.relowner, c.oid::bigint, NULL::text[], NULL::text, c.relacl
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S') AND c.relacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
  UNION ALL
  SELECT {_KIND}, n.nspname, c.relname, c.relowner, c.oid::bigint, NULL, a.attname::text, a.attacl
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v', 'm')
    AND {_USER_SCHEMA.format(n="n")} AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
  UNION ALL
  SELECT 'schema', NULL, n.nspname, n.nspowner, n.oid::bigint, NULL, NULL, n.nspacl
  FROM pg_namespace n
  WHERE n.nspacl IS NOT NULL AND {_USER_SCHEMA.format(n="n")}
    AND {_NOT_IN_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
  UNION ALL
  SELECT 'routine', n.nspname, p.proname, p.proowner, p.oid::bigint, {_ARGS}, NULL, p.proacl
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
"""
REFERENCE_DEFAULT_ACLS = """
SELECT pg_get_userbyid(d.defaclrole), n.nspname, d.defaclobjtype::text,
       CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END,
       string_agg(x.privilege_type, ', ' ORDER BY x.privilege_type)
FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace, aclexplode(d.defaclacl) x
WHERE x.grantee <> d.defaclrole
GROUP BY d.defaclrole, n.nspname, d.defaclobjtype, x.grantee
"""


def _object(kind, schema, name, owner, oid, args) -> objects.DbObject:
    types, signature = (tuple(args[:-1]), args[-1]) if args else ((), "")
    return objects.DbObject(kind, schema, name, owner, oid, types, signature)


def reference(conn, role: str):
    inventory = [_object(*row) for row in conn.execute(REFERENCE_INVENTORY).fetchall()]
    grants = [objects.Grant(_object(*row[:6]), grantee, privileges, column)
              for *row, column, grantee, privileges in conn.execute(REFERENCE_ACLS).fetchall()
              if grantee is not None and grantee not in (role, "pg_database_owner")]
    defaults = [objects.DefaultGrant(*row) for row in conn.execute(REFERENCE_DEFAULT_ACLS).fetchall()
                if row[2] in ("r", "S", "f", "T", "n") and row[3] is not None and row[3] not in (role, "pg_database_owner")]
    return inventory, grants, defaults


# ---- a database with one of everything
ROLES = ("owner", "intruder", "other", "odd")


@pytest.fixture(scope="module")
def populated(pg):
    names = {r: f"t{RUN_ID}_objects_{r}" for r in ROLES}
    names["odd"] = f't{RUN_ID} Objects "odd"=/x,{{y}}'  # a name PostgreSQL prints in quotes in an aclitem
    database = f"t{RUN_ID}_objects_db"
    with pg.connect() as admin:
        for r in names.values():
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(r)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                   sql.Identifier(names["owner"])))
    try:
        with pg.connect(database) as conn:
            _populate(conn, names)
        yield pg, database, names
    finally:
        with pg.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            for r in names.values():
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(r)))


def _populate(conn, names: dict[str, str]) -> None:
    owner, intruder, other, odd = (sql.Identifier(names[r]) for r in ROLES)
    run = lambda text, *ids: conn.execute(sql.SQL(text).format(*ids))  # noqa: E731
    extension = conn.execute("SELECT name FROM pg_available_extensions WHERE name IN ('citext', 'hstore', 'cube', "
                             "'seg', 'isn') ORDER BY name LIMIT 1").fetchone()
    if extension:  # its objects (types, functions, operators) belong to it, never reported
        run("CREATE EXTENSION {}", sql.Identifier(extension[0]))
    run("GRANT {} TO current_user", owner)
    run("GRANT {} TO current_user", intruder)
    run("SET ROLE {}", owner)
    run("CREATE SCHEMA app")
    run("CREATE TABLE app.plain (id serial PRIMARY KEY, ident bigint GENERATED ALWAYS AS IDENTITY, note text)")
    run("CREATE TABLE app.parted (k int, v text) PARTITION BY RANGE (k)")
    run("CREATE TABLE app.parted_1 PARTITION OF app.parted FOR VALUES FROM (0) TO (10)")
    run("CREATE VIEW app.v AS SELECT id, note FROM app.plain")
    run("CREATE MATERIALIZED VIEW app.mv AS SELECT id FROM app.plain")
    run("CREATE SEQUENCE app.free_seq")
    run("CREATE TYPE app.pair AS (a int, b text)")
    run("CREATE TYPE app.mood AS ENUM ('ok', 'sad')")
    run("CREATE TYPE app.span AS RANGE (subtype = int4)")  # and its multirange (PostgreSQL 14+)
    run("CREATE DOMAIN app.positive AS int CHECK (VALUE > 0)")
    run("CREATE FUNCTION app.touch(app.pair, integer, text[]) RETURNS int LANGUAGE sql AS 'SELECT 1'")
    run("CREATE FUNCTION public.noargs() RETURNS int LANGUAGE sql AS 'SELECT 2'")
    run("CREATE PROCEDURE app.proc(app.mood) LANGUAGE sql AS 'SELECT 1'")
    run("CREATE AGGREGATE app.total(int) (sfunc = int4pl, stype = int)")
    run("CREATE TABLE public.messages (id bigserial PRIMARY KEY, body text)")
    lo = conn.execute("SELECT lo_create(0)").fetchone()[0]
    # what others are given on the bot's objects, every way doctor reports
    run("GRANT SELECT, INSERT ON app.plain TO {} WITH GRANT OPTION", intruder)
    run("GRANT UPDATE (note) ON app.plain TO {}", intruder)
    run("GRANT SELECT ON app.v, app.mv TO {}", other)
    run("GRANT USAGE ON SEQUENCE app.free_seq, app.plain_id_seq TO {}", intruder)
    run("GRANT SELECT ON public.messages TO PUBLIC")
    run("GRANT USAGE, CREATE ON SCHEMA app TO {}", intruder)
    run("GRANT EXECUTE ON FUNCTION app.touch(app.pair, integer, text[]) TO {}", intruder)
    run("REVOKE EXECUTE ON FUNCTION public.noargs() FROM PUBLIC")
    run("GRANT USAGE ON TYPE app.pair, app.mood, app.span TO {}", other)
    run("GRANT USAGE ON DOMAIN app.positive TO {}", other)
    run("GRANT SELECT ON LARGE OBJECT {} TO {}", sql.Literal(lo), intruder)
    run("ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {}", intruder)
    run("ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO {}", other)
    run("ALTER DEFAULT PRIVILEGES GRANT USAGE ON TYPES TO {}", intruder)
    run("GRANT DELETE, TRUNCATE ON app.plain TO {}", odd)
    run("ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON SEQUENCES TO {}", odd)
    # what the intruder passes on, and what it and the admin own there
    run("SET ROLE {}", intruder)
    run("GRANT SELECT ON app.plain TO {}", other)
    run("CREATE TABLE app.intruders (id int)")
    run("ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT ALL ON SEQUENCES TO {}", owner)
    run("RESET ROLE")
    run("CREATE SCHEMA admins")
    run("CREATE TABLE admins.kept (id serial)")
    run("CREATE FUNCTION admins.f(int, app.mood) RETURNS int LANGUAGE sql AS 'SELECT 1'")
    run("GRANT SELECT ON admins.kept TO {}", owner)
    run("CREATE TEMP TABLE not_reported (id int)")  # pg_temp_N: never reported


def by_key(items):
    return sorted(items, key=str)


def test_contents_match_the_reference_queries(populated):
    pg, database, names = populated
    with pg.connect(database) as conn:
        conn.execute("CREATE TEMP TABLE tmp_too (id int)")
        want_inventory, want_grants, want_defaults = reference(conn, names["owner"])
        got = objects.Contents.read(conn)
    assert by_key(got.inventory()) == by_key(want_inventory)
    assert by_key(got.foreign_grants(names["owner"])) == by_key(want_grants)
    assert by_key(got.foreign_default_grants(names["owner"])) == by_key(want_defaults)
    # the fixture did make something of each kind and each way (the comparison is not vacuous)
    kinds = {o.kind for o in got.inventory()}
    assert kinds >= {"table", "view", "materialized view", "sequence", "type", "domain", "routine", "schema",
                     "large object"}, kinds
    grants = {str(g) for g in got.foreign_grants(names["owner"])}
    intruder, other = names["intruder"], names["other"]
    assert f"{intruder} has INSERT, SELECT on table app.plain" in grants, grants
    assert f"{intruder} has UPDATE on table app.plain column note" in grants
    assert f"{other} has SELECT on table app.plain" in grants
    assert f"{intruder} has USAGE on sequence app.plain_id_seq" in grants
    assert f"{intruder} has CREATE, USAGE on schema app" in grants
    assert f"{intruder} has EXECUTE on routine app.touch(app.pair, integer, text[])" in grants
    assert f"{other} has USAGE on type app.pair" in grants and f"{other} has USAGE on domain app.positive" in grants
    assert any(g.startswith(f"{intruder} has SELECT on large object ") for g in grants)
    assert f"{names['odd']} has DELETE, TRUNCATE on table app.plain" in grants
    assert f"{names['owner']} has SELECT on table admins.kept" not in grants  # the bot's own rights are no finding
    assert not any("PUBLIC" in g or "messages" in g for g in grants)
    inventory = {str(o): o for o in got.inventory()}
    assert "sequence app.plain_id_seq" not in inventory and "sequence app.free_seq" in inventory
    assert inventory["routine admins.f(integer, app.mood)"].args == ("pg_catalog.int4", "app.mood")
    assert not any(o.schema and o.schema.startswith("pg_temp") for o in inventory.values())
    defaults = {str(d) for d in got.foreign_default_grants(names["owner"])}
    # the owner's four; the intruder's grants to the owner itself, which is no finding
    assert len(defaults) == 4 and not any(d.startswith(f"default privileges of {intruder}") for d in defaults), defaults


def test_aclitems_are_read_as_postgresql_prints_them():
    assert objects.acl_items(["=r/owner", "bob=arw*/owner", '"a ""b""=/c"=X/"x y"', "Mixed_1=U*C/owner"]) == [
        (None, "SELECT"), ("bob", "INSERT"), ("bob", "SELECT"), ("bob", "UPDATE"), ('a "b"=/c', "EXECUTE"),
        ("Mixed_1", "USAGE"), ("Mixed_1", "CREATE")]
    assert objects.acl_items(None) == []
    with pytest.raises(ValueError):
        objects.acl_items(["bob"])
