-- Tenant isolation enforced by the common DB itself (SQL Server 2016+): whatever SQL a
-- reader sends, it sees the rows of its tenant and of its descendant tenants only.
-- Run in the common database as a db_owner, after the first refresh created the tables
-- and after sqlserver_readonly.sql. Idempotent (sqlcmd: the GO separators are batches).
--
-- The binding: MyCfia's connection, right after it opens and before any SQL an AI tool
-- composed, runs
--     EXEC sp_set_session_context @key = N'tenant_id', @value = <tenant id>, @read_only = 1;
-- @read_only = 1: nothing sent later on that connection can change the tenant (the
-- pool's sp_reset_connection clears it when the connection is handed to the next user).
-- No tenant set: SESSION_CONTEXT is NULL and the predicate lets no row through.
-- The refresher (db_owner: it creates, renames and drops the tables) reads every row.
-- The refresh copies the policy's predicates onto each rebuilt table before it swaps
-- it in, and removes them from the table swapped out
-- (cfi_pipelines/tenancy/policies.py, mssql_swap_statements); doctor checks the policy.
IF SCHEMA_ID(N'cfi_security') IS NULL
    EXEC (N'CREATE SCHEMA cfi_security AUTHORIZATION dbo');
GO
IF EXISTS (SELECT 1 FROM sys.security_policies WHERE name = N'cfi_tenant_policy')
    DROP SECURITY POLICY cfi_security.cfi_tenant_policy;
GO
-- The view rows: the tenant's subtree, one seek on the closure's primary key
-- (ancestor, descendant) per row's tenant, inlined into the reader's plan.
CREATE OR ALTER FUNCTION cfi_security.fn_tenant_rows (@tenant_id int)
RETURNS TABLE
WITH SCHEMABINDING
AS
RETURN
    SELECT 1 AS allowed
    WHERE IS_MEMBER(N'db_owner') = 1
       OR EXISTS (
            SELECT 1 FROM dbo.cfi_tenant_closure AS c
            WHERE c.ancestor = CAST(SESSION_CONTEXT(N'tenant_id') AS int)
              AND c.descendant = @tenant_id);
GO
-- The closure rows: the tenant's own list of its subtree.
CREATE OR ALTER FUNCTION cfi_security.fn_tenant_closure_rows (@ancestor int)
RETURNS TABLE
WITH SCHEMABINDING
AS
RETURN
    SELECT 1 AS allowed
    WHERE IS_MEMBER(N'db_owner') = 1
       OR @ancestor = CAST(SESSION_CONTEXT(N'tenant_id') AS int);
GO
CREATE SECURITY POLICY cfi_security.cfi_tenant_policy
    ADD FILTER PREDICATE cfi_security.fn_tenant_rows(tenant_id) ON dbo.cfi_stocks,
    ADD FILTER PREDICATE cfi_security.fn_tenant_rows(tenant_id) ON dbo.cfi_operations,
    ADD FILTER PREDICATE cfi_security.fn_tenant_rows(tenant_id) ON dbo.cfi_invoices,
    ADD FILTER PREDICATE cfi_security.fn_tenant_rows(tenant_id) ON dbo.cfi_campaigns,
    ADD FILTER PREDICATE cfi_security.fn_tenant_closure_rows(ancestor) ON dbo.cfi_tenant_closure
WITH (STATE = ON, SCHEMABINDING = ON);
GO
-- The readers: no way around the policy (no ALTER on its schema, no policy changes);
-- sqlserver_readonly.sql already denies them every write.
DENY ALTER ON SCHEMA::cfi_security TO mycfia_readonly;
DENY ALTER ANY SECURITY POLICY TO mycfia_readonly;
GRANT SELECT ON dbo.cfi_tenants TO mycfia_readonly;
GO
