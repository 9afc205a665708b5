"""Automatic re-tries of deliveries that failed while SFTP was down (defect D2).

A final *transient* failure gets a ``next_attempt_at`` with backoff across runs; the
validated-campaigns sensor requests a new run (run key ``<id>:r<rev>:retry<k>``) once
it is due, and not before; a permanent failure is never re-tried; the re-tries are
bounded; a re-try that succeeds ends ``delivered``. Time is driven by the sensor's
``clock`` and the ``next_attempt_at`` stored in the DB, never by sleeping.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.exports import campaigns_partitions, export_assets
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.exports.records import (
    MAX_AUTO_RETRIES,
    PERMANENT,
    TRANSIENT,
    record_delivered,
    record_export,
    record_failed_attempt,
    retry_delay,
)
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.sensors.campaigns import MAX_RETRY_RUNS_PER_TICK, build_campaigns_sensor

T0 = datetime(2030, 1, 1, 12, 0)
SECOND = timedelta(seconds=1)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    yield url, engine
    engine.dispose()


def tick(url, now: datetime, cursor=None):
    sensor = build_campaigns_sensor(clock=lambda: now)
    context = dg.build_sensor_context(
        cursor=cursor,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"mycfia": DatabaseResource(url=url)},
    )
    return sensor(context)


def keys(result) -> list[str]:
    return [r.run_key for r in result.run_requests or []]


def row_of(engine, campaign_id: int, revision: int = 1):
    t = mycfia.campaign_exports
    with engine.connect() as conn:
        return conn.execute(
            sa.select(t).where((t.c.campaign_id == campaign_id) & (t.c.revision == revision))
        ).one()


def built(engine, campaign_id: int, revision: int = 1) -> None:
    """What ``campaign_files`` records before a delivery: a pending row."""
    with engine.begin() as conn:
        record_export(conn, campaign_id, revision, status="pending", error=None)


def fail(engine, campaign_id: int, kind=TRANSIENT, revision: int = 1):
    with engine.begin() as conn:
        return record_failed_attempt(
            conn, campaign_id, revision, "SFTP down", final=True, kind=kind
        )


def seen_cursor(url) -> str:
    """A cursor past the campaigns already in the DB (their first run was requested)."""
    return tick(url, utcnow()).cursor


def test_backoff_doubles_from_one_minute_up_to_an_hour_then_stops():
    minutes = [retry_delay(k) / timedelta(minutes=1) for k in range(1, MAX_AUTO_RETRIES + 1)]
    assert minutes[:8] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert max(minutes) == 60
    # the re-tries span a day-long SFTP outage, then stop
    assert sum(minutes) >= 24 * 60
    assert retry_delay(MAX_AUTO_RETRIES + 1) is None
    assert retry_delay(0) is None


def test_transient_failure_is_retried_after_its_backoff_and_not_before(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 1, updated_at=T0)
    cursor = seen_cursor(url)
    built(engine, 1)
    before = utcnow()
    due = fail(engine, 1)
    row = row_of(engine, 1)
    assert (row.status, row.failure_kind, row.transient_failures) == ("failed", TRANSIENT, 1)
    assert row.next_attempt_at == due
    assert before + timedelta(minutes=1) <= due <= utcnow() + timedelta(minutes=1)

    assert keys(tick(url, due - SECOND, cursor)) == []
    result = tick(url, due, cursor)
    assert keys(result) == ["1:r1:retry1"]
    (request,) = result.run_requests
    assert request.partition_key == "1" and request.tags["cfi/retry"] == "1"
    (add,) = result.dynamic_partitions_requests
    assert list(add.partition_keys) == ["1"]
    # still due until the re-try run records something: the same run key, which
    # Dagster dedupes, so one run per round
    assert keys(tick(url, due + timedelta(minutes=5), result.cursor)) == ["1:r1:retry1"]

    # the re-try run fails again (SFTP still down): twice the wait, a new round
    built(engine, 1)
    assert keys(tick(url, due + timedelta(hours=1), cursor)) == []  # pending: in flight
    second = fail(engine, 1)
    assert timedelta(minutes=2) - SECOND <= second - utcnow() <= timedelta(minutes=2)
    assert row_of(engine, 1).transient_failures == 2
    assert keys(tick(url, second - SECOND, cursor)) == []
    assert keys(tick(url, second, cursor)) == ["1:r1:retry2"]


def test_permanent_failure_is_never_retried(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 2, updated_at=T0)
    cursor = seen_cursor(url)
    built(engine, 2)
    assert fail(engine, 2, kind=PERMANENT) is None
    row = row_of(engine, 2)
    assert (row.status, row.failure_kind, row.next_attempt_at) == ("failed", PERMANENT, None)
    assert keys(tick(url, utcnow() + timedelta(days=30), cursor)) == []


def test_permanent_failure_after_transient_ones_cancels_the_retry(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 3, updated_at=T0)
    cursor = seen_cursor(url)
    built(engine, 3)
    assert fail(engine, 3) is not None
    built(engine, 3)
    fail(engine, 3, kind=PERMANENT)  # e.g. the server came back with another host key
    row = row_of(engine, 3)
    assert (row.failure_kind, row.next_attempt_at) == (PERMANENT, None)
    assert keys(tick(url, utcnow() + timedelta(days=1), cursor)) == []


def test_retries_stop_after_the_bound(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 4, updated_at=T0)
    cursor = seen_cursor(url)
    for k in range(1, MAX_AUTO_RETRIES + 1):  # the first run, then re-tries 1..N-1
        built(engine, 4)
        due = fail(engine, 4)
        assert due is not None
        assert keys(tick(url, due, cursor)) == [f"4:r1:retry{k}"]
    built(engine, 4)  # re-try N fails too: no more
    assert fail(engine, 4) is None
    row = row_of(engine, 4)
    assert (row.status, row.failure_kind, row.next_attempt_at) == ("failed", TRANSIENT, None)
    assert row.transient_failures == MAX_AUTO_RETRIES + 1
    assert keys(tick(url, utcnow() + timedelta(days=30), cursor)) == []


def test_retry_that_succeeds_ends_delivered_and_is_not_retried_again(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 5, updated_at=T0)
    cursor = seen_cursor(url)
    built(engine, 5)
    due = fail(engine, 5)
    assert keys(tick(url, due, cursor)) == ["5:r1:retry1"]
    built(engine, 5)
    with engine.begin() as conn:
        record_delivered(conn, 5, 1, delivered_at=utcnow())
    row = row_of(engine, 5)
    assert (row.status, row.error, row.failure_kind, row.next_attempt_at) == (
        "delivered",
        None,
        None,
        None,
    )
    assert keys(tick(url, due + timedelta(days=1), cursor)) == []
    # a later failed re-send of the delivered revision schedules nothing
    assert fail(engine, 5) is None
    assert row_of(engine, 5).status == "delivered"
    assert keys(tick(url, due + timedelta(days=1), cursor)) == []


def test_edited_or_archived_campaign_is_not_retried_at_its_old_revision(db):
    url, engine = db
    with engine.begin() as conn:
        add_campaign(conn, 6, updated_at=T0)
        add_campaign(conn, 7, updated_at=T0)
    cursor = seen_cursor(url)
    for cid in (6, 7):
        built(engine, cid)
        fail(engine, cid)
    with engine.begin() as conn:
        add_campaign(conn, 6, revision=2, updated_at=T0 + SECOND)  # edited: new revision
        conn.execute(
            sa.update(mycfia.campaigns).where(mycfia.campaigns.c.id == 7).values(status="archived")
        )
    assert keys(tick(url, utcnow() + timedelta(hours=1), cursor)) == ["6:r2"]


def test_due_retries_are_bounded_per_tick(db):
    url, engine = db
    n = MAX_RETRY_RUNS_PER_TICK + 20
    with engine.begin() as conn:
        for cid in range(1, n + 1):
            add_campaign(conn, cid, updated_at=T0)
    cursor = seen_cursor(url)
    due_at = utcnow() - timedelta(minutes=1)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(mycfia.campaign_exports),
            [
                {
                    "campaign_id": cid,
                    "revision": 1,
                    "status": "failed",
                    "attempts": 4,
                    "failure_kind": TRANSIENT,
                    "transient_failures": 1,
                    "next_attempt_at": due_at + timedelta(milliseconds=cid),
                    "requested_at": T0,
                    "updated_at": T0,
                }
                for cid in range(1, n + 1)
            ],
        )
    result = tick(url, utcnow(), cursor)
    # that many at once go in batch runs (tests/sensors/test_campaign_batches.py)
    requested = [
        cid
        for r in result.run_requests
        for cid in r.run_config["ops"]["export_campaign_batch"]["config"]["campaigns"]
    ]
    assert requested == list(range(1, MAX_RETRY_RUNS_PER_TICK + 1))
    assert all(r.tags["cfi/retry"] == "batch" for r in result.run_requests)


# --- end to end: real sshd down, then back -------------------------------------------


def sftp_for(server, drop) -> SFTPResource:
    return SFTPResource(
        host="127.0.0.1",
        port=server.port,
        username=server.user,
        private_key=str(server.client_key),
        known_hosts=str(server.known_hosts),
        remote_dir=str(drop),
        connect_timeout=5.0,
        io_timeout=10.0,
    )


def run_request(url, request: dg.RunRequest, sftp, alerts, instance):
    """Execute what the sensor requested: the export job's assets, its partition and tags."""
    instance.add_dynamic_partitions(campaigns_partitions.name, [request.partition_key])
    return dg.materialize(
        export_assets,
        instance=instance,
        partition_key=request.partition_key,
        tags=dict(request.tags),
        resources={"mycfia": DatabaseResource(url=url), "sftp": sftp, "alerts": alerts},
        raise_on_error=False,
    )


@pytest.mark.sshd
def test_sftp_down_then_back_is_delivered_by_the_sensor_alone(
    db, tmp_path, monkeypatch, sshd_factory, http_receiver
):
    monkeypatch.setenv("CFI_HOME", str(tmp_path / "home"))
    url, engine = db
    server = sshd_factory()  # not started: SFTP down
    drop = tmp_path / "drop"
    alerts = AlertsResource(
        webhook_url=http_receiver.url + "/hook",
        state_path=str(tmp_path / "alerts" / "state.json"),
        webserver_url="http://dagster.test",
    )
    instance = dg.DagsterInstance.ephemeral()
    with engine.begin() as conn:
        add_campaign(conn, 17, tenant_code="T017")

    def hook() -> list[tuple[str, str]]:
        return [(r.json()["key"], r.json()["event"]) for r in http_receiver.requests]

    first = tick(url, utcnow())
    (request,) = first.run_requests
    assert request.run_key == "17:r1"
    assert not run_request(url, request, sftp_for(server, drop), alerts, instance).success
    row = row_of(engine, 17)
    assert (row.status, row.failure_kind, row.attempts) == ("failed", TRANSIENT, 4)
    assert hook() == [("export_failed:17:r1", "alert")]
    assert "re-tries it automatically" in http_receiver.requests[0].json()["text"]

    # not yet due; then due: a re-try run, still down: failed again, no second alert
    assert keys(tick(url, row.next_attempt_at - SECOND, first.cursor)) == []
    retry = tick(url, row.next_attempt_at, first.cursor)
    (request,) = retry.run_requests
    assert request.run_key == "17:r1:retry1"
    assert not run_request(url, request, sftp_for(server, drop), alerts, instance).success
    row = row_of(engine, 17)
    assert (row.status, row.transient_failures, row.attempts) == ("failed", 2, 8)
    assert hook() == [("export_failed:17:r1", "alert")]

    server.start()  # SFTP back: the next due re-try delivers
    (request,) = tick(url, row.next_attempt_at, retry.cursor).run_requests
    assert request.run_key == "17:r1:retry2"
    assert run_request(url, request, sftp_for(server, drop), alerts, instance).success
    row = row_of(engine, 17)
    assert (row.status, row.failure_kind, row.next_attempt_at) == ("delivered", None, None)
    assert (drop / "T017" / "campaign_17_r1.manifest.json").exists()
    assert hook() == [("export_failed:17:r1", "alert"), ("export_failed:17:r1", "recovered")]
    assert keys(tick(url, utcnow() + timedelta(days=1), retry.cursor)) == []
