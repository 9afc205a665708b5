"""The change sensor: refresh a view when CFI's source changed, and only then.

Every 20 s it probes the signature of each source table the views follow
(:mod:`cfi_pipelines.views.probe`: ``max(updated_at)`` and ``count(*)``, one cheap
query each, under the same deadline as the lag sensor) and reads
``cfi_view_status``. Then, in one tick:

- a table whose signature moved is *observed* (``AssetObservation`` on
  ``cfi_source/<table>``: the UI shows when the source last changed);
- the views whose tables changed after their data was read get **one**
  ``refresh_views`` run (incremental; it also reconciles deleted keys), unless a
  refresh or fallback of that view is already queued or running; a view whose
  last refreshes failed is retried with a backoff (40 s, 80 s … up to 15 min);
- every other view is *verified current*: its ``source_snapshot_at`` moves to the
  probe's time (the source did not change since its data was read, so the data
  is as of now), and a ``verified`` line goes to ``cfi_refresh_log`` once a
  minute for the KPIs. A quiet source never makes a fresh view look stale, and
  no run is launched;
- the freshness check of each view is evaluated from that status and reported
  (``AssetCheckEvaluation``) when its result changes, and every 10 min: the UI
  always shows the latest result, without a run per minute.

If CFI's source DB or the common DB does not answer, the tick does nothing: the
lag sensor (60 s) owns those cases (fallback to the CFI API, alerts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.sources import source_key
from cfi_pipelines.assets.views import (
    RefreshConfig,
    freshness_check_result,
    refresh_views_job,
    view_key,
    view_op_name,
)
from cfi_pipelines.clock import iso_z, utcnow
from cfi_pipelines.db import write_transaction
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.sensors.lag import probe_all, view_run_in_flight
from cfi_pipelines.settings import INCIDENT_WINDOW, default_sensor_status
from cfi_pipelines.views.freshness import freshness_state, view_age
from cfi_pipelines.views.probe import Signature, judge_views, probe_signatures
from cfi_pipelines.views.refresh import read_status
from cfi_pipelines.views.spec import VIEWS

SENSOR_NAME = "view_change_sensor"
INTERVAL_S = 20
VERIFIED_LOG_EVERY = timedelta(seconds=60)
CHECK_HEARTBEAT = timedelta(minutes=10)
RETRY_BASE = timedelta(seconds=40)
TAG_TRIGGER = "cfi/trigger"


@dataclass
class ChangeCursor:
    """Per table: its last signature and when this sensor first saw it; per view: the
    freshness state last reported and when a ``verified`` line was last logged."""

    tables: dict[str, list] = field(default_factory=dict)  # name -> [max_updated_at, rows, seen]
    checks: dict[str, list] = field(default_factory=dict)  # view -> [state, reported_at]
    logged: dict[str, str] = field(default_factory=dict)  # view -> verified logged at

    @classmethod
    def parse(cls, text: str | None) -> ChangeCursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            return cls(dict(data["tables"]), dict(data["checks"]), dict(data["logged"]))
        except (ValueError, TypeError, KeyError):  # unreadable: start afresh, never crash
            return cls()

    def dump(self) -> str:
        return json.dumps(
            {"tables": self.tables, "checks": self.checks, "logged": self.logged}, sort_keys=True
        )

    def seen_at(self) -> dict[str, datetime]:
        return {name: datetime.fromisoformat(v[2]) for name, v in self.tables.items()}


def _first_seen(sig: Signature, now: datetime) -> datetime:
    """A table seen for the first time changed no later than its newest ``updated_at``."""
    if sig.max_updated_at is None:
        return now
    try:
        return min(now, datetime.fromisoformat(sig.max_updated_at.replace("Z", "")))
    except ValueError:
        return now


def observe(cursor: ChangeCursor, sigs: dict[str, Signature], now: datetime) -> list:
    """Update the cursor's signatures; an ``AssetObservation`` per table that changed."""
    events = []
    for name, sig in sigs.items():
        prev = cursor.tables.get(name)
        if prev is not None and prev[:2] == sig.as_list():
            continue
        seen = now if prev is not None else _first_seen(sig, now)
        cursor.tables[name] = [*sig.as_list(), seen.isoformat()]
        events.append(
            dg.AssetObservation(
                asset_key=source_key(name),
                metadata={
                    "max_updated_at": sig.max_updated_at or "",
                    "rows": dg.MetadataValue.int(sig.rows),
                    "change_seen_at": iso_z(seen) or "",
                },
            )
        )
    return events


def _backing_off(row: dict, now: datetime) -> bool:
    failures = int(row.get("consecutive_failures") or 0)
    last = row.get("last_attempt_at")
    if not failures or last is None:
        return False
    wait = min(RETRY_BASE * 2 ** (failures - 1), INCIDENT_WINDOW)
    return now - last < wait


def mark_verified(
    conn: sa.Connection, views: list[str], as_of: datetime, log: set[str]
) -> list[str]:
    """Move ``source_snapshot_at`` of ``views`` forward to ``as_of`` (never backwards, only
    views on CFI's DB); a ``verified`` log line for those in ``log``. The views moved."""
    t = common.cfi_view_status
    moved = []
    for view in views:
        n = conn.execute(
            sa.update(t)
            .where(t.c.view == view, t.c.source == "db", t.c.source_snapshot_at < as_of)
            .values(source_snapshot_at=as_of)
        ).rowcount
        if n and view in log:
            conn.execute(
                common.cfi_refresh_log.insert().values(
                    view=view,
                    started_at=as_of,
                    finished_at=as_of,
                    source_snapshot_at=as_of,
                    mode="verified",
                    source="db",
                    outcome="success",
                    duration_s=0.0,
                )
            )
        if n:
            moved.append(view)
    return moved


def change_tick(
    context: dg.SensorEvaluationContext, cfi_source: DatabaseResource, cfi_common: DatabaseResource
) -> dg.SensorResult:
    """One tick (see the module docstring)."""
    cursor = ChangeCursor.parse(context.cursor)
    probed_at = utcnow()  # the source is at least this fresh when its signatures answer
    probes = probe_all(
        {
            "source": lambda: _signatures(cfi_source.engine()),
            "common": lambda: read_status(cfi_common.engine()),
        }
    )
    src, com = probes["source"], probes["common"]
    if not (src.ok and com.ok):
        down = "CFI's source DB" if not src.ok else "the common DB"
        return dg.SensorResult(
            skip_reason=f"{down} does not answer ({(src if not src.ok else com).error}); "
            "the lag sensor handles it",
            cursor=cursor.dump(),
        )
    events: list = observe(cursor, src.value, probed_at)
    statuses: dict[str, dict] = com.value
    verdicts = judge_views(cursor.seen_at(), statuses)
    refresh, verified, notes = [], [], []
    for v in verdicts:
        row = statuses.get(v.view) or {}
        if running := view_run_in_flight(context.instance, v.view):
            notes.append(f"{v.view}: run {running[:8]} in flight")
        elif v.needs_refresh or row.get("source") not in (None, "db"):
            if _backing_off(row, probed_at):
                notes.append(f"{v.view}: last refresh failed, backing off")
            else:
                refresh.append(v.view)
        else:
            verified.append(v.view)
    if verified:
        log = {
            v
            for v in verified
            if v not in cursor.logged
            or probed_at - datetime.fromisoformat(cursor.logged[v]) >= VERIFIED_LOG_EVERY
        }
        try:
            with write_transaction(cfi_common.engine()) as conn:
                moved = mark_verified(conn, verified, probed_at, log)
            for v in log & set(moved):
                cursor.logged[v] = probed_at.isoformat()
            for v in moved:
                statuses[v] = {**statuses[v], "source_snapshot_at": probed_at}
        except sa.exc.SQLAlchemyError as exc:
            notes.append(f"could not record the verification: {type(exc).__name__}")
    events += _check_events(cursor, statuses, probed_at)
    requests = []
    if refresh:
        digest = hashlib.sha1(json.dumps(cursor.tables, sort_keys=True).encode()).hexdigest()[:12]
        requests.append(
            dg.RunRequest(
                run_key=f"change:{'+'.join(refresh)}:{digest}:{probed_at.isoformat()}",
                job_name=refresh_views_job.name,
                asset_selection=[view_key(v) for v in refresh],
                run_config={
                    "ops": {
                        view_op_name(v): {"config": RefreshConfig(mode="auto").model_dump()}
                        for v in refresh
                    }
                },
                tags={TAG_TRIGGER: "source_change", "cfi/views": ",".join(refresh)},
            )
        )
        notes.append(f"refresh {', '.join(refresh)}: their source changed")
    if verified:
        notes.append(f"verified current: {', '.join(verified)}")
    return dg.SensorResult(
        run_requests=requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests else "; ".join(notes) or "nothing to do",
    )


def _signatures(engine: sa.Engine) -> dict[str, Signature]:
    with engine.connect() as conn:
        return probe_signatures(conn)


def _check_events(cursor: ChangeCursor, statuses: dict, now: datetime) -> list:
    """Freshness check evaluations of the views whose result changed, or is due again."""
    out = []
    for spec in VIEWS:
        row = statuses.get(spec.name)
        state = freshness_state(view_age(row, now))
        last = cursor.checks.get(spec.name)
        due = last is None or last[0] != state
        if not due and now - datetime.fromisoformat(last[1]) >= CHECK_HEARTBEAT:
            due = True
        if due:
            result = freshness_check_result(row, now)
            out.append(
                dg.AssetCheckEvaluation(
                    asset_key=view_key(spec.name),
                    check_name="freshness",
                    passed=result.passed,
                    severity=result.severity,
                    description=result.description,
                    metadata=result.metadata,
                )
            )
            cursor.checks[spec.name] = [state, now.isoformat()]
    return out


def build_view_change_sensor(minimum_interval_seconds: int = INTERVAL_S) -> dg.SensorDefinition:
    """The change sensor (built with the definitions: ``CFI_AUTOMATION`` is read then)."""

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        jobs=[refresh_views_job],
        default_status=default_sensor_status(),
        description=(
            "Every 20 s: probes CFI's source tables (max(updated_at), count); refreshes the views "
            "whose source changed, verifies the others current (no run), observes the source "
            "tables and reports each view's freshness check when it changes."
        ),
    )
    def view_change_sensor(
        context: dg.SensorEvaluationContext,
        cfi_source: DatabaseResource,
        cfi_common: DatabaseResource,
    ) -> dg.SensorResult:
        return change_tick(context, cfi_source, cfi_common)

    return view_change_sensor
