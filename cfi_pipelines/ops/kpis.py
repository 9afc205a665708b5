"""``cfi-pipelines kpis``: the targets of the mission against what the logs show.

Over a window (``--window-hours``, default 24) ending now:

========================  ==========================================================
freshness                 per view, the time-weighted average age of the data
                          (now − ``source_snapshot_at`` of the last successful
                          refresh, from ``cfi_refresh_log``): < 5 min for every view
lag incidents             stretches of time a view was > 15 min old: none
SFTP export latency       95th percentile of validation → first delivery, over the
                          revisions first delivered in the window (a manual re-send
                          keeps the first delivery time): < 5 min
SFTP export success       delivered / (delivered + failed after its retries), over the
                          exports requested in the window that reached SFTP: > 99 %
campaign export success   delivered / validated campaigns that passed the export's
                          schema (failed, and pending for more than an hour, count as
                          not delivered): > 98 %. A campaign *rejected* by the schema
                          is MyCfia sending an invalid campaign, not an export that
                          failed: it is counted and shown, never in the rate
fallback success          successful CFI-API snapshots / attempted (``source=cfi_api``
                          in ``cfi_refresh_log``): > 95 %
read latency              average of tenant-scoped probe reads made now (20 per view,
                          through ``cfi_tenant_closure``): < 50 ms
========================  ==========================================================

Each KPI is OK, MISS, NO DATA (nothing to measure in the window: not a miss) or
ERROR (its database could not be read). Exit code: 0 when nothing is MISS or
ERROR, 1 otherwise — so the command can gate a release or back a daily check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.metrics import probe_reads, scrape_engine
from cfi_pipelines.settings import FRESH_WINDOW, INCIDENT_WINDOW, get_settings
from cfi_pipelines.views.spec import VIEWS

Status = Literal["OK", "MISS", "NO DATA", "ERROR"]
EXIT_OK, EXIT_MISSED = 0, 1

EXPORT_LATENCY_TARGET_S = 300.0
SFTP_SUCCESS_TARGET = 0.99
CAMPAIGN_SUCCESS_TARGET = 0.98
FALLBACK_SUCCESS_TARGET = 0.95
READ_LATENCY_TARGET_S = 0.050
PROBES_PER_VIEW = 20
PENDING_IS_STUCK_S = 3600.0
"""A pending export older than this counts as not delivered (younger ones are in flight)."""


@dataclass
class Kpi:
    """One target and what was measured."""

    name: str
    target: str
    measured: str
    status: Status
    value: float | None = None  # the number compared with the target (seconds or a ratio)
    details: dict[str, Any] = field(default_factory=dict)


def _judge(value: float | None, ok: bool) -> Status:
    return "NO DATA" if value is None else ("OK" if ok else "MISS")


# --------------------------------------------------------------------------- freshness


@dataclass(frozen=True)
class Freshness:
    """How old one view's data was over a window (only where it is known)."""

    covered_s: float  # seconds of the window with a known age
    average_age_s: float | None
    max_age_s: float | None
    incidents: int  # stretches with age > 15 min
    incident_s: float


def freshness_over(
    successes: Sequence[tuple[datetime, datetime]],
    start: datetime,
    end: datetime,
    incident_after: timedelta = INCIDENT_WINDOW,
) -> Freshness:
    """Age of a view's data over [start, end] from its successful refreshes.

    ``successes`` are (finished_at, source_snapshot_at) pairs, including the last
    one before ``start``. Between two successes the age grows linearly from
    ``t − snapshot``; before the first known success the age is unknown and that
    time is not counted.
    """
    limit = incident_after.total_seconds()
    events = sorted((f, s) for f, s in successes if f <= end)
    covered = area = 0.0
    max_age: float | None = None
    incidents, incident_s = 0, 0.0
    in_incident = False
    as_of: datetime | None = None
    # boundaries: each success inside the window starts a new segment
    points: list[tuple[datetime, datetime | None]] = []
    for finished, snapshot in events:
        if finished <= start:
            as_of = snapshot if as_of is None else max(as_of, snapshot)
        else:
            points.append((finished, snapshot))
    cursor = start
    for t_next, snap_next in [*points, (end, None)]:
        if as_of is not None and t_next > cursor:
            a0 = (cursor - as_of).total_seconds()
            a1 = (t_next - as_of).total_seconds()
            length = a1 - a0
            covered += length
            area += (a0 + a1) / 2 * length
            max_age = a1 if max_age is None else max(max_age, a1)
            over = max(0.0, a1 - max(a0, limit))
            if over > 0:
                incident_s += over
                if not (in_incident and a0 >= limit):  # else the previous stretch goes on
                    incidents += 1
                in_incident = True
            else:
                in_incident = False
        if snap_next is not None:  # a success: the next segment starts from its snapshot
            as_of = snap_next if as_of is None else max(as_of, snap_next)
        cursor = max(cursor, t_next)
    return Freshness(
        covered_s=covered,
        average_age_s=area / covered if covered > 0 else None,
        max_age_s=max_age,
        incidents=incidents,
        incident_s=incident_s,
    )


def _freshness_kpis(conn: sa.Connection, start: datetime, end: datetime) -> list[Kpi]:
    lg = common.cfi_refresh_log.c
    ok = (lg.outcome == "success") & lg.source_snapshot_at.is_not(None)
    per_view: dict[str, Freshness] = {}
    for spec in VIEWS:
        before = conn.execute(
            sa.select(lg.finished_at, lg.source_snapshot_at)
            .where(ok, lg.view == spec.name, lg.finished_at <= start)
            .order_by(lg.source_snapshot_at.desc())
            .limit(1)
        ).all()
        inside = conn.execute(
            sa.select(lg.finished_at, lg.source_snapshot_at).where(
                ok, lg.view == spec.name, lg.finished_at > start, lg.finished_at <= end
            )
        ).all()
        per_view[spec.name] = freshness_over([tuple(r) for r in [*before, *inside]], start, end)

    known = {v: f for v, f in per_view.items() if f.average_age_s is not None}
    details = {v: asdict(f) for v, f in per_view.items()}
    if known:
        worst = max(known, key=lambda v: known[v].average_age_s or 0.0)
        worst_avg = known[worst].average_age_s or 0.0
        fresh = Kpi(
            "freshness",
            f"average age < {FRESH_WINDOW.total_seconds() / 60:.0f} min (each view)",
            f"worst {worst_avg / 60:.1f} min ({worst}); "
            + ", ".join(
                f"{v} {f.average_age_s / 60:.1f}"
                for v, f in known.items()
                if f.average_age_s is not None
            ),
            "OK" if worst_avg < FRESH_WINDOW.total_seconds() else "MISS",
            worst_avg,
            details,
        )
        if len(known) < len(per_view):
            never = sorted(set(per_view) - set(known))
            fresh.measured += f"; never refreshed: {', '.join(never)}"
            fresh.status = "MISS"
        n = sum(f.incidents for f in known.values())
        minutes = sum(f.incident_s for f in known.values()) / 60
        lag = Kpi(
            "lag incidents",
            f"no view > {INCIDENT_WINDOW.total_seconds() / 60:.0f} min old",
            f"{n} incident(s), {minutes:.1f} min in total"
            + (
                " ("
                + ", ".join(f"{v} {f.incidents}" for v, f in known.items() if f.incidents)
                + ")"
                if n
                else ""
            ),
            "OK" if n == 0 else "MISS",
            float(n),
            details,
        )
    else:
        fresh = Kpi("freshness", "average age < 5 min (each view)", "no refresh logged", "NO DATA")
        lag = Kpi("lag incidents", "no view > 15 min old", "no refresh logged", "NO DATA")
    return [fresh, lag]


def _fallback_kpi(conn: sa.Connection, start: datetime, end: datetime) -> Kpi:
    lg = common.cfi_refresh_log.c
    rows = dict(
        conn.execute(
            sa.select(lg.outcome, sa.func.count())
            .where(lg.source == "cfi_api", lg.started_at > start, lg.started_at <= end)
            .group_by(lg.outcome)
        ).all()
    )
    attempts = sum(rows.values())
    rate = rows.get("success", 0) / attempts if attempts else None
    return Kpi(
        "fallback success",
        f"> {FALLBACK_SUCCESS_TARGET:.0%} of CFI-API snapshots",
        f"{rate:.1%} ({rows.get('success', 0)}/{attempts})" if rate is not None else "no fallback",
        _judge(rate, rate is not None and rate > FALLBACK_SUCCESS_TARGET),
        rate,
        {"by_outcome": rows},
    )


def _read_latency_kpi(conn: sa.Connection) -> Kpi:
    probes = probe_reads(conn, [v.name for v in VIEWS], repeat=PROBES_PER_VIEW)
    times = [t for ts in probes.values() for t in ts]
    avg = sum(times) / len(times) if times else None
    per_view = {v: sum(ts) / len(ts) for v, ts in probes.items()}
    return Kpi(
        "read latency",
        f"average < {READ_LATENCY_TARGET_S * 1000:.0f} ms (probe reads now)",
        f"{avg * 1000:.1f} ms avg over {len(times)} reads; "
        + ", ".join(f"{v} {s * 1000:.1f}" for v, s in per_view.items())
        if avg is not None
        else "no view to probe",
        _judge(avg, avg is not None and avg < READ_LATENCY_TARGET_S),
        avg,
        {"per_view_s": per_view},
    )


# --------------------------------------------------------------------------- exports


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _export_kpis(conn: sa.Connection, start: datetime, end: datetime) -> list[Kpi]:
    e = mycfia.campaign_exports.c
    delivered = conn.execute(
        sa.select(e.validated_at, e.delivered_at).where(
            e.status == "delivered",
            e.validated_at.is_not(None),
            e.delivered_at > start,
            e.delivered_at <= end,
        )
    ).all()
    latencies = [max(0.0, (d - v).total_seconds()) for v, d in delivered]
    p95 = percentile(latencies, 95) if latencies else None
    latency = Kpi(
        "SFTP export latency",
        f"p95 < {EXPORT_LATENCY_TARGET_S / 60:.0f} min (validation → delivered)",
        f"p95 {p95:.0f} s, max {max(latencies):.0f} s over {len(latencies)} deliveries"
        if p95 is not None
        else "no delivery",
        _judge(p95, p95 is not None and p95 < EXPORT_LATENCY_TARGET_S),
        p95,
    )

    requested = conn.execute(
        sa.select(e.status, e.requested_at).where(e.requested_at > start, e.requested_at <= end)
    ).all()
    counts: dict[str, int] = {}
    stuck = 0
    for status, requested_at in requested:
        counts[status] = counts.get(status, 0) + 1
        if status == "pending" and (end - requested_at).total_seconds() > PENDING_IS_STUCK_S:
            stuck += 1
    ok, failed, rejected = (
        counts.get("delivered", 0),
        counts.get("failed", 0),
        counts.get("rejected", 0),
    )

    reached = ok + failed
    sftp_rate = ok / reached if reached else None
    sftp = Kpi(
        "SFTP export success",
        f"> {SFTP_SUCCESS_TARGET:.0%} (delivered / reached SFTP)",
        f"{sftp_rate:.1%} ({ok}/{reached})" if sftp_rate is not None else "no export reached SFTP",
        _judge(sftp_rate, sftp_rate is not None and sftp_rate > SFTP_SUCCESS_TARGET),
        sftp_rate,
        {"by_status": counts},
    )
    decided = ok + failed + stuck  # rejected: MyCfia's invalid campaigns, shown apart
    campaign_rate = ok / decided if decided else None
    campaign = Kpi(
        "campaign export success",
        f"> {CAMPAIGN_SUCCESS_TARGET:.0%} (validated → delivered)",
        (
            f"{campaign_rate:.1%} ({ok}/{decided}; {failed} failed, {stuck} stuck pending; "
            f"{rejected} rejected by validation, not counted)"
        )
        if campaign_rate is not None
        else "no export decided",
        _judge(
            campaign_rate, campaign_rate is not None and campaign_rate > CAMPAIGN_SUCCESS_TARGET
        ),
        campaign_rate,
        {"by_status": counts, "stuck_pending": stuck, "rejected": rejected},
    )
    return [latency, sftp, campaign]


# --------------------------------------------------------------------------- report


def _section(
    url: str, db: str, names: Sequence[str], read: Callable[[sa.Connection], list[Kpi]]
) -> list[Kpi]:
    try:
        engine = scrape_engine(url)
        if engine is None:
            raise FileNotFoundError(f"{url} does not exist")
        with engine.connect() as conn:
            return read(conn)
    except Exception as exc:  # report the KPI as unmeasurable, keep the others
        why = f"{db} DB unreadable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return [Kpi(n, "", why, "ERROR") for n in names]


def collect_kpis(
    window: timedelta = timedelta(hours=24), now: datetime | None = None
) -> dict[str, Any]:
    """The KPIs over ``window`` ending ``now`` (naive UTC), for humans and machines."""
    s = get_settings()
    end = now or utcnow()
    start = end - window
    kpis = [
        *_section(
            s.common_url,
            "common",
            ["freshness", "lag incidents", "fallback success"],
            lambda c: [*_freshness_kpis(c, start, end), _fallback_kpi(c, start, end)],
        ),
        *_section(
            s.mycfia_url,
            "MyCfia",
            ["SFTP export latency", "SFTP export success", "campaign export success"],
            lambda c: _export_kpis(c, start, end),
        ),
        *_section(s.common_url, "common", ["read latency"], lambda c: [_read_latency_kpi(c)]),
    ]
    missed = any(k.status in ("MISS", "ERROR") for k in kpis)
    return {
        "window_hours": window.total_seconds() / 3600,
        "from": start.isoformat() + "Z",
        "to": end.isoformat() + "Z",
        "kpis": [asdict(k) for k in kpis],
        "exit_code": EXIT_MISSED if missed else EXIT_OK,
    }


def _print_table(report: dict[str, Any]) -> None:
    print(f"KPIs from {report['from']} to {report['to']} ({report['window_hours']:g} h)")
    rows = [(k["name"], k["target"], k["status"], k["measured"]) for k in report["kpis"]]
    header = ("kpi", "target", "result")
    w = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    print(f"{'kpi':<{w[0]}}  {'target':<{w[1]}}  {'result':<{w[2]}}  measured")
    for name, target, status, measured in rows:
        print(f"{name:<{w[0]}}  {target:<{w[1]}}  {status:<{w[2]}}  {measured}")


def report(window_hours: float = 24.0, as_json: bool = False) -> int:
    """``cfi-pipelines kpis [--window-hours H] [--json]``; exit 1 when a target is missed."""
    report = collect_kpis(timedelta(hours=window_hours))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_table(report)
    return int(report["exit_code"])
