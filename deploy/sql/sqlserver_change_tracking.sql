-- Change Tracking on CFI's source database (SQL Server), for cfi-pipelines' change capture.
-- Run once in CFI's production database as a db_owner (sqlcmd -v READER=<account> -i …).
--
-- What it gives: every committed insert, update and delete of the tables the views read,
-- by primary key, with a database-wide version number. cfi-pipelines asks
-- CHANGE_TRACKING_CURRENT_VERSION() every sensor tick (one query, whatever the size of
-- the tables) and, when it moved, CHANGETABLE(CHANGES <table>, @version) for the changed
-- keys (O(changes)); nothing of ours is created in this database.
-- Cost on CFI's side: one row in an internal side table per changed row (key + version,
-- written in the same transaction as the change), removed by the auto cleanup after the
-- retention. No trigger, no log reader, no change to the tables themselves.
-- Retention: 2 days. If cfi-pipelines is stopped for longer, its stored version falls
-- below CHANGE_TRACKING_MIN_VALID_VERSION and it does a full refresh on its own (logged).
-- Every followed table needs a PRIMARY KEY (all of them have one).

ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON);
GO
-- The changed keys, the current version and the rows are read in one SNAPSHOT transaction,
-- so that they are of one instant (no row version kept unless a snapshot reads it).
ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON;
GO

-- The tables the four views read (stocks, operations, invoices, campaigns) and the tenant
-- hierarchy. Re-running is harmless: each is enabled only once.
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.stock_levels'))
    ALTER TABLE dbo.stock_levels ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.products'))
    ALTER TABLE dbo.products ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.warehouses'))
    ALTER TABLE dbo.warehouses ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.operations'))
    ALTER TABLE dbo.operations ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.operation_products'))
    ALTER TABLE dbo.operation_products ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.campaigns'))
    ALTER TABLE dbo.campaigns ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.campaign_targets'))
    ALTER TABLE dbo.campaign_targets ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.campaign_results'))
    ALTER TABLE dbo.campaign_results ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.channels'))
    ALTER TABLE dbo.channels ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.invoices'))
    ALTER TABLE dbo.invoices ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.invoice_lines'))
    ALTER TABLE dbo.invoice_lines ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.payments'))
    ALTER TABLE dbo.payments ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.clients'))
    ALTER TABLE dbo.clients ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(N'dbo.tenants'))
    ALTER TABLE dbo.tenants ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF);
GO

-- The reading account (CFI_SOURCE_URL's user) reads the changes of each table.
-- It already has SELECT on them (VIEW CHANGE TRACKING needs SELECT on the primary key too).
GRANT VIEW CHANGE TRACKING ON dbo.stock_levels TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.products TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.warehouses TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.operations TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.operation_products TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.campaigns TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.campaign_targets TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.campaign_results TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.channels TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.invoices TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.invoice_lines TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.payments TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.clients TO [$(READER)];
GRANT VIEW CHANGE TRACKING ON dbo.tenants TO [$(READER)];
GO

-- Check (what `cfi-pipelines doctor` also checks, as the reading account):
--   SELECT CHANGE_TRACKING_CURRENT_VERSION();                        -- not NULL
--   SELECT OBJECT_NAME(object_id) FROM sys.change_tracking_tables;   -- the 14 tables
--   SELECT snapshot_isolation_state_desc FROM sys.databases WHERE database_id = DB_ID();  -- ON
