"""The PostgreSQL captures against real servers: logical decoding (pgoutput parsed from
``pg_logical_slot_peek_binary_changes``) on a ``wal_level=logical`` server, and the counter
gate on the session's other server, which runs without it."""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.capture import CaptureLost, capture_for, choose_capture
from cfi_pipelines.views.capture.pg_counters import PgCounterCapture
from cfi_pipelines.views.capture.pg_logical import PgLogicalCapture

pytestmark = pytest.mark.postgres


@pytest.fixture
def logical(pg_logical_dbs) -> PgLogicalCapture:
    capture = capture_for(pg_logical_dbs.source)
    assert isinstance(capture, PgLogicalCapture), capture.describe()
    capture.ensure()
    return capture


def _free_pair(conn) -> tuple[int, int]:
    """A (product, warehouse) pair with no stock row yet."""
    p, w, sl = src.products, src.warehouses, src.stock_levels
    taken = sa.exists().where(sl.c.product_id == p.c.id, sl.c.warehouse_id == w.c.id)
    pairs = sa.select(p.c.id, w.c.id).select_from(p.join(w, sa.true()))
    return conn.execute(pairs.where(~taken).limit(1)).one()


def test_pgoutput_row_images_from_the_real_server(pg_logical_dbs, logical):
    dbs = pg_logical_dbs
    start = logical.position()
    sl, li = src.stock_levels, src.invoice_lines
    with dbs.source.begin() as conn:
        s = conn.execute(sa.select(sl).order_by(sl.c.id).limit(1)).one()
        conn.execute(sl.update().where(sl.c.id == s.id).values(quantity=s.quantity + 1))
        line = conn.execute(sa.select(li).order_by(li.c.id).limit(1)).one()
        conn.execute(li.update().where(li.c.id == line.id).values(invoice_id=line.invoice_id + 1))
    with dbs.source.begin() as conn:
        pid, wid = _free_pair(conn)
        new = {**s._mapping, "id": 9_999_999, "product_id": pid, "warehouse_id": wid}
        new["updated_at"] = utcnow() - timedelta(days=1)
        conn.execute(sl.insert().values(**new))
        conn.execute(sl.delete().where(sl.c.id == 9_999_999))
    batch = logical.changes(start)
    assert batch.transactions == 2
    ops = [(c.table, c.op) for c in batch.changes]
    assert ops == [
        ("stock_levels", "U"),
        ("invoice_lines", "U"),
        ("stock_levels", "I"),
        ("stock_levels", "D"),
    ]
    upd, moved, ins, dele = batch.changes
    # REPLICA IDENTITY FULL: the old row comes whole, typed as the table's columns
    assert upd.old_complete and upd.old["quantity"] == s.quantity
    assert upd.new["quantity"] == s.quantity + 1 and upd.new["updated_at"] == s.updated_at
    assert moved.old["invoice_id"] == line.invoice_id
    assert moved.new["invoice_id"] == line.invoice_id + 1
    assert isinstance(moved.new["unit_price"], Decimal)
    assert ins.new["id"] == 9_999_999 and ins.old is None
    assert dele.new is None and dele.old["product_id"] == pid
    # peeking consumes nothing; a later position returns nothing more
    assert logical.changes(start).changes == batch.changes
    assert logical.changes(batch.upto).changes == ()


def test_the_logical_gate_names_the_changed_tables_and_is_quiet_after_release(
    pg_logical_dbs, logical
):
    dbs = pg_logical_dbs
    first = logical.gate(None)
    assert first.changed  # a first look never vouches for anything
    logical.release([first.position])
    assert not logical.gate(first.position).changed
    with dbs.source.begin() as conn:
        conn.execute(src.payments.update().where(src.payments.c.id == 1).values(amount=1))
    gate = logical.gate("0/0")
    assert gate.changed and gate.tables == {"payments"} and set(gate.latest) == {"payments"}
    logical.release([gate.position])
    assert not logical.gate(gate.position).changed


def test_a_missing_slot_is_lost_changes_not_a_quiet_source(pg_logical_dbs, logical):
    dbs = pg_logical_dbs
    position = logical.position()
    with dbs.source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": logical.slot})
    with pytest.raises(CaptureLost, match="missing"):
        logical.changes(position)
    gate = logical.gate(position)
    assert gate.changed and gate.tables is None and "missing" in gate.note
    assert any("created logical replication slot" in line for line in logical.ensure())
    assert logical.restarted


def test_without_logical_decoding_the_counter_gate_sees_silent_updates(pg_dbs):
    capture = choose_capture(pg_dbs.source)
    assert isinstance(capture, PgCounterCapture)
    assert "wal_level is replica" in capture.why
    assert "postgresql_logical_decoding.sql" in capture.why
    # the seed's sessions flush their statistics when they exit, or up to a second
    # after going idle: close them, then poll until the counters have stood still for
    # longer than that (else the seed's own inserts show up as changes below)
    pg_dbs.source.dispose()
    first = capture.gate(None)
    assert first.changed and first.tables is None  # no earlier counters: maybe changed
    deadline, still_since = time.monotonic() + 30, time.monotonic()
    while time.monotonic() - still_since < 1.5:
        settled = capture.gate(first.position)
        if settled.changed:
            assert time.monotonic() < deadline, f"counters still moving: {settled.note}"
            first, still_since = settled, time.monotonic()
        time.sleep(0.1)
    sl = src.stock_levels
    with pg_dbs.source.begin() as conn:
        # an UPDATE that does not touch updated_at: no signature would move
        conn.execute(sl.update().where(sl.c.id == 1).values(quantity=sl.c.quantity + 1))
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
    gate = capture.gate(first.position)
    assert gate.changed and gate.tables == {"stock_levels"}
    # a statistics reset makes every table a suspect, never a quiet source
    with pg_dbs.source.begin() as conn:
        conn.exec_driver_sql("SELECT pg_stat_reset()")
    reset = capture.gate(gate.position)
    assert reset.changed and reset.tables is None and "reset" in reset.note


def test_the_dba_script_s_account_reads_changes_without_being_superuser(pg_logical_dbs):
    """As CFI's DBA sets it up: cfi_source_reader (REPLICATION, SELECT only) and the
    publication cfi_pipelines from deploy/sql/postgresql_logical_decoding.sql."""
    dbs = pg_logical_dbs
    with dbs.source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ALTER ROLE cfi_source_reader PASSWORD 'reader-test-only'")
    reader = create_engine(
        dbs.source.url.set(username="cfi_source_reader", password="reader-test-only")
        .render_as_string(hide_password=False)
    )  # fmt: skip
    try:
        # a publication of another name does not exist, and this account may not create it
        other = choose_capture(reader, slot="cfi_other_pub")
        assert isinstance(other, PgCounterCapture)
        assert "publication cfi_other_pub is missing" in other.why
        capture = choose_capture(reader, slot="cfi_pipelines")
        assert isinstance(capture, PgLogicalCapture), capture.why
        assert any("created logical replication slot" in line for line in capture.ensure())
        start = capture.position()
        with dbs.source.begin() as conn:
            conn.execute(src.payments.delete().where(src.payments.c.id == 1))
        (change,) = capture.changes(start).changes
        assert change.op == "D" and change.old_complete and change.old["invoice_id"]
    finally:
        with dbs.source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = 'cfi_pipelines'"
            )
        reader.dispose()


def test_changes_read_in_batches_skip_no_transaction(pg_logical_dbs, logical):
    """A backlog longer than one batch is read batch after batch, every change once, in
    commit order, although a peek always starts at the slot's position (nothing released
    between the batches: another view may hold the slot back)."""
    dbs = pg_logical_dbs
    start = logical.position()
    pay = src.payments
    for i in range(1, 8):
        with dbs.source.begin() as conn:
            conn.execute(pay.update().where(pay.c.id == i).values(amount=100 + i))
    seen, since, calls = [], start, 0
    while True:
        batch = logical.changes(since, limit=2)
        calls += 1
        seen += [c.new["id"] for c in batch.changes]
        assert batch.changes or not batch.more
        since = batch.upto
        if not batch.more:
            break
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert calls <= 5
    assert logical.changes(since).changes == ()


def test_a_gate_stopped_by_its_limit_suspects_every_table(pg_logical_dbs, logical, monkeypatch):
    """Many small transactions on one table, then one on another: a gate whose read
    stopped before the end names no table as the only one (else the view of the later
    table would be verified, and moved, past its change)."""
    import cfi_pipelines.views.capture.pg_logical as pg_logical

    dbs = pg_logical_dbs
    first = logical.gate(None)
    logical.release([first.position])
    monkeypatch.setattr(pg_logical, "GATE_CHANGES", 20)
    pay, sl = src.payments, src.stock_levels
    for i in range(1, 11):
        with dbs.source.begin() as conn:
            conn.execute(pay.update().where(pay.c.id == i).values(amount=200 + i))
    with dbs.source.begin() as conn:
        conn.execute(sl.update().where(sl.c.id == 1).values(quantity=sl.c.quantity + 1))
    gate = logical.gate("0/0")
    assert gate.changed
    assert gate.tables is None or "stock_levels" in gate.tables, gate


def test_a_gate_that_decodes_too_long_gives_up_and_judges_nothing(
    pg_logical_dbs, logical, monkeypatch
):
    """The gate's statement is bounded (decoding up to the flush position can wait
    seconds for a record being flushed): past the bound it answers 'busy' (the tick
    judges nothing, the next one asks again) instead of outliving the sensor's deadline
    and leaving the slot held by a statement nobody waits for."""
    import cfi_pipelines.views.capture.pg_logical as pg_logical

    dbs = pg_logical_dbs
    first = logical.gate(None)
    logical.release([first.position])
    sl = src.stock_levels
    with dbs.source.begin() as conn:  # thousands of row images: more than 1 ms to decode
        conn.execute(sl.update().values(quantity=sl.c.quantity + 1))
    monkeypatch.setattr(pg_logical, "GATE_TIMEOUT_MS", 1)
    gate = logical.gate(first.position)
    assert gate.busy and gate.changed and gate.tables is None
    assert "still being flushed after 1 ms" in gate.note
    monkeypatch.setattr(pg_logical, "GATE_TIMEOUT_MS", 5_000)
    with (
        dbs.source.connect() as conn
    ):  # the canceled read let go of the slot, and the session's timeout
        active = conn.scalar(
            sa.text("SELECT active FROM pg_replication_slots WHERE slot_name = :s"),
            {"s": logical.slot},
        )
    assert active is False
    gate = logical.gate(first.position)
    assert not gate.busy and gate.changed  # many changes: every table a suspect
