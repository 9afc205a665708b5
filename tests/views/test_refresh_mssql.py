"""SQL Server cannot run here: what can be checked without a server is checked
(the DDL, the view queries, the MERGE upsert, the swap and grant statements compile
with the mssql dialect and say what they must)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mssql
from sqlalchemy.schema import CreateIndex, CreateTable

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.incremental import upsert_statement
from cfi_pipelines.views.load import _index_statements, _work_table
from cfi_pipelines.views.spec import VIEWS, get_view
from cfi_pipelines.views.swap import copy_grants_sql, swap_statements

DIALECT = mssql.dialect()


def test_all_tables_compile_for_sql_server():
    for md in (src.metadata, common.metadata):
        for table in md.sorted_tables:
            ddl = str(CreateTable(table).compile(dialect=DIALECT))
            assert ddl.startswith(f"\nCREATE TABLE {table.name}")
    ddl = str(CreateTable(common.cfi_refresh_log).compile(dialect=DIALECT))
    assert "IDENTITY" in ddl  # the autoincrement id
    assert "BIT" in str(CreateTable(common.cfi_invoices).compile(dialect=DIALECT))


def test_view_queries_compile_for_sql_server():
    for spec in VIEWS:
        for incremental in (False, True):
            sql = str(spec.query(incremental=incremental).compile(dialect=DIALECT))
            assert "FROM" in sql
            assert ("updated_at >" in sql) is incremental
    # SQL Server has no boolean expressions in a select list: the flag is a CASE
    assert "CASE WHEN" in str(get_view("invoices").query().compile(dialect=DIALECT))


def test_upsert_is_a_merge_on_the_natural_key():
    spec = get_view("stocks")
    delta = _work_table(spec, "delta", None)
    sql = str(upsert_statement("mssql", spec.table, delta, spec.key))
    assert sql.startswith("MERGE [cfi_stocks] WITH (HOLDLOCK) AS t USING [cfi_stocks__delta] AS s")
    assert "ON t.[product_id] = s.[product_id] AND t.[warehouse_id] = s.[warehouse_id]" in sql
    # a matched row is rewritten only when a value differs (EXCEPT: NULL-safe)
    assert "WHEN MATCHED AND EXISTS (SELECT s.[tenant_id], " in sql
    assert " EXCEPT SELECT t.[tenant_id], " in sql
    assert ") THEN UPDATE SET t.[tenant_id] = s.[tenant_id]" in sql
    assert (
        "t.[product_id] = s.[product_id]," not in sql.split("UPDATE SET")[1]
    )  # keys are not updated
    assert sql.rstrip().endswith(";")  # MERGE must be terminated


def test_swap_renames_with_sp_rename_and_keeps_grants():
    stmts = swap_statements("mssql", "cfi_stocks", "cfi_stocks__staging", "cfi_stocks__old")
    assert stmts == [
        "IF OBJECT_ID(N'cfi_stocks', N'U') IS NOT NULL EXEC sp_rename N'cfi_stocks', N'cfi_stocks__old'",
        "EXEC sp_rename N'cfi_stocks__staging', N'cfi_stocks'",
    ]
    assert "sys.database_permissions" in copy_grants_sql(
        "mssql", "cfi_stocks", "cfi_stocks__staging"
    )


def test_staging_indexes_compile_and_are_named_per_refresh():
    spec = get_view("invoices")
    staging = _work_table(spec, "staging", None)
    a = [
        str(CreateIndex(ix).compile(dialect=DIALECT))
        for ix in _index_statements(spec, staging, "aaaaaa")
    ]
    b = [ix.name for ix in _index_statements(spec, staging, "bbbbbb")]
    assert (
        a[0]
        == "CREATE UNIQUE INDEX ux_cfi_invoices_key_aaaaaa ON cfi_invoices__staging (invoice_id)"
    )
    assert all(name.endswith("_bbbbbb") for name in b)
    assert all(len(name) <= 63 for name in b)  # PostgreSQL's identifier limit


def test_sql_server_engine_uses_fast_executemany():
    from cfi_pipelines.db import create_engine

    engine = create_engine("mssql+pyodbc://u:p@dsn-not-used")
    assert engine.dialect.fast_executemany is True
    assert isinstance(engine, sa.Engine)
