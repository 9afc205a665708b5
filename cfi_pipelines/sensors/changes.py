"""The change sensor: refresh a view when CFI's source changed, and only then.

Every 10 s it asks the source's change capture (:mod:`cfi_pipelines.views.capture`,
chosen per engine: PostgreSQL logical decoding or its counter gate, SQL Server Change
Tracking, SQLite's data_version, else the ``updated_at`` signatures) one cheap **gate**
question — "did anything the views follow change?" — under the same deadline as the lag
sensor, and reads ``cfi_view_status`` and the views' capture positions. Then, in one tick:

- a source table the gate names as changed is *observed* (``AssetObservation`` on
  ``cfi_source/<table>``, with the capture mode and the latest change);
- the views that have changes to take get **one** ``refresh_views`` run (``auto``:
  applied by key from the change log when the capture is exact, incremental by
  ``updated_at`` otherwise), unless a refresh or fallback of that view is already queued
  or running; a view whose last refreshes failed is retried with a backoff (40 s, 80 s …
  up to 15 min);
- every other view is *verified current as far as the capture can know*: its
  ``source_snapshot_at`` moves to the gate's time and a ``verified`` line goes to
  ``cfi_refresh_log`` once a minute. With an exact capture that means "no change in the
  change log"; otherwise only what the mode proves (e.g. "no change by updated_at"),
  which the tick's message says;
- the freshness check of each view is evaluated from that status and reported
  (``AssetCheckEvaluation``) when its result changes, and every 10 min.

If CFI's source DB or the common DB does not answer, the tick does nothing: the lag
sensor (60 s) owns those cases (fallback to the CFI API, alerts).
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
from cfi_pipelines.views.capture import Capture, Gate, capture_for
from cfi_pipelines.views.freshness import freshness_state, view_age
from cfi_pipelines.views.positions import read_modes, write_position
from cfi_pipelines.views.probe import judge_views, view_source_tables
from cfi_pipelines.views.refresh import read_status
from cfi_pipelines.views.spec import VIEWS

SENSOR_NAME = "view_change_sensor"
INTERVAL_S = 10
VERIFIED_LOG_EVERY = timedelta(seconds=60)
CHECK_HEARTBEAT = timedelta(minutes=10)
RETRY_BASE = timedelta(seconds=40)
TAG_TRIGGER = "cfi/trigger"
EXACT_FROM = "0/0"
"""``since`` of an exact gate: every change still pending in the log counts (each view
is then judged against its own position)."""


@dataclass
class ChangeCursor:
    """The last gate position; per table: when this sensor saw it change and its latest
    change (position or signature); per view: the freshness state last reported and when
    a ``verified`` line was last logged."""

    tables: dict[str, list] = field(default_factory=dict)  # name -> [latest, seen_at iso]
    checks: dict[str, list] = field(default_factory=dict)  # view -> [state, reported_at]
    logged: dict[str, str] = field(default_factory=dict)  # view -> verified logged at
    position: str | None = None  # the gate's last position (non-exact modes)
    mode: str = ""  # the capture mode that made ``position``

    @classmethod
    def parse(cls, text: str | None) -> ChangeCursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            tables = {
                k: v for k, v in dict(data["tables"]).items() if isinstance(v, list) and len(v) == 2
            }
            return cls(
                tables,
                dict(data["checks"]),
                dict(data["logged"]),
                data.get("position"),
                data.get("mode") or "",
            )
        except (ValueError, TypeError, KeyError):  # unreadable: start afresh, never crash
            return cls()

    def dump(self) -> str:
        return json.dumps(
            {
                "tables": self.tables,
                "checks": self.checks,
                "logged": self.logged,
                "position": self.position,
                "mode": self.mode,
            },
            sort_keys=True,
        )

    def seen_at(self) -> dict[str, datetime]:
        return {name: datetime.fromisoformat(v[1]) for name, v in self.tables.items()}


def _first_seen(latest: list | None, now: datetime) -> datetime:
    """A table seen for the first time changed no later than its newest ``updated_at``
    (when the capture's position carries it), else now."""
    if not latest or latest[0] is None:
        return now
    try:
        return min(now, datetime.fromisoformat(str(latest[0]).replace("Z", "")))
    except ValueError:
        return now


def _signature_of(gate: Gate, table: str) -> list | None:
    """The ``[max(updated_at), rows]`` the timestamp-family positions carry, if any."""
    try:
        sig = json.loads(gate.position).get("sig", {}).get(table)
    except (ValueError, AttributeError):
        return None
    return sig if isinstance(sig, list) else None


def _latest_change(gate: Gate, table: str, sig: list | None) -> str:
    """What the capture knows of ``table``'s latest change, said in its own terms: the
    commit's LSN (logical decoding), the newest ``updated_at`` and the row count
    (timestamp family), or the write counters (``pg_stat_user_tables``)."""
    if lsn := (gate.latest or {}).get(table):
        return f"commit at LSN {lsn}"
    if sig:
        return f"max(updated_at) {sig[0] or '-'}, {int(sig[1]):,} rows"
    try:
        counters = json.loads(gate.position).get(table)
    except (ValueError, AttributeError, TypeError):
        return ""
    if isinstance(counters, list) and len(counters) == 3:
        ins, upd, dele = counters
        return f"writes counted: {ins:,} inserted, {upd:,} updated, {dele:,} deleted"
    return ""


def observe(cursor: ChangeCursor, capture: Capture, gate: Gate, now: datetime, fresh: bool) -> list:
    """Record the tables the gate names as changed (all of them on a fresh cursor); an
    ``AssetObservation`` per table with the capture mode and its latest change."""
    events = []
    tables = capture.table_names if fresh else sorted(gate.suspects(capture.table_names))
    for name in tables:
        sig = _signature_of(gate, name)
        latest = (gate.latest or {}).get(name) or (json.dumps(sig) if sig else gate.position)
        prev = cursor.tables.get(name)
        if prev is not None and prev[0] == latest:
            continue
        seen = now if prev is not None or not fresh else _first_seen(sig, now)
        if fresh and prev is None and gate.changed and name in (gate.tables or ()):
            seen = now
        cursor.tables[name] = [latest, seen.isoformat()]
        metadata = {
            "capture_mode": capture.mode,
            "latest_change": _latest_change(gate, name, sig),
            "change_seen_at": iso_z(seen) or "",
            "capture_note": gate.note,
        }
        if sig:
            metadata["max_updated_at"] = sig[0] or ""
            metadata["rows"] = dg.MetadataValue.int(int(sig[1]))
        events.append(dg.AssetObservation(asset_key=source_key(name), metadata=metadata))
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


def _gate(engine: sa.Engine, cursor: ChangeCursor) -> tuple[Capture, Gate]:
    capture = capture_for(engine)
    if capture.exact:
        return capture, capture.gate(EXACT_FROM)
    since = cursor.position if cursor.mode == capture.mode else None
    return capture, capture.gate(since)


def _common_state(engine: sa.Engine) -> tuple[dict, dict]:
    return read_status(engine), read_modes(engine)


def _exact_needs(capture: Capture, gate: Gate, positions: dict[str, tuple[str, str]]) -> dict:
    """Per view that has changes to apply (exact capture): why."""
    needs = {}
    latest = gate.latest or {}
    for spec in VIEWS:
        mode, pos = positions.get(spec.name, ("", ""))
        if mode != capture.mode:
            needs[spec.name] = "no capture position yet: full refresh"
        elif gate.changed and gate.tables is None:
            needs[spec.name] = gate.note
        elif any(
            t.name in latest and capture.sort_key(latest[t.name]) > capture.sort_key(pos)
            for t in view_source_tables(spec)
        ):
            needs[spec.name] = "changes in the change log"
    return needs


def _catch_up(
    conn: sa.Connection,
    capture: Capture,
    gate: Gate,
    verified: list[str],
    positions: dict[str, tuple[str, str]],
) -> dict[str, str]:
    """Exact capture: a verified view has no pending change of its tables up to the gate's
    position, so its position moves there (a view whose tables are quiet would otherwise
    hold the slot back forever, and the gate would decode an ever-longer backlog). Never
    backwards; only views that already have a position in this mode. ``{view: position}``."""
    moved = {}
    for view in verified:
        mode, pos = positions.get(view, ("", ""))
        if mode == capture.mode and capture.sort_key(gate.position) > capture.sort_key(pos):
            write_position(conn, view, capture.mode, gate.position)
            moved[view] = gate.position
    return moved


def change_tick(
    context: dg.SensorEvaluationContext, cfi_source: DatabaseResource, cfi_common: DatabaseResource
) -> dg.SensorResult:
    """One tick (see the module docstring)."""
    cursor = ChangeCursor.parse(context.cursor)
    probed_at = utcnow()  # the source is at least this fresh when its gate answers
    probes = probe_all(
        {
            "source": lambda: _gate(cfi_source.engine(), cursor),
            "common": lambda: _common_state(cfi_common.engine()),
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
    capture, gate = src.value
    statuses, positions = com.value
    fresh = not cursor.tables if capture.exact else cursor.mode != capture.mode
    events: list = observe(cursor, capture, gate, probed_at, fresh)
    cursor.position, cursor.mode = gate.position, capture.mode
    if gate.busy:
        events += _check_events(cursor, statuses, probed_at)
        return dg.SensorResult(
            asset_events=events,
            cursor=cursor.dump(),
            skip_reason=f"{capture.mode}: {gate.note}; judged next tick",
        )
    if capture.exact:
        needs = _exact_needs(capture, gate, positions)
        verdicts = [(v.name, v.name in needs) for v in VIEWS]
        knows = "no change in the change log"
    else:
        verdicts = [(v.view, v.needs_refresh) for v in judge_views(cursor.seen_at(), statuses)]
        knows = capture.guarantee
    refresh, verified, notes = [], [], []
    for view, needs_refresh in verdicts:
        row = statuses.get(view) or {}
        if running := view_run_in_flight(context.instance, view):
            notes.append(f"{view}: run {running[:8]} in flight")
        elif needs_refresh or row.get("source") not in (None, "db"):
            if _backing_off(row, probed_at):
                notes.append(f"{view}: last refresh failed, backing off")
            else:
                refresh.append(view)
        else:
            verified.append(view)
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
                caught_up = (
                    _catch_up(conn, capture, gate, verified, positions) if capture.exact else {}
                )
            for v in log & set(moved):
                cursor.logged[v] = probed_at.isoformat()
            for v in moved:
                statuses[v] = {**statuses[v], "source_snapshot_at": probed_at}
            if caught_up:
                # after the commit: the log may forget what every view is now past
                mine = {v: p for v, (m, p) in positions.items() if m == capture.mode}
                capture.release({**mine, **caught_up}.values())
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
        notes.append(f"refresh {', '.join(refresh)}: their source changed ({capture.mode})")
    if verified:
        notes.append(f"verified current ({capture.mode}: {knows}): {', '.join(verified)}")
    return dg.SensorResult(
        run_requests=requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests else "; ".join(notes) or "nothing to do",
    )


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
            "Every 10 s: one gate query on CFI's source change capture (logical decoding, change "
            "tracking, counters or data_version, per engine); refreshes the views whose source "
            "changed (applied by key when the capture is exact), verifies the others current as "
            "far as the capture knows (no run), observes the changed source tables and reports "
            "each view's freshness check when it changes."
        ),
    )
    def view_change_sensor(
        context: dg.SensorEvaluationContext,
        cfi_source: DatabaseResource,
        cfi_common: DatabaseResource,
    ) -> dg.SensorResult:
        return change_tick(context, cfi_source, cfi_common)

    return view_change_sensor
