"""The lag sensor: when a view lags more than 15 minutes, something acts.

Every tick (60 s by default) it probes both CFI databases in parallel, under a
deadline so that a hung server cannot stretch the tick past a second, reads
``cfi_view_status`` and decides per view:

- fresh (≤ 15 min) → nothing;
- lagging, CFI's source DB reachable and fewer than 2 failed refreshes in a row
  → a run of ``refresh_views`` for that view only;
- lagging, and the source DB unreachable or the last 2 refreshes failed → a
  fallback snapshot from the CFI API, swapped into the view;
- the common DB itself unreachable → fallback snapshots of every view, Parquet
  only, and an alert ("cache down"); "recovered" once it answers again.

One request per view and *lag episode*: the episode is named by the view's
``source_snapshot_at`` when the lag started, and the run key carries an attempt
number that grows only when the previous run failed. Nothing is requested while
a run touching the view is queued or running. The cursor (JSON) keeps the
episode and attempt per view; Dagster drops a repeated run key, so re-emitting
one is harmless.
"""

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.alerting.messages import common_db_down_alert
from cfi_pipelines.assets.fallback import fallback_key, fallback_run_config, fallback_snapshots_job
from cfi_pipelines.assets.views import refresh_views_job, view_key
from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.cfi_api import CfiApiResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import INCIDENT_WINDOW, default_sensor_status
from cfi_pipelines.views.freshness import format_age, view_age
from cfi_pipelines.views.refresh import read_status
from cfi_pipelines.views.spec import VIEWS

SENSOR_NAME = "view_lag_sensor"
PROBE_TIMEOUT_S = 0.8
"""How long a tick waits for a database to answer before calling it unreachable:
long enough for a busy but healthy database, short enough to keep a tick under 1 s."""
FAILURES_BEFORE_FALLBACK = 2
TAG_REQUEST, TAG_VIEW, TAG_ACTION = "cfi/lag_request", "cfi/lag_view", "cfi/lag_action"
# NOT_STARTED is left out: a run whose launch crashed stays NOT_STARTED forever and
# would block the view; the run key already covers the instant before it is queued.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]

# Probes run here so that a database that never answers costs the tick PROBE_TIMEOUT_S,
# not the driver's connect timeout (the stuck thread finishes on its own later).
_probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cfi-lag-probe")


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    ok: bool
    value: Any = None
    error: str = ""


def _outcome(future: Future, timeout_s: float) -> Probe:
    try:
        return Probe(True, future.result(timeout=max(0.0, timeout_s)))
    except FutureTimeout:
        return Probe(False, error=f"no answer within {PROBE_TIMEOUT_S:.1f}s")
    except sa.exc.DBAPIError as exc:
        return Probe(False, error=f"{type(exc.orig).__name__}: {str(exc.orig).strip()[:300]}")
    except Exception as exc:  # engine creation, missing tables, bad URL…
        return Probe(False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")


def probe_all(
    fns: dict[str, Callable[[], Any]], timeout_s: float = PROBE_TIMEOUT_S
) -> dict[str, Probe]:
    """Run the probes in parallel under one deadline; failures and timeouts never raise."""
    futures = {name: _probes.submit(fn) for name, fn in fns.items()}
    deadline = time.monotonic() + timeout_s
    return {name: _outcome(f, deadline - time.monotonic()) for name, f in futures.items()}


def _read_source(engine_fn: Callable[[], sa.Engine]) -> Callable[[], bool]:
    def run() -> bool:
        # a real table, not SELECT 1: an empty or wrong database is as useless as a dead one
        with engine_fn().connect() as conn:
            conn.execute(sa.select(src.tenants.c.id).limit(1)).all()
        return True

    return run


# --------------------------------------------------------------------------- cursor


@dataclass
class Episode:
    episode: str
    action: str
    attempt: int = 1

    def run_key(self, view: str) -> str:
        return f"{view}:{self.episode}:{self.action}:{self.attempt}"


@dataclass
class LagCursor:
    views: dict[str, Episode]
    common_down_since: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "LagCursor":
        if not text:
            return cls({})
        try:
            data = json.loads(text)
            views = {v: Episode(**e) for v, e in data.get("views", {}).items()}
            return cls(views, data.get("common_down_since"))
        except (ValueError, TypeError):  # an unreadable cursor restarts episodes, no crash
            return cls({})

    def dump(self) -> str:
        return json.dumps(
            {
                "views": {v: e.__dict__ for v, e in sorted(self.views.items())},
                "common_down_since": self.common_down_since,
            },
            sort_keys=True,
        )


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    view: str
    action: str  # none / refresh / fallback / fallback_parquet
    reason: str
    episode: str = ""


def decide_view(
    view: str,
    row: dict | None,
    *,
    source: Probe,
    now: datetime,
    threshold: timedelta = INCIDENT_WINDOW,
) -> Decision:
    """What to do about one view, given its status row and whether the source answers."""
    age = view_age(row, now)
    if age is not None and age <= threshold:
        return Decision(view, "none", f"fresh ({format_age(age)})")
    snapshot = (row or {}).get("source_snapshot_at")
    episode = snapshot.strftime("%Y%m%dT%H%M%S") if snapshot else "never"
    failures = int((row or {}).get("consecutive_failures") or 0)
    if not source.ok:
        return Decision(
            view,
            "fallback",
            f"{format_age(age)} and CFI's source DB is unreachable ({source.error})",
            episode,
        )
    if failures >= FAILURES_BEFORE_FALLBACK:
        return Decision(
            view, "fallback", f"{format_age(age)} and the last {failures} refreshes failed", episode
        )
    return Decision(
        view, "refresh", f"{format_age(age)} (> {threshold.total_seconds() / 60:.0f} min)", episode
    )


def view_run_in_flight(instance: dg.DagsterInstance, view: str) -> str | None:
    """The id of a queued/running run that refreshes or snapshots ``view``, if any."""
    targets = {view_key(view), fallback_key(view)}
    for job in (refresh_views_job.name, fallback_snapshots_job.name):
        for run in instance.get_runs(dg.RunsFilter(job_name=job, statuses=IN_FLIGHT), limit=25):
            if run.asset_selection is None or targets & set(run.asset_selection):
                return run.run_id
    return None


def _last_run_failed(instance: dg.DagsterInstance, run_key: str) -> bool | None:
    """True/False for the run of ``run_key`` (failed or not), None if it is not known yet."""
    runs = instance.get_runs(dg.RunsFilter(tags={TAG_REQUEST: run_key}), limit=1)
    if not runs:
        return None
    run = runs[0]
    if run.is_complete_and_waiting_to_retry:  # Dagster's run retries will handle it
        return False
    return run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _request(view: str, action: str, run_key: str, reason: str) -> dg.RunRequest:
    tags = {TAG_REQUEST: run_key, TAG_VIEW: view, TAG_ACTION: action, "cfi/trigger": SENSOR_NAME}
    if action == "refresh":
        return dg.RunRequest(
            run_key=run_key,
            job_name=refresh_views_job.name,
            asset_selection=[view_key(view)],
            tags=tags,
        )
    return dg.RunRequest(
        run_key=run_key,
        job_name=fallback_snapshots_job.name,
        asset_selection=[fallback_key(view)],
        run_config=fallback_run_config(view, swap=action == "fallback"),
        tags={**tags, "cfi/reason": reason[:200]},
    )


def evaluate(
    instance: dg.DagsterInstance,
    cursor_text: str | None,
    *,
    source_engine: Callable[[], sa.Engine],
    common_engine: Callable[[], sa.Engine],
    api_configured: bool,
    alerter: Any,
    log: Any,
    now: datetime | None = None,
) -> dg.SensorResult:
    """One tick (the sensor minus Dagster's decorator), testable as a plain function."""
    now = now or utcnow()
    cursor = LagCursor.parse(cursor_text)
    probes = probe_all(
        {"source": _read_source(source_engine), "common": lambda: read_status(common_engine())}
    )
    source, common = probes["source"], probes["common"]

    decisions: list[Decision]
    if not common.ok:
        since = cursor.common_down_since or now.strftime("%Y%m%dT%H%M%S")
        cursor.common_down_since = since
        alerter.open(common_db_down_alert(f"common DB unreachable: {common.error}"))
        decisions = [
            Decision(
                v.name,
                "fallback_parquet",
                f"the common DB is unreachable ({common.error})",
                f"down{since}",
            )
            for v in VIEWS
        ]
    else:
        if cursor.common_down_since:
            alerter.resolve("common_db_down", "The common DB answers again.")
            cursor.common_down_since = None
        decisions = [
            decide_view(v.name, common.value.get(v.name), source=source, now=now) for v in VIEWS
        ]

    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    for d in decisions:
        if d.action == "none":
            cursor.views.pop(d.view, None)  # the episode is over
            notes.append(f"{d.view}: {d.reason}")
            continue
        if d.action.startswith("fallback") and not api_configured:
            notes.append(f"{d.view}: {d.reason}; a fallback is needed but CFI_API_URL is not set")
            continue
        if running := view_run_in_flight(instance, d.view):
            notes.append(f"{d.view}: {d.reason}; run {running} is in flight, waiting")
            continue
        ep = cursor.views.get(d.view)
        if ep is None or (ep.episode, ep.action) != (d.episode, d.action):
            ep = Episode(d.episode, d.action)
        else:
            failed = _last_run_failed(instance, ep.run_key(d.view))
            if failed:
                ep = Episode(ep.episode, ep.action, ep.attempt + 1)
            elif failed is False:
                notes.append(f"{d.view}: {d.reason}; already handled in this episode")
                cursor.views[d.view] = ep
                continue
        cursor.views[d.view] = ep
        key = ep.run_key(d.view)
        requests.append(_request(d.view, d.action, key, d.reason))
        notes.append(f"{d.view}: {d.reason} -> {d.action} (run key {key})")

    for note in notes:
        log.info(note)
    return dg.SensorResult(
        run_requests=requests,
        cursor=cursor.dump(),
        skip_reason=None if requests else "; ".join(notes) or "nothing to do",
    )


def lag_tick(
    context: dg.SensorEvaluationContext,
    cfi_source: DatabaseResource,
    cfi_common: DatabaseResource,
    cfi_api: CfiApiResource,
    alerts: AlertsResource,
) -> dg.SensorResult:
    """The sensor's body: resources in, :func:`evaluate` out."""
    started = time.perf_counter()
    result = evaluate(
        context.instance,
        context.cursor,
        source_engine=cfi_source.engine,
        common_engine=cfi_common.engine,
        api_configured=cfi_api.configured,
        alerter=alerts.alerter(context.log),
        log=context.log,
    )
    context.log.debug(f"lag tick took {time.perf_counter() - started:.3f}s")
    return result


def build_view_lag_sensor(minimum_interval_seconds: int = 60) -> dg.SensorDefinition:
    """The lag sensor (built at definitions time, so ``CFI_AUTOMATION`` is read then)."""

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        jobs=[refresh_views_job, fallback_snapshots_job],
        default_status=default_sensor_status(),
        description=(
            "Every minute: a view older than 15 min gets a refresh; if CFI's source DB is "
            "unreachable or its last 2 refreshes failed, a fallback snapshot from the CFI API "
            "instead; if the common DB is unreachable, Parquet-only snapshots and an alert."
        ),
    )
    def view_lag_sensor(
        context: dg.SensorEvaluationContext,
        cfi_source: DatabaseResource,
        cfi_common: DatabaseResource,
        cfi_api: CfiApiResource,
        alerts: AlertsResource,
    ) -> dg.SensorResult:
        return lag_tick(context, cfi_source, cfi_common, cfi_api, alerts)

    return view_lag_sensor
