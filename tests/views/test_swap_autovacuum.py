"""A PostgreSQL full refresh against autovacuum at its most eager (issue 16, item 8).

Autovacuum takes a SHARE UPDATE EXCLUSIVE lock on a table it works on and yields to a
waiting lock only after deadlock_timeout (1 s), longer than one swap attempt (200 ms):
on a freshly loaded staging table it held the index builds and the swap, and the
failure blamed "a reader". The staging table now has autovacuum off until the swap,
and a holder that is autovacuum is named as such. The server here runs autovacuum
every second with every threshold at zero."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.postgres import TempPostgres
from cfi_pipelines.devtools.seed import seed_source_fast
from cfi_pipelines.views import swap as swap_step
from cfi_pipelines.views.load import source_loader
from cfi_pipelines.views.refresh import init_common, refresh_view
from cfi_pipelines.views.spec import get_view
from cfi_pipelines.views.swap import SwapLockTimeout, _describe_holder, is_autovacuum, swap_in
from tests.fixtures.common import Databases

pytestmark = pytest.mark.postgres

EAGER_AUTOVACUUM = (
    "autovacuum_naptime=1",
    "autovacuum_vacuum_threshold=0",
    "autovacuum_analyze_threshold=0",
    "autovacuum_vacuum_insert_threshold=1",
    "autovacuum_vacuum_scale_factor=0",
    "autovacuum_analyze_scale_factor=0",
    "autovacuum_vacuum_insert_scale_factor=0",
    "autovacuum_vacuum_cost_delay=0",
)
STOCKS = get_view("stocks")
_counter = itertools.count()


@pytest.fixture(scope="module")
def postgres_eager_autovacuum() -> Iterator[TempPostgres]:
    """A PostgreSQL 15 server whose autovacuum visits every table that changed, every second."""
    with TempPostgres(settings=EAGER_AUTOVACUUM) as pg:
        yield pg


@pytest.fixture
def eager_dbs(postgres_eager_autovacuum: TempPostgres) -> Iterator[Databases]:
    pg, n = postgres_eager_autovacuum, next(_counter)
    s_url, c_url = pg.create_database(f"src{n}"), pg.create_database(f"common{n}")
    dbs = Databases(s_url, c_url, create_engine(s_url), create_engine(c_url))
    seed_source_fast(dbs.source, scale=5, seed=3)  # ~50k stock rows
    init_common(dbs.common)
    yield dbs
    dbs.source.dispose()
    dbs.common.dispose()


def _connect(url: str) -> psycopg.Connection:
    u = make_url(url)
    return psycopg.connect(
        host=u.host,
        port=u.port,
        user=u.username,
        password=u.password,
        dbname=u.database,
        autocommit=True,
    )


def _table_stats(conn: psycopg.Connection, table: str) -> tuple[int, int] | None:
    row = conn.execute(
        "SELECT autovacuum_count, autoanalyze_count FROM pg_stat_user_tables WHERE relname = %s",
        (table,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _reloptions(conn: psycopg.Connection, table: str) -> list[str] | None:
    return conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", (table,)).fetchone()[
        0
    ]


def test_autovacuum_leaves_the_staging_table_alone_until_the_swap(eager_dbs: Databases):
    refresh_view(STOCKS, eager_dbs.source, eager_dbs.common, mode="full")
    seen: dict = {}
    real = source_loader(
        STOCKS, eager_dbs.source, eager_dbs.common, incremental=False, params=STOCKS.params(),
        freeze=True,
    )  # fmt: skip

    def loader(staging: sa.Table) -> int:
        rows = real(staging)
        eager_dbs.common.dispose()  # the loading backend exits: its insert counts are flushed
        with _connect(eager_dbs.common_url) as conn:
            seen["reloptions"] = _reloptions(conn, staging.name)
            # positive control: a table loaded now, autovacuum left on, as the staging was
            conn.execute("CREATE TABLE av_probe AS SELECT g AS id FROM generate_series(1, 5000) g")
            deadline = utcnow() + timedelta(seconds=60)
            while (_table_stats(conn, "av_probe") or (0, 0))[0] == 0:
                assert utcnow() < deadline, "autovacuum never visited the control table"
                conn.execute("SELECT pg_stat_clear_snapshot()")
                conn.execute("SELECT pg_sleep(0.2)")  # poll an event: autovacuum's visit
            seen["staging"] = _table_stats(conn, staging.name)
        return rows

    result = swap_in(STOCKS, eager_dbs.common, loader, source="db", snapshot_at=utcnow())
    assert result.rows > 40_000
    assert seen["reloptions"] == ["autovacuum_enabled=false"]  # (toast's is on the toast table)
    # autovacuum vacuumed the control table in that pass, and not the staging table
    assert seen["staging"] == (0, 0)
    with _connect(eager_dbs.common_url) as conn:
        assert _reloptions(conn, "cfi_stocks") is None  # live: autovacuum back on
        assert conn.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == result.rows


def test_full_refreshes_go_through_with_autovacuum_at_its_most_eager(
    eager_dbs: Databases, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="cfi_pipelines.views.swap")
    results = [
        refresh_view(STOCKS, eager_dbs.source, eager_dbs.common, mode="full") for _ in range(3)
    ]
    assert all(r.mode == "full" and r.rows > 40_000 for r in results)
    assert results[-1].inserted == 0 and results[-1].updated == results[-1].rows  # net figures
    assert "timed out on its lock" not in caplog.text


def test_autovacuum_is_named_as_the_holder_not_a_reader():
    worker = {
        "pid": 4242,
        "mode": "ShareUpdateExclusiveLock",
        "relname": "cfi_stocks",
        "backend_type": "autovacuum worker",
        "query": "autovacuum: VACUUM ANALYZE public.cfi_stocks",
        "usename": None,
        "application_name": "",
        "state": "active",
    }
    text = _describe_holder(worker)
    assert "autovacuum (pid 4242: 'autovacuum: VACUUM ANALYZE public.cfi_stocks')" in text
    assert "not a reader" in text and "deadlock_timeout" in text
    message = str(SwapLockTimeout("stocks", 5, [worker]))
    assert "autovacuum kept working on the table" in message
    assert "A reader probably" not in message
    # without pg_read_all_stats the type is hidden: no user and this lock mode say it
    hidden = {**worker, "backend_type": None, "query": None, "state": None}
    assert is_autovacuum(hidden) and "probably autovacuum (pid 4242)" in _describe_holder(hidden)
    reader = {**worker, "backend_type": "client backend", "usename": "mycfia_readonly"}
    reader["mode"] = "AccessShareLock"
    assert not is_autovacuum(reader)
    assert "A reader probably" in str(SwapLockTimeout("stocks", 5, [reader]))


def test_after_autovacuum_held_the_lock_the_next_attempt_outlasts_deadlock_timeout(
    eager_dbs: Databases, monkeypatch: pytest.MonkeyPatch
):
    """PostgreSQL cancels an autovacuum that blocks a waiter for deadlock_timeout: the
    attempt after an autovacuum holder waits that long (a real session holds the lock
    here, reported as autovacuum, so that every attempt times out)."""
    refresh_view(STOCKS, eager_dbs.source, eager_dbs.common, mode="full")
    waits: list[str] = []
    real_begin = swap_step._begin

    def spying_begin(engine):
        class Spy:
            def __enter__(self):
                self.cm = real_begin(engine)
                conn = self.cm.__enter__()
                real_exec = conn.exec_driver_sql

                def exec_driver_sql(sql, *a, **kw):
                    if sql.startswith("SET LOCAL lock_timeout"):
                        waits.append(sql)
                    return real_exec(sql, *a, **kw)

                conn.exec_driver_sql = exec_driver_sql  # type: ignore[method-assign]
                return conn

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(swap_step, "_begin", spying_begin)
    monkeypatch.setattr(swap_step, "SWAP_LOCK_ATTEMPTS", 2)
    monkeypatch.setattr(swap_step, "SWAP_RETRY_PAUSE_S", 0.0)
    monkeypatch.setattr(
        swap_step,
        "_lock_holders",
        lambda target, tables: [
            {"pid": 1, "mode": "ShareUpdateExclusiveLock", "relname": "cfi_stocks",
             "backend_type": "autovacuum worker", "query": "autovacuum: VACUUM public.cfi_stocks"}
        ],
    )  # fmt: skip
    with _connect(eager_dbs.common_url) as holder:
        holder.autocommit = False
        holder.execute("SELECT count(*) FROM cfi_stocks")  # ACCESS SHARE until rollback
        with pytest.raises(SwapLockTimeout, match="autovacuum kept working"):
            refresh_view(STOCKS, eager_dbs.source, eager_dbs.common, mode="full")
        holder.rollback()
    assert waits == ["SET LOCAL lock_timeout = '200ms'", "SET LOCAL lock_timeout = '1300ms'"]
