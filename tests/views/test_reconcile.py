"""Deletes within minutes: an incremental refresh removes the view rows whose source row is
gone (exactly those, nothing else), under the row-count guard, atomically for readers."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.reconcile import BUCKET, deleted_keys
from cfi_pipelines.views.refresh import RefreshRefused, refresh_view
from cfi_pipelines.views.spec import VIEWS, get_view
from tests.fixtures.common import Databases
from tests.views.test_refresh import _expected, _norm, _rows

STOCKS, INVOICES, OPERATIONS = get_view("stocks"), get_view("invoices"), get_view("operations")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def both(request) -> Databases:
    return request.getfixturevalue("sqlite_dbs" if request.param == "sqlite" else "pg_dbs")


def _full(dbs: Databases) -> None:
    for spec in VIEWS:
        refresh_view(spec, dbs.source, dbs.common, mode="full")


def _delete_stock_rows(dbs: Databases, ids: list[int]) -> None:
    sl, sm = src.stock_levels, src.stock_movements
    with dbs.source.begin() as conn:
        conn.execute(sm.delete().where(sm.c.stock_level_id.in_(ids)))
        conn.execute(sl.delete().where(sl.c.id.in_(ids)))


def _delete_invoice(dbs: Databases) -> int:
    i, il, p = src.invoices, src.invoice_lines, src.payments
    with dbs.source.begin() as conn:
        inv = conn.scalar(sa.select(i.c.id).order_by(i.c.id.desc()).limit(1))
        conn.execute(p.delete().where(p.c.invoice_id == inv))
        conn.execute(il.delete().where(il.c.invoice_id == inv))
        conn.execute(i.delete().where(i.c.id == inv))
    return inv


def test_deleted_source_rows_leave_the_view_at_the_next_incremental(both: Databases):
    _full(both)
    sl = src.stock_levels
    with both.source.connect() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id)))
    gone = [ids[0], ids[1], ids[len(ids) // 2], ids[-1]]  # several buckets, both ends
    _delete_stock_rows(both, gone)
    inv = _delete_invoice(both)
    before = {spec.name: _rows(both.common, spec.table, list(spec.key)) for spec in VIEWS}

    stocks = refresh_view(STOCKS, both.source, both.common)
    invoices = refresh_view(INVOICES, both.source, both.common)
    assert stocks.mode == invoices.mode == "incremental"
    assert (stocks.deleted, invoices.deleted) == (4, 1)
    for spec in (STOCKS, INVOICES):  # the cache is the source's view, exactly
        assert _norm(_rows(both.common, spec.table, list(spec.key))) == _norm(_expected(both, spec))
    # nothing else touched: every remaining row is the row it was
    after = _rows(both.common, STOCKS.table, list(STOCKS.key))
    assert len(after) == len(before["stocks"]) - 4
    assert set(after) <= set(before["stocks"])
    with both.common.connect() as conn:
        assert (
            conn.scalar(sa.select(sa.func.count()).where(common.cfi_invoices.c.invoice_id == inv))
            == 0
        )
    # and the next incremental finds nothing more to delete
    assert refresh_view(STOCKS, both.source, both.common).deleted == 0


def test_deleted_keys_reads_only_buckets_that_lost_rows(sqlite_dbs: Databases, monkeypatch):
    _full(sqlite_dbs)
    _delete_stock_rows(sqlite_dbs, [1])
    from cfi_pipelines.views import reconcile

    ranges = []
    real = reconcile._keys_in
    monkeypatch.setattr(
        reconcile, "_keys_in", lambda conn, cols, b: ranges.append(b) or real(conn, cols, b)
    )
    keys = deleted_keys(STOCKS, sqlite_dbs.source, sqlite_dbs.common)
    assert len(keys) == 1
    assert len(set(ranges)) == 1  # one suspect bucket: its key range, both sides
    assert keys[0][0] // BUCKET == ranges[0]


def test_a_source_that_lost_most_keys_is_refused_not_mirrored(both: Databases):
    _full(both)
    sl = src.stock_levels
    with both.source.connect() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id)))
    _delete_stock_rows(both, ids[: int(len(ids) * 0.6)])
    live = len(_rows(both.common, STOCKS.table, list(STOCKS.key)))
    with pytest.raises(RefreshRefused, match="not swapped in"):
        refresh_view(STOCKS, both.source, both.common)
    assert len(_rows(both.common, STOCKS.table, list(STOCKS.key))) == live  # untouched
    forced = refresh_view(STOCKS, both.source, both.common, force=True)
    assert forced.deleted == int(len(ids) * 0.6)


def test_readers_see_the_rows_before_or_after_never_half(sqlite_dbs: Databases):
    _full(sqlite_dbs)
    sl = src.stock_levels
    with sqlite_dbs.source.connect() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id)))
    _delete_stock_rows(sqlite_dbs, ids[::10])  # 10 %: many buckets, several DELETE chunks
    before = len(ids)
    seen: set[int] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            with sqlite_dbs.common.connect() as conn:
                seen.add(conn.scalar(sa.select(sa.func.count()).select_from(common.cfi_stocks)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        result = refresh_view(STOCKS, sqlite_dbs.source, sqlite_dbs.common)
    finally:
        done.set()
        reader.join()
    after = before - len(ids[::10])
    assert result.deleted == len(ids[::10])
    assert seen <= {before, after}, sorted(seen)


def test_no_bucket_scan_when_the_cache_has_no_more_rows_than_the_source(
    sqlite_dbs: Databases, monkeypatch
):
    """Updates only: the totals match after the upsert, so the two GROUP BY scans
    (and any key-by-key read) are skipped; the view still follows the source."""
    _full(sqlite_dbs)
    sl = src.stock_levels
    with sqlite_dbs.source.begin() as conn:
        conn.execute(
            sl.update()
            .where(sl.c.id % 50 == 0)
            .values(quantity=sl.c.quantity + 7, updated_at=sa.func.now())
        )
    from cfi_pipelines.views import reconcile

    def no_scan(*_a, **_kw):
        raise AssertionError("bucket counts read although the totals match")

    monkeypatch.setattr(reconcile, "_bucket_counts", no_scan)
    monkeypatch.setattr(reconcile, "_keys_in", no_scan)
    result = refresh_view(STOCKS, sqlite_dbs.source, sqlite_dbs.common)
    assert (result.mode, result.deleted) == ("incremental", 0)
    assert result.updated >= 1
    got = _norm(_rows(sqlite_dbs.common, STOCKS.table, list(STOCKS.key)))
    assert got == _norm(_expected(sqlite_dbs, STOCKS))
    assert deleted_keys(STOCKS, sqlite_dbs.source, sqlite_dbs.common) == []


def test_a_deletion_next_to_an_insertion_is_still_found(both: Databases):
    """One row deleted and one inserted in the same window: the totals compare
    unequal after the upsert (the insertion is loaded), so the buckets find the
    deletion."""
    _full(both)
    sl = src.stock_levels
    with both.source.connect() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id)))
        row = conn.execute(sa.select(sl).where(sl.c.id == ids[0])).one()
        taken = set(conn.execute(sa.select(sl.c.product_id, sl.c.warehouse_id)).tuples())
        warehouses = list(conn.scalars(sa.select(src.warehouses.c.id)))
    new_wh = next(w for w in warehouses if (row.product_id, w) not in taken)
    _delete_stock_rows(both, [ids[len(ids) // 2]])
    with both.source.begin() as conn:
        conn.execute(
            sl.insert().values(
                id=ids[-1] + 1,
                tenant_id=row.tenant_id,
                product_id=row.product_id,
                warehouse_id=new_wh,
                quantity=3,
                reserved=0,
                updated_at=sa.func.now(),
            )
        )
    result = refresh_view(STOCKS, both.source, both.common)
    assert (result.mode, result.inserted, result.deleted) == ("incremental", 1, 1)
    assert _norm(_rows(both.common, STOCKS.table, list(STOCKS.key))) == _norm(
        _expected(both, STOCKS)
    )
