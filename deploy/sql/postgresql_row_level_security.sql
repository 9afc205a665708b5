-- Tenant isolation enforced by the common DB itself (PostgreSQL): whatever SQL a
-- reader sends, it sees the rows of its tenant and of its descendant tenants only.
-- Run as a SUPERUSER, connected to the common DB, AFTER postgresql_readonly.sql (it
-- closes TEMPORARY and the large-object write functions to PUBLIC; the checks at the
-- end of this file verify that for the tenant roles too). Idempotent: run it again
-- after an upgrade.
--
-- How a reader is bound to its tenant (README, "Reading as a tenant"):
--   * one LOGIN role per tenant, cfi_tenant_<tenant id>, created and kept in sync by
--     the refresh (cfi_pipelines/tenancy/roles.py) from CFI's tenants, mapped to its
--     tenant in cfi_tenants (role_name -> tenant_id). Its password is derived from
--     CFI_TENANT_SECRET (HMAC-SHA256), which MyCfia holds too; the refresh sets it
--     as a SCRAM verifier, so the password itself never reaches the server.
--   * the policies below read current_user. A tenant session logs in as its role:
--     SET ROLE / RESET ROLE / set_config('role', …) can only reach roles it is a member
--     of (cfi_tenant_reader, mapped to no tenant: zero rows); SET SESSION
--     AUTHORIZATION needs a superuser session; the roles cannot create functions
--     (no CREATE on any schema, no TEMPORARY), so no SECURITY DEFINER code of theirs
--     can change current_user either.
--   * tenant roles: NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION,
--     member of cfi_tenant_reader only, which is a member of nothing.
--
-- The refresher (the owner of the tables, the account of CFI_COMMON_URL) is subject
-- to the policies too (FORCE): it gets its own policy (all rows) and CREATEROLE to
-- create the tenant roles. The refresh copies RLS and policies onto each rebuilt
-- table before it swaps it in (cfi_pipelines/tenancy/policies.py), as it does grants.
-- No format() and no percent sign in this file: psql and drivers both run it.
SET client_min_messages = warning;  -- no NOTICE for each DROP POLICY IF EXISTS

-- The group every tenant role belongs to: it carries the grants, maps to no tenant.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cfi_tenant_reader') THEN
    CREATE ROLE cfi_tenant_reader NOLOGIN;
  END IF;
END
$$;
ALTER ROLE cfi_tenant_reader NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
  NOREPLICATION;

GRANT USAGE ON SCHEMA public TO cfi_tenant_reader;
GRANT SELECT ON
  cfi_stocks, cfi_operations, cfi_invoices, cfi_campaigns,
  cfi_tenant_closure, cfi_tenants, cfi_view_status
TO cfi_tenant_reader;

-- The refresher creates one role per tenant and adds it to the group.
DO $$
DECLARE
  refresher text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                     WHERE oid = 'cfi_stocks'::regclass);
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = refresher) THEN
    EXECUTE 'ALTER ROLE ' || quote_ident(refresher) || ' CREATEROLE';
  END IF;
  EXECUTE 'GRANT cfi_tenant_reader TO ' || quote_ident(refresher) || ' WITH ADMIN OPTION';
  EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database())
    || ' FROM cfi_tenant_reader';
  -- The shared read-only account maps to no tenant: with the policies it reads zero
  -- tenant rows (it keeps cfi_view_status and cfi_refresh_log); the map lets its
  -- reads of the views return nothing instead of failing.
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mycfia_readonly') THEN
    GRANT SELECT ON cfi_tenants TO mycfia_readonly;
  END IF;
END
$$;

-- dblink / postgres_fdw open connections as any role whose password is known:
-- no tenant reaches them (PUBLIC has EXECUTE on dblink's functions by default).
DO $$
DECLARE
  fn regprocedure;
BEGIN
  FOR fn IN
    SELECT p.oid::regprocedure FROM pg_proc p
    JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    JOIN pg_extension e ON e.oid = d.refobjid
    WHERE e.extname IN ('dblink', 'postgres_fdw', 'file_fdw', 'adminpack')
  LOOP
    EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || fn::text || ' FROM PUBLIC';
  END LOOP;
END
$$;

-- Session advisory locks outlive a reader's rolled-back transaction: a tenant could hold
-- one for as long as its pooled connection lives. Nothing of MyCfia's uses them.
DO $$
DECLARE
  fn regprocedure;
  refresher text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                     WHERE oid = 'cfi_stocks'::regclass);
BEGIN
  FOR fn IN
    SELECT p.oid::regprocedure FROM pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace
      AND p.proname IN ('pg_advisory_lock', 'pg_advisory_lock_shared', 'pg_try_advisory_lock',
                        'pg_try_advisory_lock_shared', 'pg_advisory_xact_lock',
                        'pg_advisory_xact_lock_shared', 'pg_try_advisory_xact_lock',
                        'pg_try_advisory_xact_lock_shared')
  LOOP
    EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || fn::text || ' FROM PUBLIC';
    EXECUTE 'GRANT EXECUTE ON FUNCTION ' || fn::text || ' TO ' || quote_ident(refresher);
  END LOOP;
END
$$;

-- Row-level security, forced (the owner is not exempt), on the views, the closure
-- and the role map. The tenant list is computed once per statement (InitPlans:
-- uncorrelated subqueries), then `tenant_id = ANY (…)` is an index condition on the
-- views' indexes that lead with tenant_id.
DO $$
DECLARE
  t text;
  refresher text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                     WHERE oid = 'cfi_stocks'::regclass);
  me text := '(SELECT m.tenant_id FROM cfi_tenants m WHERE m.role_name = (current_user)::text)';
BEGIN
  FOREACH t IN ARRAY ARRAY['cfi_stocks', 'cfi_operations', 'cfi_invoices', 'cfi_campaigns',
                           'cfi_tenant_closure', 'cfi_tenants'] LOOP
    EXECUTE 'ALTER TABLE ' || quote_ident(t) || ' ENABLE ROW LEVEL SECURITY';
    EXECUTE 'ALTER TABLE ' || quote_ident(t) || ' FORCE ROW LEVEL SECURITY';
    EXECUTE 'DROP POLICY IF EXISTS cfi_tenant_rows ON ' || quote_ident(t);
    EXECUTE 'DROP POLICY IF EXISTS cfi_refresher_rows ON ' || quote_ident(t);
    EXECUTE 'CREATE POLICY cfi_refresher_rows ON ' || quote_ident(t)
      || ' AS PERMISSIVE FOR ALL TO ' || quote_ident(refresher)
      || ' USING (true) WITH CHECK (true)';
    IF t = 'cfi_tenants' THEN
      -- a tenant sees its own line (which code and id it is bound to)
      EXECUTE 'CREATE POLICY cfi_tenant_rows ON cfi_tenants AS PERMISSIVE FOR SELECT'
        || ' TO PUBLIC USING (role_name = (current_user)::text)';
    ELSIF t = 'cfi_tenant_closure' THEN
      -- a tenant sees the list of its subtree: (itself, each descendant, depth)
      EXECUTE 'CREATE POLICY cfi_tenant_rows ON cfi_tenant_closure AS PERMISSIVE FOR SELECT'
        || ' TO PUBLIC USING (ancestor = ' || me || ')';
    ELSE
      EXECUTE 'CREATE POLICY cfi_tenant_rows ON ' || quote_ident(t)
        || ' AS PERMISSIVE FOR SELECT TO PUBLIC USING (tenant_id = ANY (ARRAY('
        || 'SELECT c.descendant FROM cfi_tenant_closure c WHERE c.ancestor = ' || me || ')))';
    END IF;
  END LOOP;
END
$$;

-- Checks: fail loudly instead of leaving a hole.
DO $$
DECLARE
  bad text;
BEGIN
  SELECT string_agg(r.rolname, ', ') INTO bad FROM pg_roles r
  WHERE pg_has_role(r.oid, 'cfi_tenant_reader', 'MEMBER') AND left(r.rolname, 11) = 'cfi_tenant_'
    AND (r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb);
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION USING MESSAGE = 'tenant roles that could bypass the policies '
      || '(superuser, BYPASSRLS, CREATEROLE or CREATEDB): ' || bad || ': ALTER ROLE … NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB';
  END IF;
  IF has_database_privilege('cfi_tenant_reader', current_database(), 'TEMPORARY')
     OR has_schema_privilege('cfi_tenant_reader', 'public', 'CREATE') THEN
    RAISE EXCEPTION 'PUBLIC can still create objects in this database: run postgresql_readonly.sql first';
  END IF;
  IF has_function_privilege('cfi_tenant_reader', 'pg_catalog.lo_from_bytea(oid, bytea)', 'EXECUTE') THEN
    RAISE EXCEPTION 'PUBLIC can still write large objects: run postgresql_readonly.sql first';
  END IF;
END
$$;
