"""The adversarial suite on SQLite through the reference reader (SQLite has no
row-level security: the reader's connection enforces the rule)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from cfi_pipelines.tenancy import reader_sqlite
from cfi_pipelines.tenancy.binding import Refused, lookup_tenant
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.tenancy.conftest import TENANTS

TABLES = ("cfi_stocks", "cfi_operations", "cfi_invoices", "cfi_campaigns")
TIMEOUT_S = 0.5

READS = [
    "SELECT tenant_id FROM {v}",
    "SELECT tenant_id FROM {v} WHERE tenant_id = 999 OR 1=1",
    "SELECT tenant_id FROM {v} WHERE tenant_id IN (SELECT descendant FROM cfi_tenant_closure)",
    "WITH x AS (SELECT * FROM {v}) SELECT tenant_id FROM x",
    "SELECT tenant_id FROM temp.{v}",
    "SELECT tenant_id FROM {v} UNION ALL SELECT descendant FROM cfi_tenant_closure",
]
REFUSED = [
    "SELECT * FROM main.cfi_stocks",
    "SELECT * FROM main.cfi_invoices WHERE 1=1",
    "WITH x AS (SELECT * FROM main.cfi_stocks) SELECT * FROM x",
    "SELECT * FROM cfi_stocks UNION ALL SELECT * FROM main.cfi_stocks",
    "SELECT * FROM main.cfi_tenant_closure",
    "SELECT * FROM sqlite_master",
    "SELECT * FROM cfi_refresh_log",
    "SELECT 1; DELETE FROM main.cfi_stocks",
    "ATTACH DATABASE 'file:/tmp/x.db' AS x",
    "PRAGMA query_only = 0",
    "SELECT * FROM pragma_table_info('cfi_stocks')",
    "DROP VIEW temp.cfi_stocks",
    "CREATE TEMP VIEW cfi_x AS SELECT * FROM main.cfi_stocks",
    "DELETE FROM cfi_stocks",
    "DELETE FROM main.cfi_stocks",
    "INSERT INTO main.cfi_stocks SELECT * FROM main.cfi_stocks",
    "UPDATE main.cfi_invoices SET paid = 0",
    "CREATE TABLE sneaky (id int)",
    "BEGIN",
    "VACUUM INTO '/tmp/copy.db'",
    "SELECT load_extension('/tmp/x')",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
]


@pytest.fixture
def refreshed(sqlite_dbs):
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common, mode="full")
    return sqlite_dbs


def _subtree(dbs, code) -> set[int]:
    tid, _ = lookup_tenant(dbs.common, code)
    with dbs.common.connect() as c:
        rows = c.exec_driver_sql(
            f"SELECT descendant FROM cfi_tenant_closure WHERE ancestor = {tid}"
        ).all()
    return {r[0] for r in rows}


def _count(dbs, table, subtree) -> int:
    with dbs.common.connect() as c:
        return c.exec_driver_sql(
            f"SELECT count(*) FROM {table} WHERE tenant_id IN ({','.join(map(str, subtree))})"
        ).scalar()


def _conn(dbs, code) -> sqlite3.Connection:
    tid, _ = lookup_tenant(dbs.common, code)
    return reader_sqlite.connect(dbs.common_url, tid)


def test_every_tenant_reads_its_subtree_only(refreshed):
    for code in TENANTS:
        subtree = _subtree(refreshed, code)
        conn = _conn(refreshed, code)
        try:
            for table in TABLES:
                expected = _count(refreshed, table, subtree)
                for template in READS:
                    sql = template.format(v=table)
                    cols, rows, _ = reader_sqlite.run(
                        conn, sql, max_rows=100_000, timeout_s=TIMEOUT_S
                    )
                    assert {r[0] for r in rows} <= subtree, (code, sql)
                    if "UNION" not in sql:
                        assert len(rows) == expected, (code, sql)
            _, rows, _ = reader_sqlite.run(conn, "SELECT code FROM cfi_tenants", max_rows=5,
                                           timeout_s=TIMEOUT_S)  # fmt: skip
            assert rows == [(code,)]
        finally:
            conn.close()


def test_every_attack_is_refused_in_one_line_and_writes_nothing(refreshed):
    with refreshed.common.connect() as c:
        before = [c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in TABLES]
    for code in TENANTS:
        conn = _conn(refreshed, code)
        try:
            for sql in REFUSED:
                t0 = time.monotonic()
                try:
                    reader_sqlite.run(conn, sql, max_rows=10, timeout_s=TIMEOUT_S)
                except Refused as exc:
                    message = str(exc)
                else:
                    raise AssertionError(f"{code}: accepted {sql}")
                assert message and "\n" not in message
                assert time.monotonic() - t0 < 30, sql
                if "RECURSIVE" in sql:
                    assert "time limit" in message
            # still the same tenant after all that
            _, rows, _ = reader_sqlite.run(conn, "SELECT code FROM cfi_tenants", max_rows=5,
                                           timeout_s=TIMEOUT_S)  # fmt: skip
            assert rows == [(code,)]
        finally:
            conn.close()
    with refreshed.common.connect() as c:
        after = [c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in TABLES]
    assert after == before


def test_a_cross_join_is_stopped_or_filtered_and_rows_are_capped(refreshed):
    conn = _conn(refreshed, "CFI")
    try:
        with pytest.raises(Refused, match="time limit"):
            reader_sqlite.run(
                conn,
                "SELECT count(*) FROM cfi_stocks a, cfi_invoices b, cfi_operations c, "
                "cfi_campaigns d",
                max_rows=10,
                timeout_s=TIMEOUT_S,
            )
        cols, rows, truncated = reader_sqlite.run(
            conn, "SELECT * FROM cfi_stocks", max_rows=7, timeout_s=TIMEOUT_S
        )
        assert len(rows) == 7 and truncated and cols[0] == "tenant_id"
    finally:
        conn.close()
