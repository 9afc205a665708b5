"""Apply by key on a real PostgreSQL with logical decoding: every kind of change reaches the
cache exactly through the apply path, and the view equals its defining query afterwards."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views import apply as apply_mod
from cfi_pipelines.views import load as load_mod
from cfi_pipelines.views.capture import capture_for
from cfi_pipelines.views.capture.pg_logical import PgLogicalCapture
from cfi_pipelines.views.positions import read_modes, read_positions, store_position
from cfi_pipelines.views.refresh import refresh_view, utcnow
from cfi_pipelines.views.spec import VIEWS, get_view
from tests.views.test_capture_pg import _free_pair
from tests.views.test_refresh import _expected, _norm, _rows

pytestmark = pytest.mark.postgres


def _exact(dbs, spec) -> None:
    got = _rows(dbs.common, spec.table, list(spec.key))
    assert _norm(got) == _norm(_expected(dbs, spec)), spec.name


def _full(dbs) -> None:
    for spec in VIEWS:
        r = refresh_view(spec, dbs.source, dbs.common, mode="auto")
        assert r.mode == "full" and r.capture_mode == "pg_logical" and r.position


def _apply_all(dbs) -> dict:
    out = {}
    for spec in VIEWS:
        r = refresh_view(spec, dbs.source, dbs.common, mode="auto")
        assert r.mode == "apply", spec.name
        out[spec.name] = r
        _exact(dbs, spec)
    return out


def _delete_stock(conn, stock_id: int) -> None:
    sm = src.stock_movements
    conn.execute(sm.delete().where(sm.c.stock_level_id == stock_id))
    conn.execute(src.stock_levels.delete().where(src.stock_levels.c.id == stock_id))


def _first(conn, table, where=None):
    q = sa.select(table).order_by(table.c.id).limit(1)
    return conn.execute(q.where(where) if where is not None else q).one()


def test_first_refresh_is_full_and_records_a_position(pg_logical_dbs):
    dbs = pg_logical_dbs
    _full(dbs)
    modes = read_modes(dbs.common)
    assert {v for v, (m, _p) in modes.items() if m == "pg_logical"} == {s.name for s in VIEWS}
    # nothing changed: applying is a no-op that reads no row of the view's tables
    results = _apply_all(dbs)
    assert all(r.changes == 0 and r.keys == 0 for r in results.values())


def test_silent_late_and_balanced_writes_reach_the_cache_by_key(pg_logical_dbs):
    dbs = pg_logical_dbs
    _full(dbs)
    sl, p, li, inv = src.stock_levels, src.products, src.invoice_lines, src.invoices
    with dbs.source.begin() as conn:
        s1 = _first(conn, sl)
        # an UPDATE that does not touch updated_at (a fix made in SQL)
        conn.execute(sl.update().where(sl.c.id == s1.id).values(quantity=s1.quantity + 777))
        # a write stamped 30 s in the past (an application server whose clock lags)
        s2 = _first(conn, sl, sl.c.id > s1.id)
        conn.execute(
            sl.update()
            .where(sl.c.id == s2.id)
            .values(reserved=0, updated_at=utcnow() - timedelta(seconds=30))
        )
        # a delete balanced by an insert carrying an older updated_at (restored from archive)
        s3 = _first(conn, sl, sl.c.id > s2.id)
        _delete_stock(conn, s3.id)
        restored = dict(s3._mapping)
        restored.update(id=10_000_000, quantity=5, updated_at=utcnow() - timedelta(days=30))
        conn.execute(sl.insert().values(**restored))
        # a plain delete
        s4 = _first(conn, sl, sl.c.id > s3.id)
        _delete_stock(conn, s4.id)
        # a price change fans out to every stock row of the product
        prod = _first(conn, p)
        conn.execute(p.update().where(p.c.id == prod.id).values(unit_price=prod.unit_price + 1))
        fan_out = conn.scalar(
            sa.select(sa.func.count()).select_from(sl).where(sl.c.product_id == prod.id)
        )
        # a child moving to another parent, and one deleted
        line = _first(conn, li)
        other = conn.scalar(sa.select(inv.c.id).where(inv.c.id != line.invoice_id).limit(1))
        conn.execute(li.update().where(li.c.id == line.id).values(invoice_id=other))
        gone = _first(conn, li, li.c.invoice_id.not_in([line.invoice_id, other]))
        conn.execute(li.delete().where(li.c.id == gone.id))
    results = _apply_all(dbs)
    stocks = results["stocks"]
    assert stocks.changes >= 6
    assert stocks.deleted == 1  # s4 (s3's key came back with the restored row)
    assert stocks.keys >= max(4, fan_out) and fan_out > 1
    invoices = results["invoices"]
    assert invoices.keys >= 3  # the old parent, the new one, the deleted line's invoice
    with dbs.common.connect() as conn:
        q = get_view("stocks").table
        assert (
            conn.scalar(
                sa.select(q.c.quantity).where(
                    q.c.product_id == s1.product_id, q.c.warehouse_id == s1.warehouse_id
                )
            )
            == s1.quantity + 777
        )


def test_counts_of_an_update_only_and_a_delete_only_batch(pg_logical_dbs):
    """What the apply inserted, updated and deleted, when every affected key was cached:
    known from the copied rows without counting the view (the mixed case is above)."""
    dbs = pg_logical_dbs
    spec = get_view("stocks")
    assert refresh_view(spec, dbs.source, dbs.common).mode == "full"
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id).limit(5)))
        conn.execute(sl.update().where(sl.c.id.in_(ids[:3])).values(quantity=sl.c.quantity + 1))
    r = refresh_view(spec, dbs.source, dbs.common)
    assert (r.mode, r.keys, r.updated, r.inserted, r.deleted) == ("apply", 3, 3, 0, 0)
    _exact(dbs, spec)
    with dbs.source.begin() as conn:
        for stock_id in ids[3:]:
            _delete_stock(conn, stock_id)
    r = refresh_view(spec, dbs.source, dbs.common)
    assert (r.mode, r.keys, r.updated, r.inserted, r.deleted) == ("apply", 2, 0, 0, 2)
    assert r.rows == len(_rows(dbs.common, spec.table, list(spec.key)))
    _exact(dbs, spec)


def test_replaying_the_same_changes_gives_the_same_cache(pg_logical_dbs, monkeypatch):
    dbs = pg_logical_dbs
    _full(dbs)
    # a crash after the apply committed, before the slot was advanced: nothing released
    monkeypatch.setattr(PgLogicalCapture, "release", lambda self, applied: None)
    before = read_positions(dbs.common, "pg_logical")
    sl, cr = src.stock_levels, src.campaign_results
    with dbs.source.begin() as conn:
        conn.execute(sl.update().where(sl.c.id % 7 == 0).values(quantity=sl.c.quantity + 3))
        conn.execute(cr.delete().where(cr.c.id % 5 == 0))
    _apply_all(dbs)
    once = {s.name: _rows(dbs.common, s.table, list(s.key)) for s in VIEWS}
    # the same changes come again (here, also from positions rewound to before them)
    for view, position in before.items():
        store_position(dbs.common, view, "pg_logical", position)
    again = _apply_all(dbs)
    assert again["stocks"].changes > 0  # really replayed
    assert {s.name: _rows(dbs.common, s.table, list(s.key)) for s in VIEWS} == once


def test_the_slot_moves_only_to_what_every_view_applied(pg_logical_dbs):
    dbs = pg_logical_dbs
    _full(dbs)
    capture = capture_for(dbs.source)
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        conn.execute(sl.update().where(sl.c.id == 1).values(quantity=1))
    r = refresh_view(get_view("stocks"), dbs.source, dbs.common)
    assert r.mode == "apply" and r.changes == 1
    # the other views have not applied it yet: the change stays in the slot
    gate = capture.gate(min(read_positions(dbs.common).values(), key=capture.sort_key))
    assert gate.changed and gate.tables == {"stock_levels"}
    for spec in VIEWS[1:]:
        refresh_view(spec, dbs.source, dbs.common)
    gate = capture.gate(min(read_positions(dbs.common).values(), key=capture.sort_key))
    assert not gate.changed, gate.note


def test_a_lost_slot_means_a_full_refresh_and_a_new_slot(pg_logical_dbs):
    dbs = pg_logical_dbs
    _full(dbs)
    capture = capture_for(dbs.source)
    with dbs.source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": capture.slot})
        _delete_stock(conn, 2)
    assert capture.gate("0/0").changed  # the gate says so: a missing slot is no quiet source
    r = refresh_view(get_view("stocks"), dbs.source, dbs.common)
    assert r.mode == "full" and r.position
    _exact(dbs, get_view("stocks"))
    # every other view lost its position with the slot: a full refresh each, then applies
    assert set(read_positions(dbs.common, "pg_logical")) == {"stocks"}
    for spec in VIEWS[1:]:
        assert refresh_view(spec, dbs.source, dbs.common).mode == "full"
    _apply_all(dbs)


def test_a_backlog_longer_than_a_batch_is_applied_whole(pg_logical_dbs, monkeypatch):
    """Twelve transactions read three changes at a time, the other views holding the slot
    back: every change reaches the cache (a limit that stopped a read once made the next
    read jump to the end of the log, skipping the rest)."""
    dbs = pg_logical_dbs
    _full(dbs)
    batch_changes = PgLogicalCapture.changes
    monkeypatch.setattr(
        PgLogicalCapture,
        "changes",
        lambda self, since, limit=3: batch_changes(self, since, limit=limit),
    )
    sl = src.stock_levels
    with dbs.source.connect() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id).limit(12)))
    for n, stock_id in enumerate(ids):
        with dbs.source.begin() as conn:
            conn.execute(sl.update().where(sl.c.id == stock_id).values(quantity=90_000 + n))
    r = refresh_view(get_view("stocks"), dbs.source, dbs.common)
    assert (r.mode, r.changes, r.keys, r.updated) == ("apply", 12, 12, 12)
    _exact(dbs, get_view("stocks"))


def _stock_keys(engine) -> list[tuple]:
    sl = src.stock_levels
    with engine.connect() as conn:
        q = sa.select(sl.c.product_id, sl.c.warehouse_id).order_by(
            sl.c.product_id, sl.c.warehouse_id
        )
        return [tuple(r) for r in conn.execute(q)]


def test_the_relay_s_reader_stops_when_the_writer_does(pg_dbs, monkeypatch):
    """A write transaction that fails while the source's rows are still coming (a full
    queue) must not leave the reading thread blocked for ever: leaving the stream stops it."""
    monkeypatch.setattr(load_mod, "COPY_CHUNK_BYTES", 256)
    monkeypatch.setattr(apply_mod, "RELAY_QUEUE_BLOCKS", 1)
    keys = _stock_keys(pg_dbs.source)
    spec = get_view("stocks")
    with apply_mod.RowStream(spec, keys, pg_dbs.source, pg_dbs.common.dialect) as stream:
        first = stream.get()
        assert isinstance(first, bytes) and first.startswith(b"PGCOPY\n")
        reader = stream._thread
        assert reader.is_alive()  # blocked on the full queue
    assert not reader.is_alive()


def test_a_source_that_fails_during_the_relay_fails_the_write_not_the_thread(pg_dbs):
    """The reader's error is raised in the writer (the apply's transaction rolls back)."""
    spec = get_view("stocks")
    gone = create_engine("postgresql+psycopg://nobody:x@127.0.0.1:9/none")
    with (
        pytest.raises(sa.exc.OperationalError),
        apply_mod.RowStream(spec, [(1, 1)], gone, pg_dbs.common.dialect) as stream,
    ):
        while True:
            stream.get()


def test_the_relay_copies_every_key_batch(pg_logical_dbs, monkeypatch):
    """More keys than one keyed query carries (7 here): one COPY per query; updates,
    deletes and an insert spread over the queries all land, each counted once."""
    dbs = pg_logical_dbs
    _full(dbs)
    monkeypatch.setattr(
        apply_mod, "keys_per_query", lambda dialect: 7 if dialect == "postgresql" else 400
    )
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        ids = list(conn.scalars(sa.select(sl.c.id).order_by(sl.c.id).limit(30)))
        conn.execute(sl.update().where(sl.c.id.in_(ids[:24])).values(quantity=sl.c.quantity + 5))
        for stock_id in ids[24:]:
            _delete_stock(conn, stock_id)
        pid, wid = _free_pair(conn)
        row = conn.execute(sa.select(sl).where(sl.c.id == ids[0])).one()._mapping
        conn.execute(
            sl.insert().values({**row, "id": 9_000_001, "product_id": pid, "warehouse_id": wid})
        )
    r = refresh_view(get_view("stocks"), dbs.source, dbs.common)
    assert (r.mode, r.keys, r.loaded) == ("apply", 31, 25)
    assert (r.updated, r.deleted, r.inserted) == (24, 6, 1)
    _exact(dbs, get_view("stocks"))
