"""The load paths of a refresh (views/load.py) on a real PostgreSQL: the PostgreSQL →
PostgreSQL path copies in the binary format (each column cast to the staging column's
type), frozen into a fresh staging table. What it loads must be exactly what the view's
query returns, awkward values included."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.load import _binary_select, _work_table, source_loader
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import get_view
from tests.fixtures.common import Databases

pytestmark = pytest.mark.postgres
STOCKS = get_view("stocks")
AWKWARD = 'tab\there, new\nline, back\\slash, "quotes", é ü 漢字, \\N'


def _view_rows(engine: sa.Engine, table: sa.Table) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(table).order_by(*table.primary_key))]


def test_binary_copy_loads_exactly_what_the_query_returns(pg_dbs: Databases):
    with pg_dbs.source.begin() as conn:
        pid = conn.scalar(sa.select(sa.func.min(src.products.c.id)))
        conn.execute(
            src.products.update()
            .where(src.products.c.id == pid)
            .values(name=AWKWARD, category="", unit_price=Decimal("0.01"))
        )
        conn.execute(
            src.stock_levels.update()
            .where(src.stock_levels.c.product_id == pid)
            .values(quantity=2**31 - 1, reserved=0, updated_at=datetime(2026, 2, 28, 23, 59, 59))
        )
    result = refresh_view(STOCKS, pg_dbs.source, pg_dbs.common, mode="full")
    with pg_dbs.source.connect() as conn:
        expected = sorted(tuple(r) for r in conn.execute(STOCKS.query(), STOCKS.params()))
    got = sorted(_view_rows(pg_dbs.common, STOCKS.table))
    assert result.rows == result.loaded == len(expected) > 0
    assert got == expected
    mine = [r for r in got if r[STOCKS.columns.index("product_name")] == AWKWARD]
    assert mine and all(r[STOCKS.columns.index("quantity")] == 2**31 - 1 for r in mine)


def test_a_value_too_long_for_the_view_fails_instead_of_being_cut(pg_dbs: Databases):
    """The casts drop lengths: the staging column still refuses a value too long for it."""
    with pg_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products ALTER COLUMN category TYPE varchar(300)")
        conn.execute(src.products.update().values(category="x" * 150))
    with pytest.raises(Exception, match="too long for type character varying"):
        refresh_view(STOCKS, pg_dbs.source, pg_dbs.common, mode="full")


def test_the_binary_select_casts_to_base_types():
    staging = _work_table(STOCKS, "staging", None)
    from sqlalchemy.dialects import postgresql

    sql = _binary_select("SELECT 1", list(staging.columns), postgresql.dialect())
    assert "CAST(q.sku AS varchar) AS sku" in sql
    assert "CAST(q.unit_price AS numeric) AS unit_price" in sql
    assert "CAST(q.quantity AS INTEGER) AS quantity" in sql
    assert "CAST(q.source_updated_at AS TIMESTAMP WITHOUT TIME ZONE)" in sql
    assert sql.endswith("FROM (SELECT 1) AS q")


def test_a_delta_table_filled_twice_keeps_both_loads(pg_dbs: Databases):
    """Without ``freeze`` (the incremental's delta takes several loads) nothing is emptied."""
    invoices = get_view("invoices")
    delta = _work_table(invoices, "delta", None)
    with pg_dbs.common.begin() as conn:
        delta.create(conn)
    with pg_dbs.source.connect() as conn:
        ids = list(conn.scalars(sa.select(src.invoices.c.id).order_by(src.invoices.c.id).limit(4)))
    for part in (ids[:2], ids[2:]):
        chunk = invoices.for_keys(part)
        load = source_loader(chunk, pg_dbs.source, pg_dbs.common, incremental=False,
                             params=chunk.params())  # fmt: skip
        assert load(delta) == 2
    with pg_dbs.common.connect() as conn:
        assert sorted(conn.scalars(sa.select(delta.c.invoice_id))) == ids
