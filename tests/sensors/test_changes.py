"""The change sensor: a run only when CFI's source changed, a verified-current view otherwise,
observations of the source tables, and freshness results without a check run."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.sources import source_assets
from cfi_pipelines.assets.views import refresh_views_job, view_assets, view_checks
from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.changes import ChangeCursor, build_view_change_sensor
from cfi_pipelines.views.refresh import read_status
from tests.sensors.test_lag import dead_url

view_change_sensor = build_view_change_sensor()


def res(dbs, *, source_url=None, common_url=None):
    return {
        "cfi_source": DatabaseResource(url=source_url or dbs.source_url),
        "cfi_common": DatabaseResource(url=common_url or dbs.common_url),
    }


def tick(instance, resources, cursor=None) -> dg.SensorResult:
    return view_change_sensor(
        dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    )


def snapshot(dbs, view: str):
    return read_status(dbs.common)[view]["source_snapshot_at"]


def refreshed_long_ago(dbs, minutes=3):
    """Every view's data read ``minutes`` ago (and logged so), the source unchanged since."""
    t = common.cfi_view_status
    with dbs.common.begin() as conn:
        conn.execute(t.update().values(source_snapshot_at=utcnow() - timedelta(minutes=minutes)))


def touch_stock(dbs, quantity=4242):
    sl = src.stock_levels
    with dbs.source.begin() as conn:
        first = conn.scalar(sa.select(sl.c.id).order_by(sl.c.id).limit(1))
        conn.execute(
            sl.update().where(sl.c.id == first).values(quantity=quantity, updated_at=utcnow())
        )
    return first


def test_first_tick_observes_the_sources_and_verifies_unchanged_views(fresh, instance):
    refreshed_long_ago(fresh)
    before = snapshot(fresh, "stocks")
    result = tick(instance, res(fresh))
    assert not result.run_requests  # nothing changed since the views read the source
    observed = {
        e.asset_key.path[-1] for e in result.asset_events if isinstance(e, dg.AssetObservation)
    }
    assert {"stock_levels", "products", "warehouses", "invoices", "payments"} <= observed
    assert snapshot(fresh, "stocks") > before  # verified current: the data is as of the probe
    checks = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert {c.asset_key.path[-1] for c in checks} == {
        "stocks",
        "operations",
        "invoices",
        "campaigns",
    }
    assert all(c.passed for c in checks)
    # the verification is in the refresh log (once a minute per view), for the KPIs
    lg = common.cfi_refresh_log.c
    with fresh.common.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).where(lg.mode == "verified")) == 4


def test_unchanged_source_launches_nothing_and_repeats_no_observation(fresh, instance):
    first = tick(instance, res(fresh))
    again = tick(instance, res(fresh), first.cursor)
    assert not again.run_requests
    assert not [e for e in again.asset_events if isinstance(e, dg.AssetObservation)]
    # the check results were reported already and did not change: not repeated
    assert not [e for e in again.asset_events if isinstance(e, dg.AssetCheckEvaluation)]


def test_a_changed_source_refreshes_exactly_the_views_that_read_it(fresh, instance):
    first = tick(instance, res(fresh))
    touch_stock(fresh)
    result = tick(instance, res(fresh), first.cursor)
    (req,) = result.run_requests
    assert req.job_name == "refresh_views"
    assert [k.path[-1] for k in req.asset_selection] == ["stocks"]
    assert req.tags["cfi/trigger"] == "source_change"
    observed = [
        e.asset_key.path[-1] for e in result.asset_events if isinstance(e, dg.AssetObservation)
    ]
    assert observed == ["stock_levels"]
    (obs,) = [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]
    # the latest change in the capture's own terms (SQLite: data_version + updated_at)
    assert obs.metadata["capture_mode"].value == "sqlite_data_version"
    assert obs.metadata["latest_change"].value.startswith("max(updated_at) 20")
    # the run makes the change visible; the next tick then verifies the view current
    defs = dg.Definitions(
        assets=[*source_assets, *view_assets],
        asset_checks=view_checks,
        jobs=[refresh_views_job],
        resources=res(fresh),
    )
    run = defs.resolve_job_def(req.job_name).execute_in_process(
        instance=instance, run_config=req.run_config, asset_selection=list(req.asset_selection)
    )
    assert run.success
    with fresh.common.connect() as conn:
        assert 4242 in set(conn.scalars(sa.select(common.cfi_stocks.c.quantity)))
    after = tick(instance, res(fresh), result.cursor)
    assert not after.run_requests


def test_a_change_during_a_refresh_is_seen_and_refreshed_again(fresh, instance):
    """A view whose data was read before the change was seen needs another refresh."""
    first = tick(instance, res(fresh))
    touch_stock(fresh)
    seen = tick(instance, res(fresh), first.cursor)
    assert seen.run_requests
    refreshed_long_ago(fresh, minutes=1)  # a refresh that read the source before the change
    again = tick(instance, res(fresh), seen.cursor)
    assert [k.path[-1] for r in again.run_requests for k in r.asset_selection] == ["stocks"]


def test_nothing_while_a_refresh_of_the_view_is_in_flight(fresh, instance):
    first = tick(instance, res(fresh))
    touch_stock(fresh)
    instance.add_run(
        dg.DagsterRun(
            job_name="refresh_views",
            run_id="inflight1",
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({dg.AssetKey(["cfi_common", "stocks"])}),
        )
    )
    result = tick(instance, res(fresh), first.cursor)
    assert not result.run_requests
    assert "in flight" in result.skip_reason.skip_message


def test_a_failing_view_is_retried_with_a_backoff(fresh, instance):
    first = tick(instance, res(fresh))
    touch_stock(fresh)
    t = common.cfi_view_status
    with fresh.common.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.view == "stocks")
            .values(consecutive_failures=3, last_attempt_at=utcnow())
        )
    result = tick(instance, res(fresh), first.cursor)
    assert not result.run_requests and "backing off" in result.skip_reason.skip_message
    with fresh.common.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.view == "stocks")
            .values(last_attempt_at=utcnow() - timedelta(minutes=10))
        )
    assert tick(instance, res(fresh), first.cursor).run_requests


@pytest.mark.parametrize("down", ["source", "common"])
def test_a_database_down_leaves_it_to_the_lag_sensor(fresh, instance, down):
    before = ChangeCursor.parse(None)
    kw = {"source_url": dead_url()} if down == "source" else {"common_url": dead_url()}
    result = tick(instance, res(fresh, **kw))
    assert not result.run_requests and not result.asset_events
    assert "lag sensor" in result.skip_reason.skip_message
    assert ChangeCursor.parse(result.cursor).tables == before.tables


def test_a_view_on_api_data_is_refreshed_once_the_source_answers(fresh, instance):
    t = common.cfi_view_status
    with fresh.common.begin() as conn:
        conn.execute(t.update().where(t.c.view == "invoices").values(source="cfi_api"))
    result = tick(instance, res(fresh))
    assert [k.path[-1] for r in result.run_requests for k in r.asset_selection] == ["invoices"]


def test_a_stale_check_result_is_reported_when_it_changes(fresh, instance):
    first = tick(instance, res(fresh))
    t = common.cfi_view_status
    touch_stock(fresh)  # stocks cannot be verified: it changed
    with fresh.common.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.view == "stocks")
            .values(source_snapshot_at=utcnow() - timedelta(minutes=7))
        )
    result = tick(instance, res(fresh), first.cursor)
    (check,) = [e for e in result.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert check.asset_key.path[-1] == "stocks" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN
