"""The full refresh's swap against a reader left idle in its transaction (PostgreSQL,
with the read-only account of deploy/sql/postgresql_readonly.sql).

The rename needs ACCESS EXCLUSIVE on the live table, and a reader keeps ACCESS SHARE
until its transaction ends. The swap must wait a short time per attempt (readers that
arrive meanwhile queue behind the rename), give the lock up, retry, and finally fail
with an error naming the holder, not "a database is unreachable"."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cfi_pipelines.views import swap as swap_step
from cfi_pipelines.views.refresh import RefreshError, SwapLockTimeout, read_status, refresh_view
from cfi_pipelines.views.spec import get_view

pytestmark = pytest.mark.postgres

GRANTS = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "postgresql_readonly.sql"
ROWS = 9984


def _connect(pg_dbs, postgres, *, user="mycfia_readonly", password="ro-secret", **kw):
    url = sa.engine.make_url(pg_dbs.common_url)
    return psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        dbname=url.database,
        user=user,
        password=password,
        **kw,
    )


def _monitor(pg_dbs, postgres):
    url = sa.engine.make_url(pg_dbs.common_url)
    return _connect(pg_dbs, postgres, user=url.username, password=url.password, autocommit=True)


def _wait_for(check, *, until_dead: threading.Thread, deadline_s: float = 60.0):
    """Poll the database for a condition while ``until_dead`` runs; None if it ended first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if (found := check()) is not None:
            return found
        if not until_dead.is_alive():
            return check()
        time.sleep(0.005)  # polling interval of the condition, not a synchronisation
    raise AssertionError("condition not reached")


def _swap_waiting_on(monitor, holder_pid: int) -> int | None:
    """The pid of a session waiting for ACCESS EXCLUSIVE on cfi_stocks behind ``holder_pid``."""
    row = monitor.execute(
        "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'relation' AND NOT l.granted "
        "AND l.mode = 'AccessExclusiveLock' AND l.relation = 'cfi_stocks'::regclass "
        "AND %s = ANY (pg_blocking_pids(l.pid))",
        (holder_pid,),
    ).fetchone()
    return row[0] if row else None


def test_idle_in_transaction_reader_does_not_stall_readers_and_is_named(
    pg_dbs, postgres, monkeypatch
):
    # more attempts than in production, each as short: on a loaded machine the test's own
    # steps must not outlast the swap's retries (the behaviour per attempt is the same)
    monkeypatch.setattr(swap_step, "SWAP_LOCK_ATTEMPTS", 10)
    spec = get_view("stocks")
    refresh_view(spec, pg_dbs.source, pg_dbs.common, mode="full")
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("ALTER ROLE mycfia_readonly PASSWORD 'ro-secret'")

    idle = _connect(pg_dbs, postgres, application_name="mycfia-idle-reader")
    other = _connect(pg_dbs, postgres, application_name="mycfia-other-reader")
    monitor = _monitor(pg_dbs, postgres)
    outcome: dict = {}

    def run_refresh():
        try:
            outcome["result"] = refresh_view(spec, pg_dbs.source, pg_dbs.common, mode="full")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    try:
        # one SELECT, then the reader stays in its transaction: it holds ACCESS SHARE
        assert idle.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == ROWS
        idle_pid = idle.info.backend_pid
        assert (
            monitor.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (idle_pid,)
            ).fetchone()[0]
            == "idle in transaction"
        )

        swap = threading.Thread(target=run_refresh, daemon=True)
        swap.start()
        first = _wait_for(lambda: _swap_waiting_on(monitor, idle_pid), until_dead=swap)
        assert first is not None, f"the swap never waited for the reader: {outcome}"

        # A reader arriving now queues behind the waiting rename; it must get through
        # when that attempt gives its lock up, while the swap is still retrying.
        assert other.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == ROWS
        other.rollback()
        assert swap.is_alive()
        again = _wait_for(lambda: _swap_waiting_on(monitor, idle_pid), until_dead=swap)
        assert again is not None, "the reader only got through when the swap gave up"

        swap.join(timeout=60)
        assert not swap.is_alive()
        exc = outcome.get("error")
        assert isinstance(exc, SwapLockTimeout), outcome
        assert isinstance(exc, RefreshError)
        assert not isinstance(exc, sa.exc.OperationalError)  # no "database unreachable"
        assert exc.attempts == swap_step.SWAP_LOCK_ATTEMPTS > 1
        message = str(exc)
        assert f"lock held by pid {idle_pid} " in message
        assert "application 'mycfia-idle-reader'" in message
        assert "state idle in transaction" in message
        assert "user mycfia_readonly" in message
        assert [h["pid"] for h in exc.holders] == [idle_pid]
        status = read_status(pg_dbs.common)["stocks"]
        assert f"lock held by pid {idle_pid} " in status["error"]

        # the live view is untouched and readable, the staging copy is gone
        assert other.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == ROWS
        other.rollback()
        assert monitor.execute("SELECT to_regclass('cfi_stocks__staging')").fetchone()[0] is None

        # once the reader ends its transaction, the refresh goes through
        idle.commit()
        result = refresh_view(spec, pg_dbs.source, pg_dbs.common, mode="full")
        assert result.rows == ROWS
        assert idle.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == ROWS
        idle.rollback()
        assert read_status(pg_dbs.common)["stocks"]["error"] is None
    finally:
        for c in (idle, other, monitor):
            c.close()
        if "swap" in locals():
            swap.join(timeout=60)


def test_swap_lock_timeout_is_short():
    """Readers queued behind the waiting rename stall at most one attempt."""
    assert swap_step.SWAP_LOCK_TIMEOUT_MS <= 500


def test_reads_longer_than_an_attempt_do_not_starve_the_swap(pg_dbs, postgres):
    """Two readers whose reads (2 s each, staggered by 1 s) keep the live view busy at
    every moment, as a reader counting a 10M-row view in a loop did: each short attempt
    meets a read with more than its wait left. The swap waits longer when the holders are
    running statements, gets through, and the readers only ever see the complete view."""
    spec = get_view("stocks")
    refresh_view(spec, pg_dbs.source, pg_dbs.common, mode="full")
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("ALTER ROLE mycfia_readonly PASSWORD 'ro-secret'")
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []
    looping = [threading.Event(), threading.Event()]

    def read(i: int) -> None:
        try:
            with _connect(pg_dbs, postgres, autocommit=True) as conn:
                conn.execute("SELECT pg_sleep(%s)", (float(i),))  # the stagger: 1 s
                looping[i].set()
                while not done.is_set():
                    cur = conn.execute("SELECT (SELECT count(*) FROM cfi_stocks), pg_sleep(2)")
                    seen.append(cur.fetchone()[0])
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for t in readers:
        t.start()
    try:
        assert all(e.wait(timeout=30) for e in looping)
        result = refresh_view(spec, pg_dbs.source, pg_dbs.common, mode="full")
        assert result.rows == ROWS
        assert read_status(pg_dbs.common)["stocks"]["error"] is None
    finally:
        done.set()
        for t in readers:
            t.join(timeout=30)
    assert not errors, errors
    assert seen and set(seen) == {ROWS}
