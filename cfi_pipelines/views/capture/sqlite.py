"""SQLite (the embedded default): ``PRAGMA data_version`` as an O(1) gate, signatures behind it.

``data_version`` changes when *another* connection committed to the file; it means
something only on one connection kept open across ticks. So each process keeps one
read-only connection per source file, opened on the first gate (never at import), and
the first gate of a process is "maybe changed". When it moved, the followed tables'
signatures (:mod:`.timestamp`, O(table)) say which tables changed, as far as
``updated_at`` and the row count can tell: not exact.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import Gate
from cfi_pipelines.views.capture.timestamp import TimestampCapture, compare, signatures


class SqliteCapture(TimestampCapture):
    mode = "sqlite_data_version"
    exact = False
    guarantee = "no commit since the last tick (data_version); changes applied by updated_at"

    def __init__(self, engine: sa.Engine, tables, *, why: str = "") -> None:
        super().__init__(engine, tables, why=why)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._last: tuple[int, str] | None = None  # (data_version, position it vouched for)

    def _data_version(self) -> int:
        if self._conn is None:
            path = Path(self.engine.url.database or "").resolve()
            self._conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=5
            )
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def gate(self, since: str | None) -> Gate:
        """O(1) when nothing was committed since the last gate of this process (one PRAGMA
        on a held connection); otherwise the signatures, O(table)."""
        with self._lock:
            dv = self._data_version()
            if since is not None and self._last == (dv, since):
                return Gate(since, False, frozenset(), "data_version unchanged: no commit")
            with self.engine.connect() as conn:
                gate = compare(since, signatures(conn, self.tables), "data_version moved")
            self._last = (dv, gate.position)
            return gate

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
