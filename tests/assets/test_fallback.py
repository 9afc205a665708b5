"""Fallback snapshot assets: the fake CFI API over real HTTP, real SQLite/PostgreSQL."""

from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.fallback import (
    build_fallback_asset,
    fallback_key,
    fallback_run_config,
)
from cfi_pipelines.clock import utcnow
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.fallback.api_client import get_api_view
from cfi_pipelines.fallback.snapshots import list_snapshots, read_as_of, snapshot_name
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.resources.cfi_api import CfiApiResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.views.refresh import read_status, refresh_view
from cfi_pipelines.views.spec import get_view
from tests.fixtures.http import API_TOKEN, free_port

AS_OF = (utcnow() - timedelta(hours=1)).replace(microsecond=0)


def run_fallback(view, api_url, common_url, *, swap=True, keep=5, raise_on_error=True):
    spec = get_view(view)
    config = fallback_run_config(view, swap=swap)
    config["ops"][next(iter(config["ops"]))]["config"]["keep"] = keep
    return dg.materialize(
        [build_fallback_asset(spec)],
        resources={
            "cfi_api": CfiApiResource(
                base_url=api_url, token=API_TOKEN, backoff_s=0.01, max_retries=1
            ),
            "cfi_common": DatabaseResource(url=common_url),
        },
        run_config=config,
        raise_on_error=raise_on_error,
    )


def metadata(result, view):
    (mat,) = result.asset_materializations_for_node(f"cfi_fallback__{view}")
    return {k: v.value for k, v in mat.metadata.items()}


def snapshots_root(cfi_home: Path) -> Path:
    return cfi_home / "snapshots"


def test_snapshot_is_written_and_swapped_in(sqlite_dbs, cfi_home):
    refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common)
    with sqlite_dbs.common.connect() as conn:
        from_db = sorted(tuple(r) for r in conn.execute(sa.select(common.cfi_stocks)))
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN, as_of=AS_OF) as api:
        result = run_fallback("stocks", api.url, sqlite_dbs.common_url)
    meta = metadata(result, "stocks")
    assert meta["rows"] == len(from_db) == 9984 and meta["pages"] == 10
    assert meta["swapped"] is True and meta["as_of"] == AS_OF.isoformat() + "Z"
    assert meta["bytes"] > 0 and meta["as_of_lag_s"] >= 3600

    (path,) = list_snapshots(snapshots_root(cfi_home), "stocks")
    assert path.name == snapshot_name("stocks", AS_OF)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    pf = pq.ParquetFile(path)
    assert (
        pf.schema_arrow.remove_metadata() == get_api_view("stocks").arrow_schema().remove_metadata()
    )
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert read_as_of(path) == AS_OF

    status = read_status(sqlite_dbs.common)["stocks"]
    assert status["source"] == "cfi_api" and status["source_snapshot_at"] == AS_OF
    assert status["rows"] == 9984 and status["consecutive_failures"] == 0
    with sqlite_dbs.common.connect() as conn:
        from_api = sorted(tuple(r) for r in conn.execute(sa.select(common.cfi_stocks)))
        log = conn.execute(
            sa.select(common.cfi_refresh_log).order_by(common.cfi_refresh_log.c.id.desc())
        ).first()
    assert from_api == from_db  # the API path gives the very same view
    assert (log.source, log.outcome) == ("cfi_api", "success")


def test_parquet_only_leaves_the_view_alone(sqlite_dbs, cfi_home):
    before = read_status(sqlite_dbs.common)["campaigns"]
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN) as api:
        result = run_fallback("campaigns", api.url, sqlite_dbs.common_url, swap=False)
    assert metadata(result, "campaigns")["swapped"] is False
    assert read_status(sqlite_dbs.common)["campaigns"] == before
    (path,) = list_snapshots(snapshots_root(cfi_home), "campaigns")
    assert pq.read_table(path).num_rows == 10


def test_keeps_the_last_n(sqlite_dbs, cfi_home):
    for i in range(4):
        with FakeCfiApi(
            sqlite_dbs.source, token=API_TOKEN, as_of=AS_OF + timedelta(minutes=i)
        ) as api:
            run_fallback("operations", api.url, sqlite_dbs.common_url, swap=False, keep=2)
    kept = list_snapshots(snapshots_root(cfi_home), "operations")
    assert [read_as_of(p) for p in kept] == [
        AS_OF + timedelta(minutes=2),
        AS_OF + timedelta(minutes=3),
    ]


def test_a_bad_page_writes_nothing_and_touches_nothing(sqlite_dbs, cfi_home):
    refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common)
    before = read_status(sqlite_dbs.common)["stocks"]
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN) as api:
        api.faults.malformed, api.faults.malformed_page = "wrong_type", 7
        result = run_fallback("stocks", api.url, sqlite_dbs.common_url, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    info = failure.step_failure_data.user_failure_data
    assert "view stocks, page 7" in info.description and "field 'tenant_id'" in info.description
    assert info.metadata["page"].value == 7
    directory = snapshots_root(cfi_home) / "stocks"
    assert list(directory.iterdir()) == []  # not even a temp file
    assert read_status(sqlite_dbs.common)["stocks"] == before


def test_unreachable_api_fails_cleanly(sqlite_dbs, cfi_home):
    result = run_fallback(
        "invoices", f"http://127.0.0.1:{free_port()}", sqlite_dbs.common_url, raise_on_error=False
    )
    assert not result.success
    assert list_snapshots(snapshots_root(cfi_home), "invoices") == []


def test_unreachable_common_db_still_writes_the_snapshot(sqlite_dbs, cfi_home):
    dead = f"postgresql+psycopg://u:p@127.0.0.1:{free_port()}/none?connect_timeout=1"
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN) as api:
        result = run_fallback("campaigns", api.url, dead)
    assert metadata(result, "campaigns")["swapped"] is False
    assert len(list_snapshots(snapshots_root(cfi_home), "campaigns")) == 1


def test_asset_shape():
    asset = build_fallback_asset(get_view("stocks"))
    assert asset.key == fallback_key("stocks") == dg.AssetKey(["cfi_fallback", "stocks"])
    assert asset.group_names_by_key[asset.key] == "cfi_fallback"
    assert asset.op.pool == "cfi_view_stocks"


@pytest.mark.postgres
def test_swap_into_postgresql(pg_dbs, cfi_home):
    def rows():
        with pg_dbs.common.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(sa.select(common.cfi_invoices)))

    with FakeCfiApi(pg_dbs.source, token=API_TOKEN, as_of=AS_OF) as api:
        run_fallback("invoices", api.url, pg_dbs.common_url)
    status = read_status(pg_dbs.common)["invoices"]
    assert status["source"] == "cfi_api" and status["rows"] == 1000
    from_api = rows()
    refresh_view(get_view("invoices"), pg_dbs.source, pg_dbs.common, mode="full")
    assert rows() == from_api  # COPY of decimals, dates and booleans from Parquet is exact


def step_failure(result):
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data.user_failure_data


def test_a_future_as_of_is_refused_and_never_becomes_the_snapshot_time(sqlite_dbs, cfi_home):
    refresh_view(get_view("campaigns"), sqlite_dbs.source, sqlite_dbs.common)
    before = read_status(sqlite_dbs.common)["campaigns"]
    future = (utcnow() + timedelta(days=3650)).replace(microsecond=0)
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN, as_of=future) as api:
        result = run_fallback("campaigns", api.url, sqlite_dbs.common_url, raise_on_error=False)
    assert not result.success
    info = step_failure(result)
    assert "view campaigns, page 1" in info.description and "in the future" in info.description
    assert future.isoformat() in info.description
    assert read_status(sqlite_dbs.common)["campaigns"] == before
    assert list(snapshots_root(cfi_home).joinpath("campaigns").iterdir()) == []


def test_duplicate_keys_fail_naming_the_key_and_publish_nothing(sqlite_dbs, cfi_home):
    refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common)
    before = read_status(sqlite_dbs.common)["stocks"]
    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN, as_of=AS_OF) as api:
        api.faults.duplicate_page = 4
        result = run_fallback("stocks", api.url, sqlite_dbs.common_url, raise_on_error=False)
    assert not result.success
    info = step_failure(result)
    assert "view stocks, page 4" in info.description
    assert "duplicate key (product_id=" in info.description
    assert "IntegrityError" not in info.description
    assert list(snapshots_root(cfi_home).joinpath("stocks").iterdir()) == []
    assert read_status(sqlite_dbs.common)["stocks"] == before


def test_a_refused_snapshot_never_becomes_the_latest(sqlite_dbs, cfi_home, tmp_path):
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.fallback.snapshots import list_refused
    from cfi_pipelines.model import cfi_source

    with FakeCfiApi(sqlite_dbs.source, token=API_TOKEN, as_of=AS_OF) as api:
        run_fallback("stocks", api.url, sqlite_dbs.common_url, keep=1)
    (good,) = list_snapshots(snapshots_root(cfi_home), "stocks")

    empty = create_engine(f"sqlite:///{tmp_path / 'empty_source.db'}")
    cfi_source.metadata.create_all(empty)
    later = AS_OF + timedelta(minutes=5)
    with FakeCfiApi(empty, token=API_TOKEN, as_of=later) as api:
        result = run_fallback(
            "stocks", api.url, sqlite_dbs.common_url, keep=1, raise_on_error=False
        )
    assert not result.success
    info = step_failure(result)
    assert "0 rows against 9984 live" in info.description and "refused" in info.description

    # the latest snapshot is still the good one (keep=1 did not prune it), 0 rows apart
    assert list_snapshots(snapshots_root(cfi_home), "stocks") == [good]
    assert read_as_of(good) == AS_OF and pq.ParquetFile(good).metadata.num_rows == 9984
    (refused,) = list_refused(snapshots_root(cfi_home), "stocks")
    assert read_as_of(refused) == later and pq.ParquetFile(refused).metadata.num_rows == 0
    assert str(refused) in info.description
    assert sorted(p.name for p in good.parent.iterdir()) == sorted([good.name, "refused"])
    assert read_status(sqlite_dbs.common)["stocks"]["source_snapshot_at"] == AS_OF
