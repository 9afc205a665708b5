"""The validated-campaigns sensor: new campaigns, new revisions, nothing new, 10k rows."""

from __future__ import annotations

from datetime import datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, valid_content
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.campaigns import MAX_RUNS_PER_TICK, build_campaigns_sensor

T0 = datetime(2030, 1, 1, 12, 0)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    yield url, engine
    engine.dispose()


@pytest.fixture
def sensor():
    return build_campaigns_sensor()


def tick(sensor, url, cursor=None, instance=None):
    context = dg.build_sensor_context(
        cursor=cursor,
        instance=instance or dg.DagsterInstance.ephemeral(),
        resources={"mycfia": DatabaseResource(url=url)},
    )
    result = sensor(context)
    return result


def batch_campaigns(request) -> list[int]:
    """The campaign ids a run request exports (a batch's config, or its partition)."""
    if request.job_name == "campaign_export_batch":
        return request.run_config["ops"]["export_campaign_batch"]["config"]["campaigns"]
    return [int(request.partition_key)]


def keys(result) -> list[str]:
    return [r.run_key for r in result.run_requests or []]


def test_new_campaigns_then_nothing_then_new_revision(db, sensor):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 1, updated_at=T0)
        add_campaign(conn, 2, updated_at=T0 + timedelta(seconds=1))
        add_campaign(conn, 3, status="draft", updated_at=T0 + timedelta(seconds=2))
    first = tick(sensor, url)
    assert keys(first) == ["1:r1", "2:r1"]
    assert [r.partition_key for r in first.run_requests] == ["1", "2"]
    (add,) = first.dynamic_partitions_requests
    assert add.partitions_def_name == "campaigns" and sorted(add.partition_keys) == ["1", "2"]

    nothing = tick(sensor, url, first.cursor)
    assert keys(nothing) == [] and nothing.skip_reason is not None

    with engine.begin() as conn:  # campaign 1 edited and validated again; 3 validated
        add_campaign(conn, 1, revision=2, updated_at=T0 + timedelta(seconds=10))
        add_campaign(conn, 3, updated_at=T0 + timedelta(seconds=11))
    third = tick(sensor, url, nothing.cursor)
    assert keys(third) == ["1:r2", "3:r1"]


def test_late_commit_inside_the_overlap_is_caught_once(db, sensor):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 1, updated_at=T0 + timedelta(seconds=30))
    first = tick(sensor, url)
    with engine.begin() as conn:  # committed after the tick, stamped before it
        add_campaign(conn, 2, updated_at=T0 + timedelta(seconds=5))
    second = tick(sensor, url, first.cursor)
    assert keys(second) == ["2:r1"]
    assert keys(tick(sensor, url, second.cursor)) == []


@pytest.mark.parametrize("settled", ["delivered", "rejected"])
def test_settled_revisions_are_not_requested_again(db, sensor, settled):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 1, updated_at=T0)
        add_campaign(conn, 2, updated_at=T0)
        for cid, status in ((1, settled), (2, "failed")):
            conn.execute(
                sa.insert(mycfia.campaign_exports).values(
                    campaign_id=cid,
                    revision=1,
                    status=status,
                    attempts=1,
                    requested_at=T0,
                    updated_at=T0,
                )
            )
    # a failed delivery is not settled: a fresh sensor requests it again
    assert keys(tick(sensor, url)) == ["2:r1"]


def test_ten_thousand_campaigns_drain_in_bounded_batches_then_only_new_ones(db, sensor):
    # the seconds per tick are measured in benchmarks/sensor_ticks.py, not here
    url, engine = db
    content = sa.literal(__import__("json").dumps(valid_content()))
    rows = [
        {
            "id": i,
            "tenant_id": 1,
            "tenant_code": "T001",
            "name": f"C{i}",
            "channel": "email",
            "status": "validated",
            "revision": 1,
            "validated_at": T0,
            "content": content.value,
            "created_at": T0,
            "updated_at": T0 + timedelta(milliseconds=i),
        }
        for i in range(1, 10_001)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaigns), rows)
    cursor = None
    requested: list[int] = []
    for _ in range(30):  # drain the backlog, batch by batch
        result = tick(sensor, url, cursor)
        cursor = result.cursor
        if not result.run_requests:
            break
        # a burst is exported by batch runs (campaign ids in their config)
        campaigns = [c for r in result.run_requests for c in batch_campaigns(r)]
        assert len(campaigns) <= MAX_RUNS_PER_TICK
        requested += campaigns
    assert sorted(requested) == list(range(1, 10_001))  # each exactly once
    with engine.begin() as conn:
        add_campaign(conn, 10_001, updated_at=T0 + timedelta(seconds=60))
    result = tick(sensor, url, cursor)
    assert keys(result) == ["10001:r1"]
