"""Streaming bulk writes, with the fast path each database offers.

PostgreSQL: ``COPY … FROM STDIN`` through psycopg 3. SQL Server: pyodbc's
``fast_executemany`` (set on the engine). Everything else: SQLAlchemy
executemany in bounded batches. Rows are consumed from an iterator in batches,
so memory stays flat whatever the row count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import sqlalchemy as sa

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
