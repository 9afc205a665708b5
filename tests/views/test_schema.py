"""views/schema.py: what the views read against CFI's DB, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from cfi_pipelines.views.schema import Difference, columns_read, compare, describe
from tests.fixtures.common import Databases


def test_what_the_views_read_comes_from_their_queries():
    read = columns_read()
    assert read["products"]["name"] == ("stocks",)
    assert "updated_at" in read["stock_levels"] or "updated_at" in read["products"]
    assert all(views for cols in read.values() for views in cols.values())


def test_a_seeded_source_matches(sqlite_dbs: Databases):
    with sqlite_dbs.source.connect() as conn:
        assert compare(conn) == []


def test_a_renamed_column_is_named_on_sqlite(sqlite_dbs: Databases):
    with sqlite_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")
    with sqlite_dbs.source.connect() as conn:
        found = compare(conn)
    assert found == [Difference("products", "name", ("stocks",))]
    assert describe(found) == "CFI's schema changed: products.name is missing (read by stocks)"


@pytest.mark.postgres
def test_a_renamed_column_and_a_renamed_table_are_named_on_postgres(pg_dbs: Databases):
    with pg_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")
    with pg_dbs.source.connect() as conn:
        assert [str(d) for d in compare(conn)] == ["products.name is missing (read by stocks)"]
    table = next(iter(columns_read()))
    with pg_dbs.source.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME TO gone_{table}')
    with pg_dbs.source.connect() as conn:
        missing = [d for d in compare(conn) if d.column is None]
    assert [d.table for d in missing] == [table]
    assert str(missing[0]).startswith(f"table {table} is missing (read by ")
