"""Fallback snapshots: a whole view pulled from the CFI API into a Parquet file.

Plain functions, no Dagster. Pages are converted and written as they arrive
(bounded row groups), so memory stays flat whatever the view's size. The file
is written under a temporary name and renamed only once the last page is in:
a failed read leaves no snapshot behind, never a partial one under a final name.
The snapshot is then swapped into the common DB by the refresh engine's atomic
swap, streamed back from the Parquet file in batches.

"The latest snapshot" (:func:`list_snapshots`) is always the last *good* one: a
snapshot to be swapped in is written with ``publish=False`` under a hidden pending
name (``.<view>_<as_of>.parquet.<random>.pending``), and gets its final name only once the
swap is accepted (:func:`publish_snapshot`). One that the swap refuses (the row-count
guard's ``RefreshRefused``) or fails is moved to ``<view>/refused/``
(:func:`refuse_snapshot`), kept there for inspection but never read as the latest,
and pruned like the published ones.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import BATCH_ROWS, insert_rows, write_transaction
from cfi_pipelines.fallback.api_client import CfiApiClient, get_api_view
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.views.refresh import Loader

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 64_000
"""Rows buffered before a row group is written (bounds memory, keeps row groups useful)."""
COMPRESSION = "zstd"
STALE_TEMP_S = 3600
"""Temporary files older than this are leftovers of a killed run."""
AS_OF_FORMAT = "%Y%m%dT%H%M%S%fZ"


class SnapshotError(Exception):
    """A snapshot file that does not match its view."""


@dataclass(frozen=True)
class Snapshot:
    view: str
    path: Path
    rows: int
    pages: int
    bytes: int  # size of the Parquet file
    api_bytes: int  # bytes received from the API
    retries: int
    as_of: datetime  # naive UTC: the time the data is as of (oldest page's as_of)
    duration_s: float


REFUSED_DIR = "refused"


def snapshot_dir(root: Path, view: str) -> Path:
    return root / view


def refused_dir(root: Path, view: str) -> Path:
    """Where snapshots the swap refused are kept apart (never read as the latest)."""
    return snapshot_dir(root, view) / REFUSED_DIR


def snapshot_name(view: str, as_of: datetime) -> str:
    """``<view>_<as_of>.parquet``; names sort in time order."""
    return f"{view}_{as_of.strftime(AS_OF_FORMAT)}.parquet"


def _listed(directory: Path, view: str) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{view}_*.parquet") if p.is_file())


def list_snapshots(root: Path, view: str) -> list[Path]:
    """The view's published (good) snapshots, oldest first: the last is the latest."""
    return _listed(snapshot_dir(root, view), view)


def list_refused(root: Path, view: str) -> list[Path]:
    """The view's refused snapshots, oldest first."""
    return _listed(refused_dir(root, view), view)


def prune_snapshots(root: Path, view: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots, published and refused alike (and stale
    temp/pending files); returns the deleted."""
    removed = []
    cut = -keep if keep > 0 else None
    for path in list_snapshots(root, view)[:cut] + list_refused(root, view)[:cut]:
        path.unlink(missing_ok=True)
        removed.append(path)
    directory = snapshot_dir(root, view)
    if directory.is_dir():
        for pattern in (f".{view}_*.tmp", f".{view}_*.pending"):
            for tmp in directory.glob(pattern):
                if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    client: CfiApiClient,
    view: str,
    root: Path,
    *,
    keep: int = 5,
    compression: str = COMPRESSION,
    publish: bool = True,
) -> Snapshot:
    """Pull the whole of ``view`` from the API into ``root/<view>/<view>_<as_of>.parquet``.

    ``publish=False``: the file is left under a hidden pending name (not listed, not
    pruned); the caller then calls :func:`publish_snapshot` once the swap is accepted,
    or :func:`refuse_snapshot`.

    Raises the client's :class:`~cfi_pipelines.fallback.api_client.CfiApiError` on any bad or
    missing page, after removing the temporary file.
    """
    started = time.perf_counter()
    mapping = get_api_view(view)
    schema = mapping.arrow_schema()
    directory = snapshot_dir(root, view)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{view}_{secrets.token_hex(4)}.parquet.tmp"
    rows = pages = api_bytes = 0
    as_of: datetime | None = None
    buffer: list[tuple] = []

    def flush(writer: pq.ParquetWriter) -> None:
        if not buffer:
            return
        columns = list(zip(*buffer, strict=True))
        arrays = [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)]
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        buffer.clear()

    try:
        with pq.ParquetWriter(tmp, schema, compression=compression) as writer:
            for page in client.iter_pages(view):
                pages += 1
                api_bytes += page.bytes
                as_of = page.as_of if as_of is None else min(as_of, page.as_of)
                buffer.extend(page.rows)
                rows += len(page.rows)
                if len(buffer) >= ROW_GROUP_ROWS:
                    flush(writer)
            flush(writer)
            assert as_of is not None  # iter_pages yields at least one page or raises
            writer.add_key_value_metadata({"cfi.as_of": as_of.isoformat(), "cfi.rows": str(rows)})
        with open(tmp, "rb+") as fh:  # durable before it gets its final name
            os.fsync(fh.fileno())
        name = snapshot_name(view, as_of)
        if not publish:  # hidden: neither listed nor pruned until accepted
            name = f".{name}.{secrets.token_hex(4)}.pending"
        final = directory / name
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if publish:
        prune_snapshots(root, view, max(1, keep))  # never the snapshot just written
    return Snapshot(
        view=view,
        path=final,
        rows=rows,
        pages=pages,
        bytes=final.stat().st_size,
        api_bytes=api_bytes,
        retries=client.stats.retries,
        as_of=as_of,
        duration_s=time.perf_counter() - started,
    )


def _move(snap: Snapshot, directory: Path) -> Snapshot:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / snapshot_name(snap.view, snap.as_of)
    os.replace(snap.path, final)
    _fsync_dir(directory)
    return replace(snap, path=final)


def publish_snapshot(snap: Snapshot, root: Path, *, keep: int = 5) -> Snapshot:
    """Give a pending snapshot (``write_snapshot(publish=False)``) its final name: it
    becomes the latest. Prunes to ``keep``. A published one is returned as is."""
    if not snap.path.name.endswith(".pending"):
        return snap
    out = _move(snap, snapshot_dir(root, snap.view))
    prune_snapshots(root, snap.view, max(1, keep))
    return out


def refuse_snapshot(snap: Snapshot, root: Path, *, keep: int = 5) -> Snapshot:
    """Move a snapshot the swap refused (or failed on) to ``<view>/refused/``: kept for
    inspection, never read as the latest. Prunes to ``keep``."""
    out = _move(snap, refused_dir(root, snap.view))
    prune_snapshots(root, snap.view, max(1, keep))
    return out


def read_as_of(path: Path) -> datetime | None:
    """The ``as_of`` recorded in a snapshot's metadata."""
    meta = pq.ParquetFile(path).metadata.metadata or {}  # the file footer's key-values
    raw = meta.get(b"cfi.as_of")
    return datetime.fromisoformat(raw.decode()) if raw else None


def parquet_loader(path: Path, view: str, target: Engine) -> Loader:
    """A loader for :func:`cfi_pipelines.views.refresh.swap_in` that streams ``path`` into staging."""
    columns = get_api_view(view).columns

    def load(staging: sa.Table) -> int:
        pf = pq.ParquetFile(path)
        if pf.schema_arrow.names != columns:
            raise SnapshotError(
                f"snapshot {path.name}: columns {pf.schema_arrow.names} do not match view "
                f"{view} ({columns}); it was written by another version, take a new one"
            )

        def rows():
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                yield from zip(*(col.to_pylist() for col in batch.columns), strict=True)

        with write_transaction(target) as conn:
            return insert_rows(conn, staging, rows(), columns)

    return load


def log_snapshot_attempt(
    engine: sa.Engine,
    view: str,
    *,
    started_at: datetime,
    outcome: str,
    rows: int | None = None,
    error: str | None = None,
) -> bool:
    """Record a fallback snapshot that was not swapped in (Parquet only, or failed at the API)
    in ``cfi_refresh_log`` (``mode='snapshot'``, ``source='cfi_api'``), so the fallback KPI
    counts every attempt. ``source_snapshot_at`` stays empty: the view's data did not change,
    so the freshness KPI ignores the row. Best effort (the common DB may be the thing that is
    down): False when it could not be written."""
    now = utcnow()
    try:
        with write_transaction(engine) as conn:
            conn.execute(
                common.cfi_refresh_log.insert().values(
                    view=view,
                    started_at=started_at,
                    finished_at=now,
                    mode="snapshot",
                    source="cfi_api",
                    outcome=outcome,
                    rows=rows,
                    duration_s=(now - started_at).total_seconds(),
                    error=error[:4000] if error else None,
                )
            )
    except sa.exc.SQLAlchemyError:
        return False
    return True
