"""Alerting sensors: run failures (with a link to the run), stale views, views on API data.

Every alert belongs to an episode (see :mod:`cfi_pipelines.alerting.alerter`): it is sent
once, and a "recovered" message follows when the episode ends: a later
successful run of the same job and scope, a fresh view, a view back on DB data.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import dagster as dg

from cfi_pipelines.alerting.alerter import Alerter
from cfi_pipelines.alerting.messages import (
    run_failed_alert,
    schema_changed_alert,
    schema_changed_key,
    view_on_api_alert,
    view_stale_alert,
)
from cfi_pipelines.assets.sources import schema_check_evaluation
from cfi_pipelines.clock import utcnow
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.lag import probe_all
from cfi_pipelines.settings import default_sensor_status
from cfi_pipelines.views.freshness import freshness_state, view_age
from cfi_pipelines.views.refresh import read_status
from cfi_pipelines.views.spec import VIEWS

OWN_ALERTS_JOBS = frozenset({"campaign_export", "campaign_export_batch"})
"""Jobs whose failures are alerted by their assets, with campaign-level detail."""


def run_scope(run: dg.DagsterRun) -> str:
    """What a run worked on (partition, or selected assets): failures of different
    scopes of one job are different episodes."""
    if partition := run.tags.get("dagster/partition"):
        return f"partition {partition}"
    if run.asset_selection:
        return ", ".join(sorted(k.to_user_string() for k in run.asset_selection))
    return ""


def _failure_text(context: dg.RunFailureSensorContext) -> str:
    lines = [context.failure_event.message or "the run failed"]
    for ev in context.get_step_failure_events():
        error = ev.event_specific_data.error if ev.event_specific_data else None
        if error is not None:
            lines.append(f"step {ev.step_key}: {error.message.strip()[:600]}")
    return "\n".join(lines)


def schema_drift(context: dg.RunFailureSensorContext) -> tuple[dict[str, dict], bool]:
    """``{table: {"missing": [...], "views": [...]}}`` from the failed steps' ``schema_drift``
    metadata (a refresh that failed on CFI's schema), and whether *every* failed step was
    such a failure (then no generic run alert is needed)."""
    tables: dict[str, dict] = {}
    only_schema = True
    for ev in context.get_step_failure_events():
        user = ev.event_specific_data.user_failure_data if ev.event_specific_data else None
        drift = (user.metadata or {}).get("schema_drift") if user is not None else None
        if drift is None:
            only_schema = False
            continue
        for d in drift.value:
            entry = tables.setdefault(d["table"], {"missing": [], "views": []})
            what = f"{d['table']}.{d['column']}" if d.get("column") else f"table {d['table']}"
            entry["missing"] += [what] if what not in entry["missing"] else []
            entry["views"] += [v for v in d.get("views", []) if v not in entry["views"]]
    return tables, only_schema and bool(tables)


def resolve_schema_episodes(
    alerter: Alerter, cfi_source: DatabaseResource | None, instance: dg.DagsterInstance
) -> list[str]:
    """Close each open schema episode whose table has every column the views read again
    (catalog reads of those tables only), and report its schema check passed."""
    from cfi_pipelines.views.schema import compare

    open_tables = [k.split(":", 1)[1] for k in alerter.state.open_keys("schema_changed:")]
    if not open_tables or cfi_source is None:
        return []
    with cfi_source.engine().connect() as conn:
        still = {d.table for d in compare(conn, tables=open_tables)}
    closed = []
    for table in open_tables:
        if table in still:
            continue
        if alerter.resolve(schema_changed_key(table), f"CFI's {table} has every column again."):
            instance.report_runless_asset_event(schema_check_evaluation(table, []))
            closed.append(table)
    return closed


def evaluate_view_health(
    statuses: Mapping[str, dict], alerter: Alerter, now: datetime | None = None
) -> list[str]:
    """Open/close the stale-view and view-on-API episodes from ``cfi_view_status``."""
    now = now or utcnow()
    notes = []
    for spec in VIEWS:
        row = statuses.get(spec.name) or {}
        age = view_age(row, now)
        link = f"{alerter.webserver_url}/assets/cfi_common/{spec.name}"
        stale_key = f"view_stale:{spec.name}"
        if freshness_state(age) == "ERROR":
            age_s = age.total_seconds() if age is not None else None
            if alerter.open(view_stale_alert(spec.name, age_s, row.get("source"), link)):
                notes.append(f"{spec.name}: stale, alerted")
        elif alerter.resolve(stale_key, f"cfi_common/{spec.name} is fresh again.", link=link):
            notes.append(f"{spec.name}: fresh again, recovered")
        source = row.get("source")
        if source == "cfi_api":
            if alerter.open(view_on_api_alert(spec.name, row.get("source_snapshot_at"), link)):
                notes.append(f"{spec.name}: on CFI API data, alerted")
        elif source == "db" and alerter.resolve(
            f"view_fallback:{spec.name}",
            f"cfi_common/{spec.name} is refreshed from CFI's DB again.",
            link=link,
        ):
            notes.append(f"{spec.name}: back on DB data, recovered")
    return notes


def build_alert_sensors() -> list[dg.SensorDefinition]:
    """Run-failure, recovery and view-health sensors (built at definitions time, so
    ``CFI_AUTOMATION`` is read then)."""

    @dg.run_failure_sensor(
        name="alert_on_run_failure",
        minimum_interval_seconds=60,  # not Dagster's 30 s: the idle daemon's CPU adds up
        default_status=default_sensor_status(),
        description="Alert (Slack / webhook / e-mail) when a run of this code location fails.",
    )
    def alert_on_run_failure(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
        run = context.dagster_run
        if run.job_name in OWN_ALERTS_JOBS:
            # the export assets alert themselves, per campaign (rejected / failed after
            # its retries / recovered): a second, generic alert would only be noise
            context.log.info(f"{run.job_name} run {run.run_id}: alerted by the export itself")
            return
        alerter = alerts.alerter(context.log)
        tables, only_schema = schema_drift(context)
        for table, drift in tables.items():  # at once, one episode per drifted table
            link = f"{alerter.webserver_url}/assets/cfi_source/{table}"
            alerter.open(schema_changed_alert(table, drift["missing"], drift["views"], link))
        if only_schema:
            return  # the schema alert says it all; a run alert would only repeat it
        alert = run_failed_alert(
            run.job_name,
            run.run_id,
            _failure_text(context),
            alerter.run_link(run.run_id),
            run_scope(run),
        )
        if not alerter.open(alert):
            context.log.info(f"{alert.key}: already alerted in this episode")

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="recover_run_failure_alerts",
        minimum_interval_seconds=60,
        default_status=default_sensor_status(),
        description="Send 'recovered' when a job (and scope) that had failed succeeds again.",
    )
    def recover_run_failure_alerts(
        context: dg.RunStatusSensorContext,
        alerts: AlertsResource,
        cfi_source: DatabaseResource,
    ) -> None:
        run = context.dagster_run
        alerter = alerts.alerter(context.log)
        if run.job_name == "refresh_views":  # a refresh went through: schema fixed?
            try:
                resolve_schema_episodes(alerter, cfi_source, context.instance)
            except Exception as exc:  # CFI's DB down now: the next success tries again
                context.log.warning(f"schema episodes not checked: {type(exc).__name__}: {exc}")
        key = run_failed_alert(run.job_name, run.run_id, "", "", run_scope(run)).key
        alerter.resolve(key, f"Run {run.run_id} succeeded.", link=alerter.run_link(run.run_id))

    @dg.sensor(
        name="view_health_alerts",
        minimum_interval_seconds=120,  # it alerts at > 15 min: two minutes are plenty
        default_status=default_sensor_status(),
        description="Alert when a view's freshness is at ERROR (> 15 min) or it is served from CFI API data.",
    )
    def view_health_alerts(
        context: dg.SensorEvaluationContext, cfi_common: DatabaseResource, alerts: AlertsResource
    ) -> Any:
        common = probe_all({"common": lambda: read_status(cfi_common.engine())})["common"]
        if not common.ok:  # the lag sensor alerts on the common DB itself
            return dg.SkipReason(f"common DB unreachable ({common.error}); see view_lag_sensor")
        notes = evaluate_view_health(common.value, alerts.alerter(context.log))
        return dg.SkipReason("; ".join(notes) if notes else "no change in view health")

    return [alert_on_run_failure, recover_run_failure_alerts, view_health_alerts]
