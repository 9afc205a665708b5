-- MyCfia's read-only account on the common DB (SQL Server).
-- Run in the common database as a db_owner, after the first refresh created the tables.
-- The refresh copies the live table's grants onto the table it swaps in
-- (sys.database_permissions), so these grants survive every refresh.
--
-- The permissions (SELECT only, DENY on writes) are the barrier; see deploy/README.md,
-- "The read-only account (MyCfia) and its layers".
-- Readers and the swap: sp_rename needs a Sch-M lock, which conflicts with the Sch-S
-- of every reader, and a waiting Sch-M blocks the readers queued behind it. A reader
-- left in an open REPEATABLE READ/SERIALIZABLE/HOLDLOCK transaction keeps its locks
-- and holds the swap (and, behind it, every reader) for as long as it stays open.
-- Keep MyCfia's transactions short; the blocker is
-- sys.dm_exec_requests.blocking_session_id of the waiting swap (program_name and
-- open_transaction_count in sys.dm_exec_sessions).
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
