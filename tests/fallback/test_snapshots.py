"""Plain snapshot functions: streaming writes, retention, the Parquet loader."""

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.fallback import snapshots
from cfi_pipelines.fallback.api_client import CfiApiClient
from cfi_pipelines.fallback.snapshots import (
    SnapshotError,
    list_snapshots,
    parquet_loader,
    prune_snapshots,
    write_snapshot,
)
from cfi_pipelines.views.refresh import swap_in
from cfi_pipelines.views.spec import get_view
from tests.fixtures.http import API_TOKEN


def test_pages_are_written_as_they_come(fake_api, tmp_path, monkeypatch):
    # a small row-group bound proves rows are flushed during the read, not at the end
    monkeypatch.setattr(snapshots, "ROW_GROUP_ROWS", 2000)
    with CfiApiClient(fake_api.url, API_TOKEN, page_size=500) as client:
        snap = write_snapshot(client, "stocks", tmp_path)
    meta = pq.ParquetFile(snap.path).metadata
    assert snap.rows == meta.num_rows == 9984 and snap.pages == 20
    assert meta.num_row_groups == 5
    assert all(meta.row_group(i).num_rows == 2000 for i in range(4))


def test_an_empty_view_gives_an_empty_snapshot_with_the_schema(tmp_path):
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.model import cfi_source

    engine = create_engine(f"sqlite:///{tmp_path / 'empty_source.db'}")
    cfi_source.metadata.create_all(engine)
    with FakeCfiApi(engine, token="t") as api, CfiApiClient(api.url, "t") as client:
        snap = write_snapshot(client, "campaigns", tmp_path / "snaps")
    table = pq.read_table(snap.path)
    assert table.num_rows == 0 and table.column_names == get_view("campaigns").columns


def test_prune_keeps_the_newest_and_clears_stale_temp_files(tmp_path):
    d = tmp_path / "stocks"
    d.mkdir()
    for i in range(4):
        (d / f"stocks_2026010{i}T000000000000Z.parquet").write_bytes(b"x")
    stale, fresh = d / ".stocks_dead.parquet.tmp", d / ".stocks_live.parquet.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 2 * snapshots.STALE_TEMP_S
    os.utime(stale, (old, old))
    prune_snapshots(tmp_path, "stocks", keep=2)
    assert [p.name[7:15] for p in list_snapshots(tmp_path, "stocks")] == ["20260102", "20260103"]
    assert not stale.exists() and fresh.exists()  # a running write is left alone


def test_loader_refuses_a_snapshot_of_another_shape(sqlite_dbs, tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"tenant_id": [1]}), path)
    spec = get_view("campaigns")
    loader = parquet_loader(path, "campaigns", sqlite_dbs.common)
    with pytest.raises(SnapshotError, match="do not match view campaigns"):
        swap_in(spec, sqlite_dbs.common, loader, source="cfi_api", snapshot_at=utcnow())
    with sqlite_dbs.common.connect() as conn:  # the staging table is gone again
        assert not sa.inspect(conn).has_table("cfi_campaigns__staging")
