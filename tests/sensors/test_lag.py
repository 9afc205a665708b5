"""The lag sensor: every decision path, an ephemeral instance, real SQLite state,
unreachable databases, and the end-to-end fallback through the fake CFI API."""

import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.fallback import fallback_assets, fallback_key, fallback_snapshots_job
from cfi_pipelines.assets.views import refresh_views_job, view_assets, view_key
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.devtools.seed import seed_source
from cfi_pipelines.fallback.snapshots import list_snapshots
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.cfi_api import CfiApiResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.health import build_alert_sensors
from cfi_pipelines.sensors.lag import TAG_REQUEST, LagCursor, build_view_lag_sensor, probe_all
from cfi_pipelines.views.refresh import read_status, refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases
from tests.fixtures.http import API_TOKEN, free_port

view_lag_sensor = build_view_lag_sensor()
view_health_alerts = build_alert_sensors()[2]


def dead_url() -> str:
    """A PostgreSQL URL on a port nobody listens on: connection refused at once."""
    return f"postgresql+psycopg://cfi:secret@127.0.0.1:{free_port()}/cfi?connect_timeout=1"


@pytest.fixture(scope="module")
def fresh_template(tmp_path_factory) -> Path:
    """Seeded source and refreshed common DB, built once and copied per test."""
    d = tmp_path_factory.mktemp("lag_template")
    source, target = (
        create_engine(f"sqlite:///{d}/cfi_source.db"),
        create_engine(f"sqlite:///{d}/cfi_common.db"),
    )
    seed_source(source, scale=1, seed=7)
    for spec in VIEWS:
        refresh_view(spec, source, target)
    for engine in (source, target):  # fold the WAL into the file before copying it
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
    return d


@pytest.fixture
def fresh(fresh_template, cfi_home) -> Iterator[Databases]:
    """All four views refreshed from the source; their snapshot time set to now."""
    cfi_home.mkdir(parents=True, exist_ok=True)
    for name in ("cfi_source.db", "cfi_common.db"):
        shutil.copy(fresh_template / name, cfi_home / name)
    s_url, c_url = f"sqlite:///{cfi_home}/cfi_source.db", f"sqlite:///{cfi_home}/cfi_common.db"
    dbs = Databases(s_url, c_url, create_engine(s_url), create_engine(c_url))
    with dbs.common.begin() as conn:
        conn.execute(common.cfi_view_status.update().values(source_snapshot_at=utcnow()))
    yield dbs
    dbs.source.dispose()
    dbs.common.dispose()


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def resources(dbs, *, source_url=None, common_url=None, api_url="http://127.0.0.1:9", webhook=""):
    return {
        "cfi_source": DatabaseResource(url=source_url or dbs.source_url),
        "cfi_common": DatabaseResource(url=common_url or dbs.common_url),
        "cfi_api": CfiApiResource(base_url=api_url, token=API_TOKEN, backoff_s=0.01, max_retries=1),
        "alerts": AlertsResource(webhook_url=webhook),
    }


def tick(instance, res, cursor=None) -> tuple[dg.SensorResult, float]:
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=res)
    started = time.perf_counter()
    result = view_lag_sensor(ctx)
    return result, time.perf_counter() - started


def age(engine, view, minutes=20, failures=None):
    values = {"source_snapshot_at": utcnow() - timedelta(minutes=minutes)}
    if failures is not None:
        values["consecutive_failures"] = failures
    t = common.cfi_view_status
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.view == view).values(**values))


def run_request(defs, instance, req: dg.RunRequest, raise_on_error=False):
    """Execute a sensor's run request in process, on the sensor's instance, with its tags."""
    job = defs.resolve_job_def(req.job_name)
    return job.execute_in_process(
        run_config=req.run_config,
        instance=instance,
        asset_selection=list(req.asset_selection),
        tags=req.tags,
        raise_on_error=raise_on_error,
    )


def all_defs(res):
    """The views and the fallback half, with the test's resources (as definitions.py merges them)."""
    return dg.Definitions(
        assets=[*view_assets, *fallback_assets],
        jobs=[refresh_views_job, fallback_snapshots_job],
        sensors=[view_lag_sensor, view_health_alerts],
        resources=res,
    )


# --------------------------------------------------------------------------- decisions


def test_fresh_views_need_nothing(fresh, instance):
    result, _ = tick(instance, resources(fresh))
    assert result.run_requests == []
    assert "stocks: fresh" in result.skip_reason.skip_message


def test_a_lagging_view_gets_a_refresh_of_that_view_only(fresh, instance):
    age(fresh.common, "invoices")
    result, _ = tick(instance, resources(fresh))
    (req,) = result.run_requests
    assert req.job_name == "refresh_views" and req.asset_selection == [view_key("invoices")]
    assert req.run_key.startswith("invoices:") and req.run_key.endswith(":refresh:1")
    assert req.tags[TAG_REQUEST] == req.run_key


def test_never_refreshed_view_gets_a_refresh(sqlite_dbs, instance):
    result, _ = tick(instance, resources(sqlite_dbs))
    assert {r.asset_selection[0] for r in result.run_requests} == {view_key(v.name) for v in VIEWS}
    assert all(":never:refresh:1" in r.run_key for r in result.run_requests)


def test_unreachable_source_asks_for_the_fallback(fresh, instance):
    age(fresh.common, "stocks")
    result, _ = tick(instance, resources(fresh, source_url=dead_url()))
    (req,) = result.run_requests
    assert req.job_name == "fallback_snapshots" and req.asset_selection == [fallback_key("stocks")]
    assert req.run_config == {"ops": {"cfi_fallback__stocks": {"config": {"swap": True}}}}
    assert "source DB is unreachable" in req.tags["cfi/reason"]
    assert "secret" not in str(req.tags)  # the URL's password never leaks


def test_two_failed_refreshes_ask_for_the_fallback(fresh, instance):
    age(fresh.common, "operations", failures=2)
    result, _ = tick(instance, resources(fresh))
    (req,) = result.run_requests
    assert (
        req.job_name == "fallback_snapshots" and "last 2 refreshes failed" in req.tags["cfi/reason"]
    )


def test_one_failed_refresh_still_asks_for_a_refresh(fresh, instance):
    age(fresh.common, "operations", failures=1)
    result, _ = tick(instance, resources(fresh))
    (req,) = result.run_requests
    assert req.job_name == "refresh_views"


def test_fallback_needs_an_api(fresh, instance):
    age(fresh.common, "stocks")
    res = {**resources(fresh, source_url=dead_url()), "cfi_api": CfiApiResource(base_url="")}
    result, _ = tick(instance, res)
    assert result.run_requests == []
    assert "CFI_API_URL is not set" in result.skip_reason.skip_message


def test_unreachable_common_db_asks_for_parquet_snapshots_and_alerts_once(
    fresh, instance, http_receiver
):
    res = resources(fresh, common_url=dead_url(), webhook=http_receiver.url + "/hook")
    result, _ = tick(instance, res)
    assert sorted(r.asset_selection[0] for r in result.run_requests) == sorted(
        fallback_key(v.name) for v in VIEWS
    )
    assert all(
        r.run_config["ops"][next(iter(r.run_config["ops"]))]["config"] == {"swap": False}
        for r in result.run_requests
    )
    (alert,) = http_receiver.requests
    assert alert.json()["key"] == "common_db_down" and "CFI_COMMON_URL" in alert.json()["text"]

    again, _ = tick(instance, res, result.cursor)  # same episode: same run keys, no new alert
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in result.run_requests]
    assert len(http_receiver.requests) == 1

    back, _ = tick(instance, resources(fresh, webhook=http_receiver.url + "/hook"), again.cursor)
    assert back.run_requests == []
    assert [r.json()["event"] for r in http_receiver.requests] == ["alert", "recovered"]
    assert LagCursor.parse(back.cursor).common_down_since is None


def test_nothing_while_a_run_is_in_flight(fresh, instance):
    age(fresh.common, "campaigns")
    job = all_defs(resources(fresh)).resolve_job_def("refresh_views")
    queued = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.STARTED, asset_selection=frozenset({view_key("campaigns")})
    )
    result, _ = tick(instance, resources(fresh))
    assert result.run_requests == []
    assert f"run {queued.run_id} is in flight" in result.skip_reason.skip_message


def test_a_scheduled_refresh_of_all_views_counts_as_in_flight(fresh, instance):
    age(fresh.common, "campaigns")
    job = all_defs(resources(fresh)).resolve_job_def("refresh_views")
    instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTING)  # all views
    result, _ = tick(instance, resources(fresh))
    assert result.run_requests == []


def test_one_request_per_episode_and_a_new_one_when_it_failed(fresh, instance):
    age(fresh.common, "stocks")
    res = resources(fresh)
    first, _ = tick(instance, res)
    (req,) = first.run_requests

    # The requested run fails (its source is dead by the time it runs).
    failing = all_defs(resources(fresh, source_url=dead_url()))
    assert not run_request(failing, instance, req).success
    second, _ = tick(instance, res, first.cursor)
    (retry,) = second.run_requests
    assert retry.run_key == req.run_key[: -len("1")] + "2"  # same episode, next attempt

    # A run of that key that succeeded but left the view stale (e.g. stopped clock): no repeat.
    instance.create_run_for_job(
        failing.resolve_job_def("refresh_views"),
        status=dg.DagsterRunStatus.SUCCESS,
        tags={TAG_REQUEST: retry.run_key},
    )
    third, _ = tick(instance, res, second.cursor)
    assert third.run_requests == []
    assert "already handled in this episode" in third.skip_reason.skip_message


def test_a_new_episode_gets_a_new_run_key(fresh, instance):
    age(fresh.common, "stocks", minutes=20)
    first, _ = tick(instance, resources(fresh))
    age(fresh.common, "stocks", minutes=30)  # another snapshot: another episode
    second, _ = tick(instance, resources(fresh), first.cursor)
    assert first.run_requests[0].run_key != second.run_requests[0].run_key
    assert second.run_requests[0].run_key.endswith(":1")


def test_garbage_cursor_does_not_break_the_sensor(fresh, instance):
    age(fresh.common, "stocks")
    result, _ = tick(instance, resources(fresh), "{not json")
    assert len(result.run_requests) == 1


def test_probes_answer_within_their_deadline():
    release = threading.Event()
    started = time.perf_counter()
    out = probe_all({"hung": lambda: release.wait(5), "ok": lambda: 42}, timeout_s=0.2)
    took = time.perf_counter() - started
    release.set()
    assert out["ok"].ok and out["ok"].value == 42
    assert not out["hung"].ok and "no answer within" in out["hung"].error
    assert took < 4.0  # it did not wait for the hung probe (5 s)


# --------------------------------------------------------------------------- end to end


def test_end_to_end_source_down_then_api_data_in_the_view(fresh, instance, http_receiver, cfi_home):
    """Source DB on a dead port, stocks 20 min old: the sensor asks for the fallback,
    the run pulls the view from the (fake) CFI API, swaps it in, writes Parquet;
    the health sensor alerts that the view is on API data, then "recovered"."""
    age(fresh.common, "stocks")
    hook = http_receiver.url + "/hook"
    with FakeCfiApi(fresh.source, token=API_TOKEN) as api:
        res = resources(fresh, source_url=dead_url(), api_url=api.url, webhook=hook)
        result, _ = tick(instance, res)
        (req,) = result.run_requests
        assert req.asset_selection == [fallback_key("stocks")]
        run = run_request(all_defs(res), instance, req, raise_on_error=True)
    assert run.success

    status = read_status(fresh.common)["stocks"]
    assert status["source"] == "cfi_api" and utcnow() - status["source_snapshot_at"] < timedelta(
        minutes=1
    )
    with fresh.common.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(common.cfi_stocks)) == 9984
    (snap,) = list_snapshots(cfi_home / "snapshots", "stocks")
    assert pq.ParquetFile(snap).metadata.num_rows == 9984

    # The view is fresh again: the next tick asks for nothing.
    after, _ = tick(instance, res, result.cursor)
    assert after.run_requests == []

    # Alerts: on API data (once), then recovered when the DB refresh is back.
    health = dg.build_sensor_context(instance=instance, resources=res)
    view_health_alerts(health)
    view_health_alerts(health)
    assert [r.json()["key"] for r in http_receiver.requests] == ["view_fallback:stocks"]
    refresh_view(VIEWS[0], fresh.source, fresh.common)
    view_health_alerts(health)
    assert [(r.json()["key"], r.json()["event"]) for r in http_receiver.requests] == [
        ("view_fallback:stocks", "alert"),
        ("view_fallback:stocks", "recovered"),
    ]
