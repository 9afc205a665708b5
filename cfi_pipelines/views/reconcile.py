"""Deletes within minutes: find the view rows whose source row is gone, without a full refresh.

An incremental refresh follows ``updated_at``; a deleted row leaves none. Each view
has one row per row of its driving source table (the joins are foreign keys), so
after the incremental upsert the cache holds exactly the source's keys plus the
deleted ones. Finding them costs two indexed ``GROUP BY`` scans, not a key-by-key
comparison of the whole table:

0. compare the totals first: when the cache has no more rows than the driving
   table, nothing was deleted (one count per side, the buckets are skipped);
1. otherwise count the keys per bucket (first key column // :data:`BUCKET`) on both sides,
   each over its key index (the cache's unique key, the source's primary or
   unique key);
2. only the buckets where the cache has more keys than the source are compared
   key by key (both sides read that key range, in key order);
3. the keys the cache has and the source lacks are deleted in one short
   transaction, under the refresh's guard (:func:`cfi_pipelines.views.refresh.refresh_view`):
   a source that suddenly lost more than ``max_drop_share`` of the view's rows is
   refused (``RefreshRefused``), not mirrored.

Deletions balanced by as many insertions that the incremental has not loaded yet
(committed after it read the source) compare equal this time (in the totals, or in a
bucket) and are caught by the next refresh, which loads those insertions.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.views.spec import ViewSpec

BUCKET = 4096
"""Keys per bucket of the first key column: a bucket with a deletion costs one range read."""
DELETE_CHUNK = 400
"""Keys per DELETE statement (below SQL Server's 2,100 parameters, also for two-column keys)."""


def source_key_columns(spec: ViewSpec) -> list[sa.ColumnElement]:
    """The driving table's columns that the view's key columns are selected from."""
    selected = spec.query().selected_columns
    out = []
    for name in spec.key:
        col = selected[name]
        while isinstance(col, sa.Label):
            col = col.element
        if not isinstance(col, sa.Column) or col.table is not spec.driving_table:
            raise ValueError(f"view {spec.name}: key {name} is not a column of its driving table")
        out.append(col)
    return out


def _total(conn: sa.Connection, table: sa.Table) -> int:
    return conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0


def _bucket_counts(conn: sa.Connection, columns: Sequence[sa.ColumnElement]) -> dict[int, int]:
    bucket = (columns[0] // BUCKET).label("bucket")
    rows = conn.execute(sa.select(bucket, sa.func.count()).group_by(bucket))
    return {int(b): int(n) for b, n in rows}


def _keys_in(conn: sa.Connection, columns: Sequence[sa.ColumnElement], b: int) -> set[tuple]:
    first = columns[0]
    q = sa.select(*columns).where(first >= b * BUCKET, first < (b + 1) * BUCKET)
    return {tuple(r) for r in conn.execute(q)}


def deleted_keys(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    cached_rows: int | None = None,
    target_conn: sa.Connection | None = None,
) -> list[tuple]:
    """Keys of the cached view rows whose driving source row no longer exists.

    First the totals (``cached_rows``, the view's row count if the caller has it, and
    the driving table's count): a cache with no more rows than the source has
    nothing to delete, and the two ``GROUP BY`` scans are skipped — the common case
    of a refresh after updates and inserts only.

    ``target_conn``: read the cache through the caller's transaction (which has the
    refresh's upsert in it, not yet committed) rather than a connection of its own.
    """
    theirs = source_key_columns(spec)
    ours = [spec.table.c[k] for k in spec.key]
    with ExitStack() as stack:
        sconn = stack.enter_context(source.connect())
        tconn = target_conn or stack.enter_context(target.connect())
        if cached_rows is None:
            cached_rows = _total(tconn, spec.table)
        if cached_rows <= _total(sconn, spec.driving_table):
            return []
        cached = _bucket_counts(tconn, ours)
        present = _bucket_counts(sconn, theirs)
        suspects = sorted(b for b, n in cached.items() if n > present.get(b, 0))
        gone: list[tuple] = []
        for b in suspects:
            gone += sorted(_keys_in(tconn, ours, b) - _keys_in(sconn, theirs, b))
    return gone


def delete_keys(conn: sa.Connection, spec: ViewSpec, keys: Sequence[tuple]) -> int:
    """Delete the view rows of ``keys`` (inside the caller's transaction); rows deleted."""
    cols = [spec.table.c[k] for k in spec.key]
    deleted = 0
    for i in range(0, len(keys), DELETE_CHUNK):
        chunk = keys[i : i + DELETE_CHUNK]
        if len(cols) == 1:
            where = cols[0].in_([k[0] for k in chunk])
        else:  # no row-value IN on SQL Server: an OR of ANDs, still on the unique key index
            where = sa.or_(
                *(sa.and_(*(c == v for c, v in zip(cols, k, strict=True))) for k in chunk)
            )
        deleted += conn.execute(sa.delete(spec.table).where(where)).rowcount or 0
    return deleted
