"""How changes in CFI's source are found: one module per engine behind :mod:`.base`.

:func:`capture_for` picks the mode for a source engine, automatically, and says why:

- SQL Server → Change Tracking (:mod:`.mssql`) when enabled on the database, the
  followed tables and for the reading account; else the timestamp path;
- PostgreSQL → logical decoding (:mod:`.pg_logical`) when ``wal_level=logical`` and the
  account has REPLICATION; else the counter gate (:mod:`.pg_counters`);
- SQLite → ``PRAGMA data_version`` (:mod:`.sqlite`);
- anything else → the timestamp signatures (:mod:`.timestamp`).

The choice costs a few catalog queries, so it is made once per process and source URL
and kept :data:`CHOICE_TTL` (a DBA who enables logical decoding is picked up within
minutes); nothing happens at import.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Sequence

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import (
    Capture,
    CaptureLost,
    CaptureUnavailable,
    ChangeSet,
    Gate,
    RowChange,
)

__all__ = [
    "Capture",
    "CaptureLost",
    "CaptureUnavailable",
    "ChangeSet",
    "Gate",
    "RowChange",
    "capture_for",
    "choose_capture",
]

CHOICE_TTL = 600.0
"""Seconds a process keeps its choice of capture mode for a source URL."""

_chosen: dict[tuple[str, str], tuple[float, Capture]] = {}
_lock = threading.Lock()


def _followed() -> tuple[sa.Table, ...]:
    from cfi_pipelines.views.probe import source_tables  # the views' tables, declared once

    return source_tables()


def choose_capture(
    engine: sa.Engine, tables: Sequence[sa.Table] | None = None, *, slot: str | None = None
) -> Capture:
    """The best capture this engine and account allow (queries the server, no cache)."""
    from cfi_pipelines.views.capture.pg_counters import PgCounterCapture
    from cfi_pipelines.views.capture.pg_logical import PgLogicalCapture, logical_decoding_problem
    from cfi_pipelines.views.capture.sqlite import SqliteCapture
    from cfi_pipelines.views.capture.timestamp import TimestampCapture

    tables = tuple(tables) if tables is not None else _followed()
    dialect = engine.dialect.name
    if dialect == "postgresql":
        if slot is None:
            from cfi_pipelines.settings import get_settings

            slot = get_settings().capture_slot
        with engine.connect() as conn:
            problem = logical_decoding_problem(conn, slot, [t.name for t in tables])
        if problem is None:
            return PgLogicalCapture(
                engine, tables, slot=slot, why=f"wal_level is logical; slot {slot}"
            )
        return PgCounterCapture(engine, tables, why=problem)
    if dialect == "sqlite":
        return SqliteCapture(engine, tables, why="embedded SQLite: PRAGMA data_version gate")
    if dialect == "mssql":
        try:
            mssql = importlib.import_module("cfi_pipelines.views.capture.mssql")
            return mssql.change_tracking_capture(engine, tables)
        except CaptureUnavailable as exc:
            return TimestampCapture(engine, tables, why=str(exc))
        except ImportError:
            pass
    return TimestampCapture(engine, tables, why=f"{dialect}: no change log read here")


def capture_for(engine: sa.Engine, *, slot: str | None = None) -> Capture:
    """The capture of ``engine`` for every followed table, chosen once per process and
    URL (:data:`CHOICE_TTL`). Cheap after the first call."""
    key = (engine.url.render_as_string(hide_password=False), slot or "")
    with _lock:
        hit = _chosen.get(key)
        if hit is not None and time.monotonic() - hit[0] < CHOICE_TTL:
            return hit[1]
    capture = choose_capture(engine, slot=slot)
    with _lock:
        old = _chosen.get(key)
        if old is not None and old[1] is not capture:
            old[1].close()
        _chosen[key] = (time.monotonic(), capture)
    return capture


def forget_captures() -> None:
    """Drop every cached choice (tests; a process that changed its source)."""
    with _lock:
        for _at, capture in _chosen.values():
            capture.close()
        _chosen.clear()
