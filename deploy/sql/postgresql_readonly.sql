-- MyCfia's read-only account on the common DB (PostgreSQL).
-- Run as a SUPERUSER, connected to the common DB, after `cfi-pipelines seed` / the
-- first refresh created the tables. A superuser is needed because the large-object
-- functions belong to the bootstrap superuser: REVOKE by anyone else only WARNs and
-- changes nothing (the checks at the end turn that into an error). On a managed
-- service without a real superuser, run the table grants as the refresher and have
-- the provider's admin role run the REVOKEs, and keep the checks.
-- Set the password out of band: ALTER ROLE mycfia_readonly PASSWORD '…';
--
-- The layers (see deploy/README.md, "The read-only account"):
--   1. PRIVILEGES are the barrier. The account holds SELECT on the read model and
--      nothing else: no table privilege beyond SELECT, no CREATE on any schema, no
--      TEMPORARY on the database, no EXECUTE on the large-object write functions.
--      Every write path is closed by a privilege, so it stays closed whatever the
--      session settings are.
--   2. default_transaction_read_only = on is a SECOND layer only, a safety net
--      against mistakes: the account can lift it for a session (SET …) and even for
--      good (ALTER ROLE mycfia_readonly SET default_transaction_read_only = off —
--      every role may set its own session defaults, and no grant can forbid that
--      in PostgreSQL 15). Nothing here relies on it.
--   3. idle_in_transaction_session_timeout bounds how long a forgotten open
--      transaction keeps its ACCESS SHARE lock (which blocks the refresh's swap).
--      The account can lift this one too, so the refresh protects itself anyway:
--      short lock_timeout, a few retries, then a clear error naming the holder
--      (cfi_pipelines/views/refresh.py, SwapLockTimeout).
--
-- The refresh swaps a freshly built table in place of the live one; it copies the
-- live table's grants onto the new table in the same transaction, so these grants
-- survive every refresh.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mycfia_readonly') THEN
    CREATE ROLE mycfia_readonly LOGIN;
  END IF;
END
$$;
-- A role made by hand (or by an older script) without LOGIN cannot serve MyCfia.
ALTER ROLE mycfia_readonly LOGIN;

-- Layer 2 (a safety net only, see above) and layer 3.
ALTER ROLE mycfia_readonly SET default_transaction_read_only = on;
-- A reader that stays in its transaction is disconnected after 30 s: its locks go,
-- and the next refresh swaps in.
ALTER ROLE mycfia_readonly SET idle_in_transaction_session_timeout = '30s';

-- Layer 1: schemas and tables.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mycfia_readonly;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM mycfia_readonly;
GRANT SELECT ON
  cfi_stocks, cfi_operations, cfi_invoices, cfi_campaigns,
  cfi_tenant_closure, cfi_view_status, cfi_refresh_log
TO mycfia_readonly;

-- Layer 1: temporary objects. PUBLIC has TEMPORARY on every database by default:
-- temp tables (CREATE TEMP TABLE t AS SELECT * FROM cfi_stocks copies the read
-- model into server storage) and functions in pg_temp. Only the refresher (the owner
-- of the tables) keeps it (it does not use temp tables today; granted so a future
-- one keeps working).
DO $$
BEGIN
  EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database()) || ' FROM PUBLIC';
  EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database())
    || ' FROM mycfia_readonly';
  EXECUTE 'GRANT TEMPORARY ON DATABASE ' || quote_ident(current_database()) || ' TO '
    || quote_ident((SELECT pg_get_userbyid(relowner) FROM pg_class
                    WHERE oid = 'cfi_stocks'::regclass));
END
$$;

-- Layer 1: large objects. They are not tables: lo_create/lo_from_bytea create and
-- fill them even in a read-only transaction, so PUBLIC's EXECUTE on the write
-- functions is revoked in this database (function privileges are per database).
-- lo_open is revoked too: MyCfia reads no large object, and lo_open(…, INV_WRITE)
-- + lowrite is a write path. The server-side lo_import/lo_export are superuser-only
-- by default; revoked again so that stays true. The refresher (owner of the
-- tables) gets the others back, should it ever need them.
DO $$
DECLARE
  fn text;
  -- the refresher: the owner of the read model's tables
  refresher text := (SELECT pg_get_userbyid(relowner) FROM pg_class
                     WHERE oid = 'cfi_stocks'::regclass);
BEGIN
  FOREACH fn IN ARRAY ARRAY[
    'lo_create(oid)', 'lo_creat(integer)', 'lo_from_bytea(oid, bytea)',
    'lo_import(text)', 'lo_import(text, oid)', 'lo_export(oid, text)',
    'lo_open(oid, integer)', 'lowrite(integer, bytea)', 'lo_put(oid, bigint, bytea)',
    'lo_truncate(integer, integer)', 'lo_truncate64(integer, bigint)', 'lo_unlink(oid)'
  ] LOOP
    EXECUTE 'REVOKE EXECUTE ON FUNCTION pg_catalog.' || fn || ' FROM PUBLIC';
    EXECUTE 'REVOKE EXECUTE ON FUNCTION pg_catalog.' || fn || ' FROM mycfia_readonly';
    IF fn NOT IN ('lo_import(text)', 'lo_import(text, oid)', 'lo_export(oid, text)') THEN
      EXECUTE 'GRANT EXECUTE ON FUNCTION pg_catalog.' || fn || ' TO ' || quote_ident(refresher);
    END IF;
    -- A REVOKE without the right only warns: fail loudly instead.
    -- (No format() and no percent sign in this file: psql and drivers both run it.)
    IF has_function_privilege('mycfia_readonly', 'pg_catalog.' || fn, 'EXECUTE') THEN
      RAISE EXCEPTION USING MESSAGE = 'mycfia_readonly can still execute ' || fn
        || ': run this script as a superuser';
    END IF;
  END LOOP;
  IF has_database_privilege('mycfia_readonly', current_database(), 'TEMPORARY') THEN
    RAISE EXCEPTION 'mycfia_readonly can still create temporary objects: run this script as a superuser or the database owner';
  END IF;
END
$$;
