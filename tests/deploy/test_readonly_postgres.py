"""The read-only account of deploy/sql/postgresql_readonly.sql, proven on a real
PostgreSQL: it reads the views, cannot write, and keeps its SELECT across refreshes
(the swap replaces the table object)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS, get_view

pytestmark = pytest.mark.postgres

GRANTS = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "postgresql_readonly.sql"


def _as_readonly(pg_dbs, postgres):
    url = sa.engine.make_url(pg_dbs.common_url)
    return psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        dbname=url.database,
        user="mycfia_readonly",
        password="ro-secret",
    )


def test_readonly_account_reads_cannot_write_and_survives_refreshes(pg_dbs, postgres):
    for spec in VIEWS:
        refresh_view(spec, pg_dbs.source, pg_dbs.common)
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("ALTER ROLE mycfia_readonly PASSWORD 'ro-secret'")

    with _as_readonly(pg_dbs, postgres) as ro:
        assert ro.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 9984
        assert ro.execute("SELECT count(*) FROM cfi_tenant_closure").fetchone()[0] > 0
        ro.rollback()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # first line of defence
            ro.execute("DELETE FROM cfi_stocks")
        ro.rollback()
        # even with the read-only default lifted, the grants refuse every write
        ro.execute("SET default_transaction_read_only = off")
        ro.commit()
        for stmt in (
            "DELETE FROM cfi_stocks",
            "UPDATE cfi_invoices SET paid = 0",
            "INSERT INTO cfi_view_status (view) VALUES ('x')",
            "CREATE TABLE sneaky (id int)",
            "DROP TABLE cfi_campaigns",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ro.execute(stmt)
            ro.rollback()

    # full and incremental refreshes rebuild or change the tables: SELECT must stay
    refresh_view(get_view("stocks"), pg_dbs.source, pg_dbs.common, mode="full")
    refresh_view(get_view("invoices"), pg_dbs.source, pg_dbs.common, mode="incremental")
    with _as_readonly(pg_dbs, postgres) as ro:
        assert ro.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 9984
        assert ro.execute("SELECT count(*) FROM cfi_invoices").fetchone()[0] == 1000
        ro.rollback()
        ro.execute("SET default_transaction_read_only = off")
        ro.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ro.execute("DELETE FROM cfi_stocks")
        ro.rollback()
        with pytest.raises(psycopg.errors.Error):  # not granted: MyCfia sees only the read model
            ro.execute("SELECT * FROM cfi_stocks__staging")
