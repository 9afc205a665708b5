"""Engines for the three databases, write transactions and streaming bulk writes.

SQLite runs in WAL mode with a busy timeout so that MyCfia's readers never wait
on a refresh; SQL Server gets ``fast_executemany``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from itertools import islice
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

WRITE_OPTION = "cfi_write"


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Let SQLAlchemy issue BEGIN itself (pysqlite's implicit transactions defer it,
    # which breaks "BEGIN IMMEDIATE" and DDL inside a transaction).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    _ensure_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _ensure_wal(cur, attempts: int = 50) -> None:
    """Switch the file to WAL once (it is persistent). Several processes opening a
    new file at once race for the switch, which needs the file to themselves and
    fails with "database is locked" rather than waiting: whoever loses re-reads the
    mode and finds WAL set by the winner."""
    for attempt in range(attempts):
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return  # switched, or a database that cannot be WAL (":memory:")
        except sqlite3.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))  # back off: the other opener is mid-switch


def _sqlite_on_begin(conn) -> None:
    # A deferred transaction that reads and then writes fails at once with
    # "database is locked" (no busy wait) if another process committed in between;
    # write transactions therefore take the write lock up front.
    immediate = conn.get_execution_options().get(WRITE_OPTION)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: str) -> Engine:
    """An engine for ``url`` (any SQLAlchemy URL), tuned per dialect."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # uri=True lets the refresh ATTACH CFI's source read-only ("file:…?mode=ro");
        # plain paths keep working.
        engine = sa.create_engine(parsed, connect_args={"timeout": 30, "uri": True})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "mssql":
        return sa.create_engine(parsed, fast_executemany=True, pool_pre_ping=True)
    if backend == "postgresql" and parsed.get_driver_name() in ("psycopg2", "default"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True)


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One shared engine per URL in a process (connections are pooled)."""
    return create_engine(url)


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by whoever uses it
        return "<unparsable URL>"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """``engine.begin()`` for a transaction that writes.

    On SQLite it starts with ``BEGIN IMMEDIATE`` so that concurrent writers (four
    refresh steps in parallel processes, export runs) queue on the busy timeout
    instead of failing; on other databases it is a plain transaction.
    """
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            yield conn


# --------------------------------------------------------------------------- bulk writes
# Streaming bulk writes, with the fast path each database offers.
#
# PostgreSQL: ``COPY … FROM STDIN`` through psycopg 3. SQL Server: pyodbc's
# ``fast_executemany`` (set on the engine). Everything else: SQLAlchemy
# executemany in bounded batches. Rows are consumed from an iterator in batches,
# so memory stays flat whatever the row count.

BATCH_ROWS = 10_000


def batched(rows: Iterable[Sequence], size: int = BATCH_ROWS) -> Iterator[list[Sequence]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _quoted(conn: sa.Connection, table: sa.Table) -> str:
    prep = conn.dialect.identifier_preparer
    return prep.format_table(table)


def copy_into_postgres(
    conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: Iterable[Sequence]
) -> int:
    """COPY ``rows`` into ``table`` on a psycopg 3 connection (inside ``conn``'s transaction)."""
    prep = conn.dialect.identifier_preparer
    cols = ", ".join(prep.quote(c) for c in columns)
    raw = conn.connection.driver_connection
    n = 0
    with raw.cursor() as cur, cur.copy(f"COPY {_quoted(conn, table)} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def insert_rows(
    conn: sa.Connection,
    table: sa.Table,
    rows: Iterable[Sequence],
    columns: Sequence[str] | None = None,
) -> int:
    """Insert tuples in ``columns`` order (default: all table columns); returns the count."""
    columns = list(columns or [c.name for c in table.columns])
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        return copy_into_postgres(conn, table, columns, rows)
    stmt = table.insert()
    n = 0
    for chunk in batched(rows):
        conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in chunk])
        n += len(chunk)
    return n
