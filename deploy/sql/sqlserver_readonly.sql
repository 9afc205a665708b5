-- MyCfia's read-only account on the common DB (SQL Server).
-- Run in the common database as a db_owner, after the first refresh created the tables.
-- The refresh copies the live table's grants onto the table it swaps in
-- (sys.database_permissions), so these grants survive every refresh.
IF NOT EXISTS (SELECT 1 FROM sys.server_principals WHERE name = N'mycfia_readonly')
    CREATE LOGIN mycfia_readonly WITH PASSWORD = N'$(MYCFIA_READONLY_PASSWORD)', CHECK_POLICY = ON;
IF NOT EXISTS (SELECT 1 FROM sys.database_principals WHERE name = N'mycfia_readonly')
    CREATE USER mycfia_readonly FOR LOGIN mycfia_readonly;

DENY INSERT, UPDATE, DELETE, ALTER, EXECUTE ON SCHEMA::dbo TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_stocks TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_operations TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_invoices TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_campaigns TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_tenant_closure TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_view_status TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_refresh_log TO mycfia_readonly;
