"""Apply by key: the source's exact row changes → the view rows they affect → recomputed by key.

For an exact capture mode (:mod:`cfi_pipelines.views.capture`: PostgreSQL logical decoding,
SQL Server Change Tracking), a view with a stored position is kept equal to its defining
query without re-reading its tables:

1. the row changes after the view's position (:meth:`Capture.changes`, O(changes));
2. the view keys they affect (:func:`affected_keys`), through the view's declared
   :attr:`~cfi_pipelines.views.spec.ViewSpec.dependencies`: the driving table names its
   key, a child names its parent in the new *and the old* row (a line moved to another
   invoice, or deleted, recomputes both invoices), a dimension row (a product whose price
   changed) is looked up on the source through an index (its stock rows);
3. those keys recomputed on the source with the view's own query restricted to them
   (:meth:`~cfi_pipelines.views.spec.ViewSpec.keyed_query`: key and parent-id indexes);
4. in one short write transaction on the common DB: the affected keys deleted, the
   recomputed rows inserted (so a key the source no longer returns is gone), the status,
   the history and the new position. Replaying the same changes gives the same cache
   (the rows come from the source, not from the changes): idempotent after a crash.
   PostgreSQL → PostgreSQL: the recomputed rows go from the source's ``COPY … TO`` into
   the view's ``COPY … FROM`` in the binary format (:class:`RowStream`, :func:`relay`):
   read by a thread while the old rows are deleted, and written block by block as they
   come; the kept/gone counts come from set sizes, or one indexed count when a batch
   both adds and removes keys (:func:`_kept`).

The batch's Python objects (messages, row images, keys) are made with the garbage
collector paused (:func:`~cfi_pipelines.views.capture.base.gc_paused`): they hold no
cycle, and its scans of tens of thousands of them cost as much as parsing them.

Only after that commit may the capture forget the changes (:meth:`Capture.release`, to
the minimum position of every view). When a change does not carry what its dependency
needs (a delete with only the primary key of a table whose rows name their parent), the
view falls back to the aggregate and delete reconciliation for that batch, said in the
log. A truncate needs a full refresh (:class:`NeedsFullRefresh`).

Cost: O(changes + affected keys) reads on both sides; the fallback is O(table).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import insert_rows
from cfi_pipelines.views.capture.base import Capture, ChangeSet, RowChange, gc_paused
from cfi_pipelines.views.capture.pgoutput import TypedRow
from cfi_pipelines.views.incremental import stale_keys
from cfi_pipelines.views.keys import Dependency, key_predicate, keys_per_query
from cfi_pipelines.views.load import _begin, _binary_select, _count, coalesced
from cfi_pipelines.views.positions import read_positions, write_position
from cfi_pipelines.views.reconcile import deleted_keys
from cfi_pipelines.views.result import DEFAULT_MAX_DROP_SHARE, RefreshRefused, RefreshResult
from cfi_pipelines.views.spec import ViewSpec
from cfi_pipelines.views.status import _record_success, _write_closure

log = logging.getLogger(__name__)

KEYS_PER_QUERY = 400
"""Values per dimension lookup (bound parameters: SQL Server allows 2,100); keyed queries
use :func:`~cfi_pipelines.views.spec.keys_per_query` of the dialect."""


class NeedsFullRefresh(Exception):
    """The changes cannot be applied by key (a followed table was truncated)."""


def _values(image: dict | None, dep: Dependency) -> tuple | None:
    """The dependency's columns from a row image; None when the image lacks one."""
    if image is None:
        return None
    if isinstance(image, TypedRow):  # decoded from the change log: one pass, those columns
        return image.pick(dep.columns)
    if any(c not in image for c in dep.columns):
        return None
    return tuple(image[c] for c in dep.columns)


def affected_keys(
    spec: ViewSpec, changes: Iterable[RowChange], source: sa.Connection
) -> tuple[set[tuple], list[str]]:
    """The view keys ``changes`` affect, and why a reconciliation is needed (empty: none).

    O(changes): dimension lookups go through the source's indexes, a few hundred values
    per query."""
    keys: set[tuple] = set()
    lookups: dict[str, set] = {}
    gaps: dict[str, str] = {}
    deps = {d.table.name: d for d in spec.dependencies}
    for ch in changes:
        dep = deps.get(ch.table)
        if dep is None:
            continue
        if ch.op == "T":
            raise NeedsFullRefresh(f"{ch.table} was truncated")
        images = [ch.new] if ch.op == "I" else [ch.new, ch.old] if ch.op == "U" else [ch.old]
        for image in images:
            vals = _values(image, dep)
            if vals is None:
                gaps[ch.table] = (
                    f"{ch.table}: {ch.op} without the old row's {', '.join(dep.columns)} "
                    "(REPLICA IDENTITY not FULL, or a key-only change log)"
                )
                continue
            if None in vals:
                continue  # e.g. a campaign without operation: no operation row to recompute
            if dep.lookup is None:
                keys.add(vals)
            else:
                lookups.setdefault(dep.table.name, set()).add(vals[0])
    for table, values in lookups.items():
        dep = spec.dependency(table)
        assert dep is not None and dep.lookup is not None
        ordered = sorted(values)
        for i in range(0, len(ordered), KEYS_PER_QUERY):
            chunk = ordered[i : i + KEYS_PER_QUERY]  # products/clients: a few hundred at most
            keys.update(tuple(r) for r in source.execute(dep.lookup, {"values": chunk}))
    return keys, list(gaps.values())


def recompute(spec: ViewSpec, keys: Sequence[tuple], source: sa.Connection) -> list[tuple]:
    """The view rows of ``keys`` computed on the source (missing keys: gone). O(len(keys))."""
    params = spec.params()
    rows: list[tuple] = []
    ordered = sorted(keys)
    step = keys_per_query(source.dialect.name)
    for i in range(0, len(ordered), step):
        q = spec.keyed_query(ordered[i : i + step], source.dialect.name)
        rows.extend(tuple(r) for r in source.execute(q, params))
    return rows


def _copy_out(
    spec: ViewSpec, keys: Sequence[tuple], source: Engine, dialect: sa.Dialect
) -> tuple[str, dict]:
    """The COPY … TO STDOUT (binary) of the view rows of ``keys`` on the source, and its
    parameters (bound by psycopg on the client: COPY takes no server parameters). The
    columns are cast to the view's types, as the full load does."""
    keyed = spec.keyed_query(keys, "postgresql").params(**spec.params())
    q = keyed.compile(dialect=source.dialect).construct_expanded_state()
    typed = _binary_select(q.statement, [spec.table.c[c] for c in spec.columns], dialect)
    return f"COPY ({typed}) TO STDOUT (FORMAT BINARY)", q.parameters


_END_OF_QUERY: Any = object()
_DONE: Any = object()
RELAY_QUEUE_BLOCKS = 32
"""Blocks of :data:`~cfi_pipelines.views.load.COPY_CHUNK_BYTES` a :class:`RowStream` reads ahead at most (4 MB)."""


class RowStream:
    """PostgreSQL → PostgreSQL: the view rows of ``keys`` computed on the source (as
    :func:`recompute`: the view's keyed query) and read as binary ``COPY … TO STDOUT``
    data by a thread, handed to :func:`relay` in blocks through a bounded queue.

    Started before the write transaction: the source computes the rows while the common
    DB deletes the old ones, and the view's ``COPY … FROM`` writes each block as it comes
    (at 10k keys the read, the delete and the insert each took 0.15-0.25 s; one after
    the other, the apply's longest part). Memory: :data:`RELAY_QUEUE_BLOCKS` blocks.
    One ``COPY`` per :func:`keys_per_query` keys: a query, then an end-of-query mark."""

    def __init__(self, spec: ViewSpec, keys: Sequence[tuple], source: Engine, dialect) -> None:
        self.spec, self.keys, self.source, self.dialect = spec, keys, source, dialect
        self._queue: queue.Queue = queue.Queue(maxsize=RELAY_QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="apply-read", daemon=True)

    def __enter__(self) -> RowStream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # a writer that failed: the reader stops at its next block
        self._thread.join()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            step = keys_per_query("postgresql")
            with self.source.connect() as sconn:
                raw = sconn.connection.driver_connection
                for i in range(0, len(self.keys), step):
                    sql, params = _copy_out(
                        self.spec, self.keys[i : i + step], self.source, self.dialect
                    )
                    with raw.cursor() as cur, cur.copy(sql, params) as out:
                        for chunk in coalesced(out):
                            if not self._put(chunk):
                                return
                    if not self._put(_END_OF_QUERY):
                        return
                sconn.rollback()
            self._put(_DONE)
        except BaseException as exc:  # handed to the writer, raised there
            self._put(exc)

    def get(self) -> Any:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def relay(spec: ViewSpec, stream: RowStream, conn: sa.Connection) -> int:
    """Copy ``stream``'s rows into the live view inside ``conn``'s transaction, in the
    binary COPY format, never through Python objects; the rows copied. O(len(keys))."""
    prep = conn.dialect.identifier_preparer
    into_sql = (
        f"COPY {prep.format_table(spec.table)} "
        f"({', '.join(prep.quote(c) for c in spec.columns)}) FROM STDIN (FORMAT BINARY)"
    )
    t_raw = conn.connection.driver_connection
    copied = 0
    while (item := stream.get()) is not _DONE:
        with t_raw.cursor() as tcur:
            with tcur.copy(into_sql) as into:
                while item is not _END_OF_QUERY:
                    into.write(item)
                    item = stream.get()
            copied += tcur.rowcount
    return copied


def _count_keys(conn: sa.Connection, spec: ViewSpec, keys: Sequence[tuple]) -> int:
    """How many of ``keys`` the view holds (unique key index). O(len(keys))."""
    cols = [spec.table.c[k] for k in spec.key]
    step = keys_per_query(conn.dialect.name)
    return sum(
        conn.scalar(
            sa.select(sa.func.count())
            .select_from(spec.table)
            .where(key_predicate(cols, keys[i : i + step], conn.dialect.name))
        )
        or 0
        for i in range(0, len(keys), step)
    )


def _kept(
    conn: sa.Connection,
    spec: ViewSpec,
    keys: Sequence[tuple],
    existing: Sequence[tuple],
    copied: int,
) -> int:
    """How many of the ``existing`` keys the source returned (``copied`` rows, all among
    ``keys``, as ``existing`` is). Known without a query when the source returned every
    key (then all existing ones) or every key existed (then all returned ones); counted
    in the view otherwise (a batch with deletes and inserts both)."""
    if copied == len(keys):
        return len(existing)
    if len(existing) == len(keys):
        return copied
    return _count_keys(conn, spec, existing) if existing and copied else 0


def _pg_to_pg(source: Engine, target: Engine) -> bool:
    return all(
        e.dialect.name == "postgresql" and e.dialect.driver == "psycopg" for e in (source, target)
    )


def _delete_existing(conn: sa.Connection, spec: ViewSpec, keys: Sequence[tuple]) -> set[tuple]:
    """Delete the cached rows of ``keys``; the keys the cache held (unique key index)."""
    cols = [spec.table.c[k] for k in spec.key]
    out: set[tuple] = set()
    step = keys_per_query(conn.dialect.name)
    for i in range(0, len(keys), step):
        where = key_predicate(cols, keys[i : i + step], conn.dialect.name)
        if conn.dialect.name in ("postgresql", "sqlite"):
            found = conn.execute(sa.delete(spec.table).where(where).returning(*cols))
            out.update(tuple(r) for r in found)
        else:
            out.update(tuple(r) for r in conn.execute(sa.select(*cols).where(where)))
            conn.execute(sa.delete(spec.table).where(where))
    return out


def apply_batch(
    spec: ViewSpec,
    capture: Capture,
    batch: ChangeSet,
    source: Engine,
    target: Engine,
    *,
    snapshot_at: datetime,
    started: float,
    closure: list[tuple[int, int, int]],
    watermark: datetime | None,
    last_rows: int | None,
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
) -> RefreshResult:
    """Apply one :class:`ChangeSet` to ``spec``'s view and record ``batch.upto`` with it,
    in one write transaction (see the module docstring)."""
    with source.connect() as sconn:
        keys, gaps = affected_keys(spec, batch.changes, sconn)
    if gaps:
        log.warning(
            "view %s: %s; reconciling the view's aggregates and deleted keys (O(table))",
            spec.name,
            "; ".join(gaps),
        )
        keys |= {(k,) for k in stale_keys(spec, source, target)}
        keys |= {tuple(k) for k in deleted_keys(spec, source, target)}
    ordered = sorted(keys)
    relayed = _pg_to_pg(source, target)
    rows: list[tuple] = []
    if not relayed:  # read before the write transaction opens
        with source.connect() as sconn:
            rows = recompute(spec, ordered, sconn)
    key_index = [spec.columns.index(k) for k in spec.key]
    with ExitStack() as stack:
        stream = None
        if relayed and ordered:  # the source computes the rows while the cache deletes
            stream = stack.enter_context(RowStream(spec, ordered, source, target.dialect))
        return _write_batch(
            spec, capture, batch, target, ordered, rows, stream, key_index,
            snapshot_at=snapshot_at, started=started, closure=closure, watermark=watermark,
            last_rows=last_rows, force=force, max_drop_share=max_drop_share,
        )  # fmt: skip


def _write_batch(
    spec: ViewSpec,
    capture: Capture,
    batch: ChangeSet,
    target: Engine,
    ordered: list[tuple],
    rows: list[tuple],
    stream: RowStream | None,
    key_index: list[int],
    *,
    snapshot_at: datetime,
    started: float,
    closure: list[tuple[int, int, int]],
    watermark: datetime | None,
    last_rows: int | None,
    force: bool,
    max_drop_share: float,
) -> RefreshResult:
    """:func:`apply_batch`'s write transaction on the common DB (see the module docstring)."""
    with _begin(target) as conn:
        count = _count(conn, spec.table) if last_rows is None else last_rows
        existing = sorted(_delete_existing(conn, spec, ordered)) if ordered else []
        if stream is not None:  # straight from the source into the view: count what came back
            loaded = relay(spec, stream, conn)
            kept = _kept(conn, spec, ordered, existing, loaded)
        else:
            returned = {tuple(r[i] for i in key_index) for r in rows}
            loaded, kept = len(rows), len(returned.intersection(existing))
        inserted, gone = loaded - kept, len(existing) - kept
        if gone and not force and gone > max_drop_share * max(count, 1):
            raise RefreshRefused(spec.name, count - gone, count, max_drop_share)  # rolled back
        if stream is None and rows:
            insert_rows(conn, spec.table, rows, spec.columns)
        _write_closure(conn, closure)
        result = RefreshResult(
            view=spec.name,
            mode="apply",
            source="db",
            rows=count + inserted - gone,
            loaded=loaded,
            inserted=inserted,
            updated=kept,
            deleted=gone,
            duration_s=time.perf_counter() - started,
            source_snapshot_at=snapshot_at,
            watermark=watermark,
            capture_mode=capture.mode,
            position=batch.upto,
            changes=len(batch.changes),
            keys=len(ordered),
        )
        _record_success(conn, result, utcnow())
        write_position(conn, spec.name, capture.mode, batch.upto)
    return result


def apply_view(
    spec: ViewSpec,
    capture: Capture,
    source: Engine,
    target: Engine,
    *,
    since: str,
    started: float,
    closure: list[tuple[int, int, int]],
    watermark: datetime | None,
    last_rows: int | None,
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
) -> RefreshResult:
    """Bring ``spec``'s view from ``since`` to the source's current position, batch by
    batch, then let the capture release what every view has applied.

    Raises :class:`~cfi_pipelines.views.capture.base.CaptureLost` (the caller does a full
    refresh) and :class:`NeedsFullRefresh`."""
    total: RefreshResult | None = None
    while True:
        snapshot_at = utcnow()  # before the changes are read: the data is at least this fresh
        with gc_paused():  # the batch's objects are acyclic, freed with it
            batch = capture.changes(since)
            r = apply_batch(
                spec,
                capture,
                batch,
                source,
                target,
                snapshot_at=snapshot_at,
                started=started,
                closure=closure,
                watermark=watermark,
                last_rows=last_rows if total is None else total.rows,
                force=force,
                max_drop_share=max_drop_share,
            )
            since, more = batch.upto, batch.more
            del batch  # its objects freed before the collector is back (nothing left to scan)
        total = r if total is None else _sum(total, r)
        # released after every batch, not only at the end: the next batch's read starts
        # at the slot's position, so a slot left behind would decode this batch again
        capture.release(read_positions(target, capture.mode).values())
        if not more:
            break
    log.info(
        "view %s: applied %d change(s) → %d key(s) (%d inserted, %d updated, %d deleted) up to %s",
        spec.name,
        total.changes,
        total.keys,
        total.inserted,
        total.updated,
        total.deleted,
        total.position,
    )
    return total


def _sum(a: RefreshResult, b: RefreshResult) -> RefreshResult:
    from dataclasses import replace

    return replace(
        b,
        loaded=a.loaded + b.loaded,
        inserted=a.inserted + b.inserted,
        updated=a.updated + b.updated,
        deleted=a.deleted + b.deleted,
        changes=a.changes + b.changes,
        keys=a.keys + b.keys,
    )
