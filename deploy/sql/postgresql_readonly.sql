-- MyCfia's read-only account on the common DB (PostgreSQL).
-- Run as the owner of the common DB's tables (the account cfi-pipelines refreshes with),
-- in the common DB, after `cfi-pipelines seed` / the first refresh created the tables.
-- Set the password out of band: ALTER ROLE mycfia_readonly PASSWORD '…';
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

ALTER ROLE mycfia_readonly SET default_transaction_read_only = on;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mycfia_readonly;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM mycfia_readonly;
GRANT SELECT ON
  cfi_stocks, cfi_operations, cfi_invoices, cfi_campaigns,
  cfi_tenant_closure, cfi_view_status, cfi_refresh_log
TO mycfia_readonly;
