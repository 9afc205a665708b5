"""SQLite's capture: ``PRAGMA data_version`` on a held connection as the O(1) idle gate, the
``updated_at`` signatures behind it, and what that path does not see, said as such."""

from __future__ import annotations

import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.capture import choose_capture
from cfi_pipelines.views.capture.sqlite import SqliteCapture


def _statements(engine: sa.Engine) -> list[str]:
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_an_idle_gate_reads_no_table(sqlite_dbs):
    capture = choose_capture(sqlite_dbs.source)
    assert isinstance(capture, SqliteCapture) and not capture.exact
    try:
        first = capture.gate(None)
        assert first.changed and first.tables is None  # a process's first look: maybe changed
        statements = _statements(sqlite_dbs.source)
        idle = capture.gate(first.position)
        assert not idle.changed and "data_version unchanged" in idle.note
        assert statements == []  # no signature query: one PRAGMA on the held connection
        sl = src.stock_levels
        with sqlite_dbs.source.begin() as conn:
            conn.execute(sl.update().where(sl.c.id == 1).values(quantity=7, updated_at=utcnow()))
        moved = capture.gate(idle.position)
        assert moved.changed and moved.tables == {"stock_levels"}
        assert statements  # the signatures were read behind the moved gate
    finally:
        capture.close()


def test_what_the_timestamp_path_does_not_see_is_said_not_certified(sqlite_dbs):
    capture = choose_capture(sqlite_dbs.source)
    try:
        first = capture.gate(None)
        sl = src.stock_levels
        with sqlite_dbs.source.begin() as conn:  # a fix made in SQL: updated_at untouched
            conn.execute(sl.update().where(sl.c.id == 1).values(quantity=sl.c.quantity + 1))
        gate = capture.gate(first.position)
        assert not gate.changed
        assert gate.note == "data_version moved: no change by updated_at"
        assert "updated_at" in capture.guarantee
    finally:
        capture.close()
