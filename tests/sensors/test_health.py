"""Alert sensors: run failures with a link to the run, recovery, view health."""

from datetime import timedelta

import dagster as dg
import pytest

from cfi_pipelines.alerting.alerter import Alerter
from cfi_pipelines.clock import utcnow
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.health import build_alert_sensors, evaluate_view_health
from cfi_pipelines.settings import AlertSettings
from tests.fixtures.http import free_port

alert_on_run_failure, recover_run_failure_alerts, view_health_alerts = build_alert_sensors()


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def make_job(fail: bool, name: str = "refresh_views") -> dg.JobDefinition:
    @dg.op
    def load_stocks() -> None:
        if fail:
            raise dg.Failure(description="view stocks: the source DB is unreachable")

    return dg.GraphDefinition(name=name, node_defs=[load_stocks]).to_job()


def run_status_context(sensor, instance, result, event, alerts):
    return dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        # no schema episode is open in these tests: the source is never read
        resources={"alerts": alerts, "cfi_source": DatabaseResource(url="sqlite://")},
    )


def test_run_failure_alerts_once_with_a_link_then_recovers(instance, http_receiver):
    alerts = AlertsResource(
        webhook_url=http_receiver.url + "/hook", webserver_url="http://ui.example:3000"
    )
    failed = [
        make_job(True).execute_in_process(instance=instance, raise_on_error=False) for _ in range(2)
    ]
    for result in failed:
        ctx = run_status_context(
            alert_on_run_failure, instance, result, result.get_run_failure_event(), alerts
        )
        alert_on_run_failure(ctx.for_run_failure())
    (sent,) = http_receiver.requests  # the second failure is the same episode
    body = sent.json()
    run_id = failed[0].run_id
    assert body["key"] == "run_failed:refresh_views"
    assert body["link"] == f"http://ui.example:3000/runs/{run_id}"
    assert "the source DB is unreachable" in body["text"] and "step load_stocks" in body["text"]

    ok = make_job(False).execute_in_process(instance=instance)
    success_event = next(
        e for e in ok.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS
    )
    recover_run_failure_alerts(
        run_status_context(recover_run_failure_alerts, instance, ok, success_event, alerts)
    )
    assert [r.json()["event"] for r in http_receiver.requests] == ["alert", "recovered"]
    assert http_receiver.requests[1].json()["link"] == f"http://ui.example:3000/runs/{ok.run_id}"


def test_export_run_failures_are_left_to_the_exports_own_alerts(instance, http_receiver):
    alerts = AlertsResource(webhook_url=http_receiver.url + "/hook")
    result = make_job(True, name="campaign_export").execute_in_process(
        instance=instance, raise_on_error=False
    )
    ctx = run_status_context(
        alert_on_run_failure, instance, result, result.get_run_failure_event(), alerts
    )
    alert_on_run_failure(ctx.for_run_failure())
    assert http_receiver.requests == []


def test_view_health_stale_and_api_episodes(http_receiver):
    alerter = Alerter(AlertSettings(webhook_url=http_receiver.url + "/hook"))
    now = utcnow()
    stale = {
        "stocks": {"source_snapshot_at": now - timedelta(minutes=16), "source": "db"},
        "operations": {
            "source_snapshot_at": now - timedelta(minutes=10),
            "source": "db",
        },  # WARN only
        "invoices": {"source_snapshot_at": now - timedelta(minutes=1), "source": "cfi_api"},
        "campaigns": {"source_snapshot_at": now, "source": "db"},
    }
    notes = evaluate_view_health(stale, alerter, now)
    assert notes == ["stocks: stale, alerted", "invoices: on CFI API data, alerted"]
    assert evaluate_view_health(stale, alerter, now) == []  # same episodes: silent
    healed = {
        **stale,
        "stocks": {"source_snapshot_at": now, "source": "db"},
        "invoices": {"source_snapshot_at": now, "source": "db"},
    }
    assert evaluate_view_health(healed, alerter, now) == [
        "stocks: fresh again, recovered",
        "invoices: back on DB data, recovered",
    ]
    keys = [(r.json()["key"], r.json()["event"]) for r in http_receiver.requests]
    assert keys == [
        ("view_stale:stocks", "alert"),
        ("view_fallback:invoices", "alert"),
        ("view_stale:stocks", "recovered"),
        ("view_fallback:invoices", "recovered"),
    ]
    assert "/assets/cfi_common/stocks" in http_receiver.requests[0].json()["link"]


def test_never_refreshed_view_is_an_error_episode(http_receiver):
    alerter = Alerter(AlertSettings(webhook_url=http_receiver.url + "/hook"))
    assert "stocks: stale, alerted" in evaluate_view_health({}, alerter)
    assert "never refreshed" in http_receiver.requests[0].json()["title"]


def test_view_health_sensor_skips_when_the_common_db_is_down(instance):
    dead = f"postgresql+psycopg://u:p@127.0.0.1:{free_port()}/x?connect_timeout=1"
    ctx = dg.build_sensor_context(
        instance=instance,
        resources={"cfi_common": DatabaseResource(url=dead), "alerts": AlertsResource()},
    )
    result = view_health_alerts(ctx)
    assert "common DB unreachable" in result.skip_message


def make_schema_failure_job() -> dg.JobDefinition:
    @dg.op(name="cfi_common__stocks")
    def refresh_stocks() -> None:
        drift = [{"table": "products", "column": "name", "views": ["stocks"]}]
        raise dg.Failure(
            description="view stocks: CFI's schema changed: products.name is missing (read by stocks)",
            metadata={"cause": "schema", "schema_drift": dg.MetadataValue.json(drift)},
            allow_retries=False,
        )

    return dg.GraphDefinition(name="refresh_views", node_defs=[refresh_stocks]).to_job()


def test_a_schema_change_alerts_at_once_per_table_then_recovers_when_it_matches(
    instance, http_receiver, sqlite_dbs
):
    """Issue 16 item 4: one episode per drifted table, not a generic run failure."""
    alerts = AlertsResource(webhook_url=http_receiver.url + "/hook")
    failed = make_schema_failure_job().execute_in_process(instance=instance, raise_on_error=False)
    ctx = dg.build_run_status_sensor_context(
        sensor_name=alert_on_run_failure.name,
        dagster_event=failed.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=failed.dagster_run,
        resources={"alerts": alerts},
    )
    alert_on_run_failure(ctx.for_run_failure())
    (sent,) = [r.json() for r in http_receiver.requests]
    assert sent["key"] == "schema_changed:products" and sent["event"] == "alert"
    assert "products.name" in sent["text"] and "stocks" in sent["text"]
    assert "CFI API" in sent["text"]  # what happens meanwhile: the fallback

    ok = make_job(False).execute_in_process(instance=instance)  # a refresh that went through
    success_event = next(
        e for e in ok.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS
    )
    recover_run_failure_alerts(
        dg.build_run_status_sensor_context(
            sensor_name=recover_run_failure_alerts.name,
            dagster_event=success_event,
            dagster_instance=instance,
            dagster_run=ok.dagster_run,
            resources={
                "alerts": alerts,
                "cfi_source": DatabaseResource(url=sqlite_dbs.source_url),  # matches again
            },
        )
    )
    events = [(r.json()["key"], r.json()["event"]) for r in http_receiver.requests]
    assert events == [
        ("schema_changed:products", "alert"),
        ("schema_changed:products", "recovered"),
    ]
