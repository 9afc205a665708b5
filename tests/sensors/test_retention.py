"""campaign_partitions_retention: the 'campaigns' partitions stay bounded, nothing unsettled goes."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.utils import make_new_run_id

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.campaigns import build_campaigns_sensor
from cfi_pipelines.sensors.retention import RETENTION, build_retention_sensor

NOW = datetime(2030, 6, 1, 12, 0)
OLD = NOW - RETENTION - timedelta(days=1)
RECENT = NOW - timedelta(days=1)
NAME = "campaigns"


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    yield url, engine
    engine.dispose()


@pytest.fixture
def test_instance():
    with dg.instance_for_test() as instance:
        yield instance


def export_row(conn, cid, status, at, *, revision=1, **values):
    conn.execute(
        sa.insert(mycfia.campaign_exports).values(
            campaign_id=cid,
            revision=revision,
            status=status,
            attempts=1,
            requested_at=at,
            updated_at=at,
            delivered_at=at if status == "delivered" else None,
            **values,
        )
    )


def tick(sensor, url, instance, cursor=None):
    context = dg.build_sensor_context(
        cursor=cursor, instance=instance, resources={"mycfia": DatabaseResource(url=url)}
    )
    return sensor(context)


def deleted(result) -> list[str]:
    keys = []
    for request in result.dynamic_partitions_requests or []:
        assert isinstance(request, dg.DeleteDynamicPartitionsRequest)
        assert request.partitions_def_name == NAME
        keys += request.partition_keys
    return keys


def apply(result, instance) -> None:
    """What the sensor daemon does with the tick's delete requests."""
    for key in deleted(result):
        instance.delete_dynamic_partition(NAME, key)


def test_removes_only_old_settled_partitions(db, test_instance):
    url, engine = db
    with engine.begin() as conn:
        for cid in range(1, 10):
            add_campaign(conn, cid, updated_at=OLD)
        add_campaign(conn, 8, revision=2, updated_at=OLD)  # r2 validated, not exported yet
        add_campaign(conn, 9, updated_at=RECENT)  # edited recently (then settled again)
        export_row(conn, 1, "delivered", OLD)
        export_row(conn, 2, "rejected", OLD, error="/budget: required")
        export_row(conn, 3, "delivered", RECENT)
        export_row(conn, 4, "pending", OLD)
        export_row(
            conn, 5, "failed", OLD, failure_kind="transient", transient_failures=1,
            next_attempt_at=OLD + timedelta(minutes=1),
        )  # fmt: skip
        export_row(conn, 6, "failed", OLD, failure_kind="permanent")
        # 7: no export yet (its run is about to start)
        export_row(conn, 8, "delivered", OLD)
        export_row(conn, 9, "delivered", OLD)
        export_row(conn, 10, "delivered", OLD)  # campaign gone from MyCfia
        export_row(conn, 11, "failed", OLD - timedelta(days=1), revision=1)
        export_row(conn, 11, "delivered", OLD, revision=2)  # the latest revision counts
    test_instance.add_dynamic_partitions(NAME, [str(i) for i in range(1, 12)] + ["adhoc"])
    sensor = build_retention_sensor(clock=lambda: NOW)

    result = tick(sensor, url, test_instance)
    assert sorted(deleted(result), key=int) == ["1", "2", "10", "11"]
    apply(result, test_instance)
    assert test_instance.get_dynamic_partitions(NAME) == [*"3456789", "adhoc"]

    again = tick(sensor, url, test_instance, result.cursor)
    assert deleted(again) == [] and "8 'campaigns' partitions" in again.skip_reason.skip_message


def test_a_run_in_flight_keeps_its_partition(db, test_instance):
    url, engine = db
    with engine.begin() as conn:
        for cid in (1, 2):
            add_campaign(conn, cid, updated_at=OLD)
            export_row(conn, cid, "delivered", OLD)
    test_instance.add_dynamic_partitions(NAME, ["1", "2"])
    for status in (DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS):
        key = "1" if status == DagsterRunStatus.STARTED else "2"
        test_instance.add_run(
            DagsterRun(
                job_name="campaign_export",
                run_id=make_new_run_id(),
                status=status,
                tags={"dagster/partition": key},
            )
        )
    result = tick(build_retention_sensor(clock=lambda: NOW), url, test_instance)
    assert deleted(result) == ["2"]  # a finished run does not hold its partition


def test_bounded_batches_until_everything_old_is_gone(db, test_instance):
    url, engine = db
    with engine.begin() as conn:
        for cid in range(1, 51):
            export_row(conn, cid, "delivered", OLD)
        export_row(conn, 51, "pending", OLD)
    test_instance.add_dynamic_partitions(NAME, [str(i) for i in range(1, 52)])
    sensor = build_retention_sensor(clock=lambda: NOW, batch=20)
    sizes, cursor = [], None
    for _ in range(5):
        result = tick(sensor, url, test_instance, cursor)
        sizes.append(len(deleted(result)))
        apply(result, test_instance)
        cursor = result.cursor
    assert sizes == [20, 20, 10, 0, 0]
    assert test_instance.get_dynamic_partitions(NAME) == ["51"]


def test_hard_cap_removes_the_oldest_settled_whatever_their_age(db, test_instance):
    url, engine = db
    with engine.begin() as conn:
        for cid in range(1, 31):
            export_row(conn, cid, "delivered", RECENT)
        for cid in range(31, 36):
            export_row(conn, cid, "pending", RECENT)
    test_instance.add_dynamic_partitions(NAME, [str(i) for i in range(31, 36)])
    test_instance.add_dynamic_partitions(NAME, [str(i) for i in range(1, 31)])
    sensor = build_retention_sensor(clock=lambda: NOW, max_partitions=10)
    result = tick(sensor, url, test_instance)
    assert deleted(result) == [str(i) for i in range(1, 26)]
    apply(result, test_instance)
    left = test_instance.get_dynamic_partitions(NAME)
    assert left == ["31", "32", "33", "34", "35", "26", "27", "28", "29", "30"]
    # at the cap: nothing more (the pending ones are never removed, even above it)
    assert deleted(tick(sensor, url, test_instance, result.cursor)) == []
    assert deleted(tick(build_retention_sensor(clock=lambda: NOW, max_partitions=2), url,
                        test_instance)) == ["26", "27", "28", "29", "30"]  # fmt: skip


def test_a_backfill_in_progress_skips_the_tick(db, test_instance):
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

    url, engine = db
    with engine.begin() as conn:
        export_row(conn, 1, "delivered", OLD)
    test_instance.add_dynamic_partitions(NAME, ["1"])
    test_instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id="bf1",
            asset_graph=dg.Definitions(
                assets=[dg.AssetSpec("x", partitions_def=dg.DynamicPartitionsDefinition(name=NAME))]
            ).resolve_asset_graph(),
            backfill_timestamp=0.0,
            tags={},
            asset_selection=[dg.AssetKey("x")],
            partition_names=["1"],
            dynamic_partitions_store=test_instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=None,
        ).with_status(BulkActionStatus.REQUESTED)
    )
    result = tick(build_retention_sensor(clock=lambda: NOW), url, test_instance)
    assert deleted(result) == [] and "backfill" in result.skip_reason.skip_message


def test_a_pruned_campaign_gets_its_partition_back_from_the_campaigns_sensor(db, test_instance):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 1, updated_at=OLD)
        export_row(conn, 1, "delivered", OLD)
    test_instance.add_dynamic_partitions(NAME, ["1"])
    apply(tick(build_retention_sensor(clock=lambda: NOW), url, test_instance), test_instance)
    assert test_instance.get_dynamic_partitions(NAME) == []

    with engine.begin() as conn:  # edited and validated again, a year later
        add_campaign(conn, 1, revision=2, updated_at=NOW)
    result = tick(build_campaigns_sensor(), url, test_instance)
    assert [r.run_key for r in result.run_requests] == ["1:r2"]
    (add,) = result.dynamic_partitions_requests
    assert isinstance(add, dg.AddDynamicPartitionsRequest)
    assert add.partitions_def_name == NAME and list(add.partition_keys) == ["1"]


def test_a_pruned_campaign_is_re_exported_by_the_cli(tmp_path: Path, monkeypatch):
    from cfi_pipelines.definitions import build_defs
    from cfi_pipelines.devtools.sftp_server import DevSFTPServer
    from cfi_pipelines.ops.runs import run_export

    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    server = DevSFTPServer(port=0)
    monkeypatch.setenv("CFI_SFTP_PORT", str(server.port))
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    e = mycfia.campaign_exports.c
    try:
        with engine.begin() as conn:
            add_campaign(conn, 42, tenant_code="T042")
        defs = build_defs()
        first = run_export(42, defs=defs)
        assert first.code == 0, first.message
        with engine.begin() as conn:  # a year passes
            conn.execute(sa.update(mycfia.campaign_exports).values(updated_at=OLD))
            conn.execute(sa.update(mycfia.campaigns).values(updated_at=OLD))
        instance = dg.DagsterInstance.get()
        assert instance.get_dynamic_partitions(NAME) == ["42"]
        apply(tick(build_retention_sensor(clock=lambda: NOW), url, instance), instance)
        assert instance.get_dynamic_partitions(NAME) == []

        again = run_export(42, force=True, defs=defs)
        assert again.code == 0, again.message
        assert instance.get_dynamic_partitions(NAME) == ["42"]
        assert instance.get_run_by_id(again.run_id).tags["dagster/partition"] == "42"
        with engine.connect() as conn:
            row = conn.execute(sa.select(e.status, e.attempts)).one()
        assert tuple(row) == ("delivered", 2)
        assert (server.paths.root / "T042" / "campaign_42_r1.manifest.json").exists()
    finally:
        server.stop()
        engine.dispose()
