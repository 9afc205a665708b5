"""The refresh engine on real databases: SQLite (embedded default), PostgreSQL
(a real server), and the mixed pairs that take the portable copy path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.diagnosis import DiagnosedFailure
from cfi_pipelines.views.refresh import (
    RefreshRefused,
    read_status,
    refresh_view,
    swap_in,
    tenant_closure,
    utcnow,
)
from cfi_pipelines.views.spec import VIEWS, get_view
from tests.fixtures.common import Databases

STOCKS = get_view("stocks")


def _mixed(a: Databases, b: Databases) -> Databases:
    return Databases(a.source_url, b.common_url, a.source, b.common)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("sqlite->postgresql", marks=pytest.mark.postgres),
        pytest.param("postgresql->sqlite", marks=pytest.mark.postgres),
    ]
)
def dbs(request) -> Databases:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_dbs")
    if request.param == "postgresql":
        return request.getfixturevalue("pg_dbs")
    lite, pg = request.getfixturevalue("sqlite_dbs"), request.getfixturevalue("pg_dbs")
    return _mixed(lite, pg) if request.param == "sqlite->postgresql" else _mixed(pg, lite)


def _rows(engine: sa.Engine, table: sa.Table, order: list[str]) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(r) for r in conn.execute(sa.select(table).order_by(*(table.c[c] for c in order)))
        ]


def _expected(dbs: Databases, spec) -> list[tuple]:
    """The view computed directly on the source, in key order."""
    q = spec.query().subquery()
    with dbs.source.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(sa.select(q).order_by(*(q.c[k] for k in spec.key)), spec.params())
        ]


def _cell(v) -> str:
    # SQLite hands numerics back as float/int/str, PostgreSQL as Decimal; compare values
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int | float | Decimal):
        return f"{round(float(v), 2) + 0.0:.2f}"  # + 0.0: no "-0.00"
    return str(v)


def _norm(rows: list[tuple]) -> list[tuple]:
    return [tuple(_cell(v) for v in r) for r in rows]


def test_full_refresh_builds_every_view_exactly(dbs: Databases):
    for spec in VIEWS:
        result = refresh_view(spec, dbs.source, dbs.common, mode="full")
        assert result.mode == "full" and result.source == "db"
        expected = _expected(dbs, spec)
        assert result.rows == len(expected) > 0
        got = _rows(dbs.common, spec.table, list(spec.key))
        assert _norm(got) == _norm(expected), spec.name
    status = read_status(dbs.common)
    assert {v: status[v]["rows"] for v in status} == {s.name: len(_expected(dbs, s)) for s in VIEWS}
    assert all(status[v.name]["error"] is None for v in VIEWS)


def test_incremental_upserts_changed_rows_only(dbs: Databases):
    refresh_view(STOCKS, dbs.source, dbs.common)
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        conn.execute(
            sl.update()
            .where(sl.c.id <= 25)
            .values(quantity=sl.c.quantity + 1000, updated_at=utcnow())
        )
    second = refresh_view(STOCKS, dbs.source, dbs.common)
    assert second.mode == "incremental"
    # the capture that found the change is named (the UI's materialization metadata)
    assert second.capture_mode in {"sqlite_data_version", "pg_counters", "timestamp"}
    # updated: the rows whose values changed, not every row the overlap window re-read
    assert second.updated == 25 and second.inserted == 0
    assert second.loaded < second.rows / 10  # only the changes (plus the overlap window) were read
    got = _rows(dbs.common, STOCKS.table, list(STOCKS.key))
    assert _norm(got) == _norm(_expected(dbs, STOCKS))
    with dbs.common.connect() as conn:
        assert (
            conn.scalar(sa.select(sa.func.count()).where(common.cfi_stocks.c.quantity >= 1000))
            == 25
        )
    lg = common.cfi_refresh_log
    with dbs.common.connect() as conn:
        history = conn.execute(
            sa.select(lg.c.mode, lg.c.outcome, lg.c.updated).order_by(lg.c.id)
        ).all()
    assert [(m, o) for m, o, _ in history] == [("full", "success"), ("incremental", "success")]
    assert history[1].updated == second.updated
    quiet = refresh_view(STOCKS, dbs.source, dbs.common)
    # the overlap re-reads the 25 rows unchanged: nothing written, nothing "updated"
    assert quiet.mode == "incremental" and quiet.loaded >= 25
    assert (quiet.updated, quiet.inserted, quiet.deleted) == (0, 0, 0)


def test_incremental_picks_up_a_row_committed_late_within_the_overlap(dbs: Databases):
    refresh_view(STOCKS, dbs.source, dbs.common)
    watermark = read_status(dbs.common)["stocks"]["watermark"]
    sl = src.stock_levels
    # committed after the refresh read, but stamped just before its watermark
    with dbs.source.begin() as conn:
        conn.execute(
            sl.update()
            .where(sl.c.id == 1)
            .values(quantity=77777, updated_at=watermark - timedelta(seconds=30))
        )
    refresh_view(STOCKS, dbs.source, dbs.common)
    with dbs.common.connect() as conn:
        assert (
            conn.scalar(
                sa.select(common.cfi_stocks.c.quantity).where(common.cfi_stocks.c.quantity == 77777)
            )
            == 77777
        )


def test_new_source_rows_are_inserted_incrementally(dbs: Databases):
    spec = get_view("operations")
    refresh_view(spec, dbs.source, dbs.common)
    with dbs.source.begin() as conn:
        conn.execute(
            src.operations.insert().values(
                id=9999, tenant_id=3, code="OP-NEW", name="Nouvelle opération", kind="promotion",
                status="planned", starts_on=utcnow().date(), ends_on=utcnow().date(), budget=100,
                updated_at=utcnow(),
            )
        )  # fmt: skip
    r = refresh_view(spec, dbs.source, dbs.common)
    assert (r.mode, r.inserted) == ("incremental", 1)
    assert 9999 in {row[1] for row in _rows(dbs.common, spec.table, ["operation_id"])}


def test_guard_refuses_a_collapsed_source_and_force_overrides(dbs: Databases):
    refresh_view(STOCKS, dbs.source, dbs.common)
    before = _rows(dbs.common, STOCKS.table, list(STOCKS.key))
    with dbs.source.begin() as conn:
        conn.execute(src.stock_movements.delete())
        conn.execute(src.stock_levels.delete().where(src.stock_levels.c.id > 100))
    with pytest.raises(RefreshRefused, match="not swapped in"):
        refresh_view(STOCKS, dbs.source, dbs.common, mode="full")
    assert _rows(dbs.common, STOCKS.table, list(STOCKS.key)) == before
    status = read_status(dbs.common)["stocks"]
    assert status["consecutive_failures"] == 1 and "not swapped in" in status["error"]
    with dbs.common.connect() as conn:
        assert (
            conn.scalar(
                sa.select(common.cfi_refresh_log.c.outcome).order_by(
                    common.cfi_refresh_log.c.id.desc()
                )
            )
            == "refused"
        )
    forced = refresh_view(STOCKS, dbs.source, dbs.common, mode="full", force=True)
    assert forced.rows == 100 and forced.deleted == len(before) - 100
    assert read_status(dbs.common)["stocks"]["consecutive_failures"] == 0


def test_a_failing_load_leaves_the_live_view_and_records_the_error(dbs: Databases):
    refresh_view(STOCKS, dbs.source, dbs.common)
    before = _rows(dbs.common, STOCKS.table, list(STOCKS.key))

    def half_then_fail(staging: sa.Table) -> int:
        with dbs.common.begin() as conn:
            conn.execute(staging.insert(), [dict(zip(STOCKS.columns, before[0], strict=True))])
        raise RuntimeError("source connection lost mid-read")

    with pytest.raises(RuntimeError, match="mid-read"):
        swap_in(STOCKS, dbs.common, half_then_fail, source="db", snapshot_at=utcnow())
    assert _rows(dbs.common, STOCKS.table, list(STOCKS.key)) == before
    with dbs.common.connect() as conn:
        assert not sa.inspect(conn).has_table("cfi_stocks__staging")


def test_unreachable_source_is_recorded_and_view_kept(sqlite_dbs: Databases, tmp_path):
    refresh_view(STOCKS, sqlite_dbs.source, sqlite_dbs.common)
    dead = create_engine("postgresql+psycopg://x:y@127.0.0.1:9/none?connect_timeout=1")
    with pytest.raises(DiagnosedFailure) as info:  # the database error, its cause named
        refresh_view(STOCKS, dead, sqlite_dbs.common, mode="full")
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    status = read_status(sqlite_dbs.common)["stocks"]
    assert status["rows"] == 9984 and status["consecutive_failures"] == 1
    assert "check CFI_SOURCE_URL (host, port, database, credentials)" in status["error"]


def test_readers_never_see_a_partial_or_empty_view(dbs: Databases):
    refresh_view(STOCKS, dbs.source, dbs.common)
    expected = len(_expected(dbs, STOCKS))
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    reader_engine = create_engine(dbs.common_url)

    def read() -> None:
        while not stop.is_set():
            try:
                with reader_engine.connect() as conn:
                    seen.append(
                        conn.scalar(sa.select(sa.func.count()).select_from(common.cfi_stocks))
                    )
            except BaseException as exc:  # noqa: BLE001 - any reader error fails the test
                errors.append(exc)
                return

    t = threading.Thread(target=read)
    t.start()
    try:
        for _ in range(4):
            refresh_view(STOCKS, dbs.source, dbs.common, mode="full")
            refresh_view(STOCKS, dbs.source, dbs.common, mode="incremental")
    finally:
        stop.set()
        t.join()
        reader_engine.dispose()
    assert not errors, errors
    assert len(seen) > 10 and set(seen) == {expected}


KILLED_REFRESH = textwrap.dedent(
    """
    import sys, sqlalchemy as sa
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.clock import utcnow
    from cfi_pipelines.views.refresh import swap_in, source_loader
    from cfi_pipelines.views.spec import get_view
    spec = get_view("stocks")
    source, target = create_engine(sys.argv[1]), create_engine(sys.argv[2])
    real = source_loader(spec, source, target, incremental=False, params={})
    def load(staging):
        n = real(staging)
        print("LOADED", n, flush=True)
        sys.stdin.read()  # blocks until the parent kills us
        return n
    swap_in(spec, target, load, source="db", snapshot_at=utcnow())
    """
)


def test_a_refresh_killed_mid_load_leaves_the_old_view_intact(sqlite_dbs: Databases):
    dbs = sqlite_dbs
    refresh_view(STOCKS, dbs.source, dbs.common)
    with dbs.source.begin() as conn:  # the killed refresh would bring new quantities
        conn.execute(src.stock_levels.update().values(quantity=0))
    before = _rows(dbs.common, STOCKS.table, list(STOCKS.key))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_REFRESH, dbs.source_url, dbs.common_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("LOADED")  # staging is full, swap not done
    proc.kill()
    proc.wait()
    assert _rows(dbs.common, STOCKS.table, list(STOCKS.key)) == before
    # the next refresh cleans the leftover staging table and succeeds
    r = refresh_view(STOCKS, dbs.source, dbs.common, mode="full")
    assert r.rows == len(before)
    with dbs.common.connect() as conn:
        assert conn.scalar(sa.select(sa.func.max(common.cfi_stocks.c.quantity))) == 0
        assert not sa.inspect(conn).has_table("cfi_stocks__staging")


def test_tenant_closure_and_cascading_access(sqlite_dbs: Databases):
    assert sorted(tenant_closure({1: None, 2: 1, 3: 2, 4: 1})) == [
        (1, 1, 0), (1, 2, 1), (1, 3, 2), (1, 4, 1), (2, 2, 0), (2, 3, 1), (3, 3, 0), (4, 4, 0),
    ]  # fmt: skip
    refresh_view(get_view("invoices"), sqlite_dbs.source, sqlite_dbs.common)
    tc, inv = common.cfi_tenant_closure, common.cfi_invoices

    def visible(tenant: int) -> set[int]:
        q = (
            sa.select(inv.c.tenant_id)
            .distinct()
            .join(tc, tc.c.descendant == inv.c.tenant_id)
            .where(tc.c.ancestor == tenant)
        )
        with sqlite_dbs.common.connect() as conn:
            return set(conn.scalars(q))

    with sqlite_dbs.source.connect() as conn:
        t = {r.code: r.id for r in conn.execute(sa.select(src.tenants))}
    nord, sud = visible(t["NORD"]), visible(t["SUD"])
    assert nord == {t["NORD-01"], t["NORD-02"], t["NORD-03"]}
    assert not nord & sud
    assert visible(t["CFI"]) >= nord | sud
    assert visible(t["NORD-01"]) == {t["NORD-01"]}


def test_tenant_cycle_is_a_clear_error():
    with pytest.raises(Exception, match="cycle"):
        tenant_closure({1: 2, 2: 1})


def test_four_views_refreshed_at_once_on_a_fresh_sqlite_db(sqlite_dbs, tmp_path):
    """What `dagster asset materialize` does with its multiprocess executor: four
    writers racing on one SQLite file, from schema creation on. Write transactions
    start with BEGIN IMMEDIATE, so they queue instead of failing "database is locked"."""
    from concurrent.futures import ThreadPoolExecutor

    for attempt in range(3):
        url = f"sqlite:///{tmp_path}/race{attempt}.db"

        def refresh(name: str, url: str = url):
            engine = create_engine(url)  # one engine (and connection) per worker
            try:
                return refresh_view(get_view(name), create_engine(sqlite_dbs.source_url), engine)
            finally:
                engine.dispose()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(refresh, [v.name for v in VIEWS]))
        assert [r.rows for r in results] == [9984, 20, 1000, 10]


def test_sqlite_refresh_reads_the_source_read_only(sqlite_dbs):
    import sqlite3

    path = sa.engine.make_url(sqlite_dbs.source_url).database
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # CFI is writing: holds the write lock
    writer.execute("UPDATE stock_levels SET quantity = quantity + 1 WHERE id = 1")
    try:
        # the ATTACH path neither waits for nor takes the source's write lock
        assert refresh_view(STOCKS, sqlite_dbs.source, sqlite_dbs.common, mode="full").rows == 9984
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_an_incremental_lands_indexed_and_plain_changes_and_warehouse_moves(dbs: Databases):
    """The SQLite upsert sets the indexed columns apart (:func:`_sqlite_upsert`) and the
    warehouse branch of the query runs only when a warehouse changed: a product renamed
    (its sku, in an index), a stock moved to another tenant, a quantity change and a
    warehouse's city all reach the cache, each row counted once."""
    refresh_view(STOCKS, dbs.source, dbs.common, mode="full")
    sl, p, w = src.stock_levels, src.products, src.warehouses
    now = utcnow()
    with dbs.source.begin() as conn:
        s1, s2 = conn.execute(sa.select(sl).order_by(sl.c.id).limit(2)).all()
        other = conn.scalar(sa.select(sl.c.tenant_id).where(sl.c.tenant_id != s1.tenant_id))
        conn.execute(
            sl.update().where(sl.c.id == s1.id).values(tenant_id=other, quantity=7, updated_at=now)
        )
        conn.execute(sl.update().where(sl.c.id == s2.id).values(quantity=8, updated_at=now))
        conn.execute(
            p.update().where(p.c.id == s2.product_id).values(sku="RENAMED-1", updated_at=now)
        )
    r = refresh_view(STOCKS, dbs.source, dbs.common, mode="incremental")
    with dbs.source.connect() as conn:
        touched = conn.scalar(
            sa.select(sa.func.count()).where(
                sa.or_(sl.c.id == s1.id, sl.c.product_id == s2.product_id)
            )
        )
    assert r.updated == touched  # s1, and every stock row of the renamed product
    assert _norm(_rows(dbs.common, STOCKS.table, list(STOCKS.key))) == _norm(_expected(dbs, STOCKS))
    with dbs.source.begin() as conn:
        wid = conn.scalar(sa.select(w.c.id).order_by(w.c.id).limit(1))
        conn.execute(w.update().where(w.c.id == wid).values(city="Moved", updated_at=utcnow()))
    r = refresh_view(STOCKS, dbs.source, dbs.common, mode="incremental")
    with dbs.source.connect() as conn:
        in_warehouse = conn.scalar(sa.select(sa.func.count()).where(sl.c.warehouse_id == wid))
    assert r.updated == in_warehouse > 0
    assert _norm(_rows(dbs.common, STOCKS.table, list(STOCKS.key))) == _norm(_expected(dbs, STOCKS))


def test_a_delete_balanced_by_an_insert_is_seen_by_the_same_incremental(sqlite_dbs: Databases):
    """SQLite's incremental runs in one transaction: the deleted-keys reconciliation must
    read the cache with the upsert in it. Read before it, a stock row deleted and one
    inserted in the same key range balance out and the deleted row stays cached."""
    dbs = sqlite_dbs
    refresh_view(STOCKS, dbs.source, dbs.common, mode="full")
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        gone = conn.execute(sa.select(sl).order_by(sl.c.id).limit(1)).one()
        conn.execute(
            src.stock_movements.delete().where(src.stock_movements.c.stock_level_id == gone.id)
        )
        conn.execute(sl.delete().where(sl.c.id == gone.id))
        taken = set(conn.execute(sa.select(sl.c.product_id, sl.c.warehouse_id)).tuples())
        wid = next(
            w
            for w in range(1, 10_000)
            if (gone.product_id, w) not in taken and w != gone.warehouse_id
        )
        row = {
            **gone._mapping,
            "id": gone.id + 10_000_000,
            "warehouse_id": wid,
            "updated_at": utcnow(),
        }
        conn.execute(sl.insert().values(**row))
    r = refresh_view(STOCKS, dbs.source, dbs.common, mode="incremental")
    assert (r.inserted, r.deleted) == (1, 1)
    assert _norm(_rows(dbs.common, STOCKS.table, list(STOCKS.key))) == _norm(_expected(dbs, STOCKS))
    with dbs.common.connect() as conn:  # the delta was a temporary table: nothing left
        names = sa.inspect(conn).get_table_names()
    assert not [n for n in names if n.endswith("__delta")]


@pytest.mark.postgres
def test_an_incremental_read_on_postgresql_goes_through_indexes(pg_dbs: Databases):
    """The incremental query names its rows through the updated_at indexes; the planner,
    misled by statistics that do not know the newest stamps, hash-joined sequential
    scans of stock_levels and products (O(table) on CFI's server for every refresh).
    The load's session turns hash and merge joins off (load._index_driven)."""
    from cfi_pipelines.views.load import _index_driven

    q = STOCKS.query(incremental=True)
    with pg_dbs.source.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        comp = q.compile(dialect=conn.dialect)
        params = {**comp.params, "since": utcnow() - timedelta(minutes=2)}
        raw = conn.connection.driver_connection

        def plan() -> str:
            return "\n".join(r[0] for r in raw.execute(f"EXPLAIN {comp}", params))

        before = plan()
        _index_driven(conn)
        after = plan()
        conn.rollback()
    assert "Seq Scan on stock_levels" in before or "Seq Scan on products" in before
    assert "Seq Scan on stock_levels" not in after and "Seq Scan on products" not in after
    assert "Hash Join" not in after
