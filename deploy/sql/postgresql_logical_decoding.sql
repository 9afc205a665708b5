-- Exact change capture on CFI's source DB (PostgreSQL): logical decoding through SQL.
-- Run as a SUPERUSER (or the tables' owner plus a role allowed to grant REPLICATION),
-- connected to CFI's source DB. cfi-pipelines then reads the changes of the 12 tables
-- the views follow from a replication slot, O(changes), instead of probing the tables;
-- deletes, updates that do not touch updated_at and late commits included.
--
-- 0. The server setting (postgresql.conf, then a RESTART; not settable from SQL here):
--      wal_level = logical
--      max_replication_slots >= 1 (one more than today)    max_wal_senders >= 1
--    Without it cfi-pipelines uses the counter gate (pg_stat_user_tables) and the
--    updated_at path: `cfi-pipelines doctor` says which, on its source:capture line.
--
-- 1. The reading account (CFI_SOURCE_URL's user; cfi_source_reader here, rename as
--    needed) needs the REPLICATION attribute: it lets it create and read the slot
--    through SQL (pg_logical_slot_peek_binary_changes), nothing else. It still has
--    SELECT only on CFI's tables.
--
-- 2. One publication limited to the followed tables: the slot decodes only their changes.
--    Its name is CFI_CAPTURE_SLOT (default cfi_pipelines); the slot of the same name is
--    created by cfi-pipelines at its first full refresh (or here, see the end).
--
-- 3. REPLICA IDENTITY FULL on the followed tables: an UPDATE or DELETE then carries the
--    whole old row, so that a child that moves to another parent (an invoice line to
--    another invoice) or is deleted names its old parent. Cost: the old row is written
--    to the WAL on UPDATE/DELETE of these tables. Without it, deletes carry the primary
--    key only and cfi-pipelines reconciles the views those tables feed (slower, exact).
--
-- Watch the slot: a slot nobody advances keeps WAL on the server. cfi-pipelines
-- exports cfi_capture_slot_retained_wal_bytes (alert CfiCaptureSlotRetainingWal); if
-- cfi-pipelines is retired, drop the slot: SELECT pg_drop_replication_slot('cfi_pipelines');
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cfi_source_reader') THEN
    CREATE ROLE cfi_source_reader LOGIN;
  END IF;
END
$$;
ALTER ROLE cfi_source_reader REPLICATION;
GRANT SELECT ON tenants, channels, clients, products, warehouses, stock_levels,
  stock_movements, operations, operation_products, invoices, invoice_lines, payments,
  campaigns, campaign_targets, campaign_results TO cfi_source_reader;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'cfi_pipelines') THEN
    CREATE PUBLICATION cfi_pipelines FOR TABLE
      stock_levels, products, warehouses,
      operations, operation_products, campaigns,
      invoices, invoice_lines, payments, clients,
      campaign_targets, campaign_results;
  END IF;
END
$$;

ALTER TABLE stock_levels REPLICA IDENTITY FULL;
ALTER TABLE products REPLICA IDENTITY FULL;
ALTER TABLE warehouses REPLICA IDENTITY FULL;
ALTER TABLE operations REPLICA IDENTITY FULL;
ALTER TABLE operation_products REPLICA IDENTITY FULL;
ALTER TABLE campaigns REPLICA IDENTITY FULL;
ALTER TABLE invoices REPLICA IDENTITY FULL;
ALTER TABLE invoice_lines REPLICA IDENTITY FULL;
ALTER TABLE payments REPLICA IDENTITY FULL;
ALTER TABLE clients REPLICA IDENTITY FULL;
ALTER TABLE campaign_targets REPLICA IDENTITY FULL;
ALTER TABLE campaign_results REPLICA IDENTITY FULL;

-- Checks: fail loudly rather than leave a half-configured source.
DO $$
BEGIN
  IF current_setting('wal_level') <> 'logical' THEN
    RAISE WARNING 'wal_level is %: set wal_level = logical and restart the server',
      current_setting('wal_level');
  END IF;
  IF EXISTS (
    SELECT 1 FROM pg_publication_tables p JOIN pg_class c ON c.relname = p.tablename
    WHERE p.pubname = 'cfi_pipelines' AND c.relreplident <> 'f' AND pg_table_is_visible(c.oid)
  ) THEN
    RAISE EXCEPTION 'a followed table is not REPLICA IDENTITY FULL';
  END IF;
END
$$;
-- Optional: create the slot now (cfi-pipelines creates it otherwise):
-- SELECT pg_create_logical_replication_slot('cfi_pipelines', 'pgoutput');
