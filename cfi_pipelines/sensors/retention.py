"""Retention of the ``campaigns`` dynamic partitions: the instance keeps a bounded set.

One partition per campaign, forever, does not scale: Dagster's dynamic partitions
degrade at tens of thousands of keys (dagster-io/dagster#16260, #15679, #10330), and a
year of campaigns gets there. The delivery history does not need them: it lives in
MyCfia's ``campaign_exports`` table (and the files on CFI's SFTP drop). So
``campaign_partitions_retention`` removes, in bounded batches per tick, the partitions
of campaigns whose export is *settled and old*:

- the campaign's latest export (highest revision in ``campaign_exports``) is
  ``delivered`` or ``rejected``, last changed before the retention window
  (:data:`RETENTION`), the campaign itself unchanged since then, and no newer
  validated revision waiting for its export;
- no run of that partition is in flight (queued, starting, started, canceling);
- no backfill is in progress (the tick is skipped: a backfill may target any key).

A partition is never removed while its export is ``pending`` or ``failed`` (a
re-try due, or a permanent failure the operator must look at), nor when MyCfia has no
export for it yet (its run is about to start). When the instance still holds more
than :data:`MAX_PARTITIONS` keys after that, the oldest settled ones go too, whatever
their age (never the unsettled ones).

Removing a partition removes nothing else: its runs and materializations stay in the
instance's event log, its export row in MyCfia. A re-export of a pruned campaign adds
the partition again: the validated-campaigns sensor sends an add request with each run
request, ``cfi-pipelines export`` calls ``add_dynamic_partitions`` first.

A tick reads at most :data:`SCAN_BUDGET` keys (pages of :data:`PAGE`, from where the
last tick stopped, wrapping around) and MyCfia in chunks of :data:`CHUNK` ids, and
removes at most :data:`DELETE_BATCH` keys (the daemon deletes them one by one).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES
from dagster._core.storage.tags import PARTITION_NAME_TAG

from cfi_pipelines.assets.exports import campaigns_partitions
from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import default_sensor_status, get_settings

RETENTION = timedelta(days=30)
"""A settled campaign's partition is kept this long after its export's last change
(default of ``CFI_PARTITION_RETENTION_DAYS``)."""
MAX_PARTITIONS = 20_000
"""Hard cap on the keys of the ``campaigns`` partitions (unsettled ones are never removed;
default of ``CFI_PARTITION_MAX``)."""
DELETE_BATCH = 1_000
"""Keys removed per tick (the sensor daemon deletes them one statement each)."""
SCAN_BUDGET = 20_000
"""Keys examined per tick."""
PAGE = 500
"""Keys read from the instance per page."""
CHUNK = 500
"""Campaign ids per ``IN (…)`` query to MyCfia (under SQLite's and SQL Server's limits)."""
MINIMUM_INTERVAL_SECONDS = 3600
SETTLED = ("delivered", "rejected")


@dataclass
class RetentionCursor:
    """``after``: the instance's storage-id cursor of the last page examined (None: start)."""

    after: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> RetentionCursor:
        if not text:
            return cls()
        return cls(json.loads(text).get("after"))

    def dump(self) -> str:
        return json.dumps({"after": self.after})


@dataclass
class RetentionPlan:
    """What one tick decided: the keys to delete, and why the others stayed."""

    delete: list[str] = field(default_factory=list)
    total: int = 0
    scanned: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    cursor: RetentionCursor = field(default_factory=RetentionCursor)
    over_cap: int = 0

    def keep(self, reason: str, n: int = 1) -> None:
        if n:
            self.kept[reason] = self.kept.get(reason, 0) + n


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def settlement(
    conn: sa.Connection, campaign_ids: Sequence[int], cutoff: datetime | None
) -> dict[int, str]:
    """Per campaign id: ``"settled"`` (its partition may go) or the reason it stays.

    ``cutoff``: the export and the campaign must be older than it (None: any age).
    Reasons: ``no export``, ``pending``, ``failed``, ``recent``, ``new revision``.
    """
    e = model.campaign_exports.c
    c = model.campaigns.c
    out: dict[int, str] = {}
    for chunk in _chunks(list(campaign_ids), CHUNK):
        latest = (
            sa.select(e.campaign_id, sa.func.max(e.revision).label("revision"))
            .where(e.campaign_id.in_(chunk))
            .group_by(e.campaign_id)
            .subquery()
        )
        query = sa.select(
            e.campaign_id,
            e.revision,
            e.status,
            e.updated_at,
            c.revision.label("c_revision"),
            c.status.label("c_status"),
            c.updated_at.label("c_updated_at"),
        ).select_from(
            model.campaign_exports.join(
                latest,
                (latest.c.campaign_id == e.campaign_id) & (latest.c.revision == e.revision),
            ).outerjoin(model.campaigns, c.id == e.campaign_id)
        )
        for row in conn.execute(query):
            if row.status not in SETTLED:
                out[row.campaign_id] = row.status  # pending / failed: never removed
            elif (
                row.c_status == "validated"
                and row.c_revision is not None
                and row.c_revision > row.revision
            ):
                out[row.campaign_id] = "new revision"  # the validated sensor exports it
            elif cutoff is not None and (
                row.updated_at >= cutoff
                or (row.c_updated_at is not None and row.c_updated_at >= cutoff)
            ):
                out[row.campaign_id] = "recent"
            else:
                out[row.campaign_id] = "settled"
        for cid in chunk:
            out.setdefault(cid, "no export")
    return out


def partitions_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """Partition keys of the runs not finished yet (queued, starting, started, canceling)."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=NOT_FINISHED_STATUSES))
    return {r.tags[PARTITION_NAME_TAG] for r in runs if PARTITION_NAME_TAG in r.tags}


def backfill_in_progress(instance: dg.DagsterInstance) -> bool:
    filters = BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])
    return instance.get_backfills_count(filters=filters) > 0


def _candidates(
    conn: sa.Connection,
    keys: Sequence[str],
    cutoff: datetime | None,
    in_flight: set[str],
    plan: RetentionPlan,
    skip: set[str],
) -> list[str]:
    """The keys of ``keys`` that may go (in order), counting the others' reasons in ``plan``."""
    ids: list[int] = []
    for key in keys:
        if key in skip:
            continue
        if not key.isdigit():
            plan.keep("not a campaign id")
        elif key in in_flight:
            plan.keep("run in flight")
        else:
            ids.append(int(key))
    states = settlement(conn, ids, cutoff) if ids else {}
    out = []
    for cid in ids:
        state = states[cid]
        if state == "settled":
            out.append(str(cid))
        else:
            plan.keep(state)
    return out


def plan_retention(
    instance: dg.DagsterInstance,
    conn: sa.Connection,
    cursor: RetentionCursor,
    now: datetime,
    *,
    retention: timedelta = RETENTION,
    max_partitions: int = MAX_PARTITIONS,
    batch: int = DELETE_BATCH,
    scan_budget: int = SCAN_BUDGET,
    page: int = PAGE,
) -> RetentionPlan:
    """Which ``campaigns`` keys one tick removes (at most ``batch``), and the next cursor."""
    name = campaigns_partitions.name
    assert name is not None
    plan = RetentionPlan(cursor=RetentionCursor(cursor.after))
    plan.total = len(instance.get_dynamic_partitions(name))
    in_flight = partitions_in_flight(instance)
    cutoff = now - retention

    # 1. settled and older than the window, from where the last tick stopped
    after = cursor.after
    while plan.scanned < scan_budget and len(plan.delete) < batch:
        found = instance.get_paginated_dynamic_partitions(
            name, limit=page, ascending=True, cursor=after
        )
        plan.scanned += len(found.results)
        take = _candidates(conn, found.results, cutoff, in_flight, plan, set())
        room = batch - len(plan.delete)
        plan.delete += take[:room]
        if len(take) > room:  # the rest of this page: next tick, from the same page
            plan.keep("batch full", len(take) - room)
            break
        after = found.cursor
        if not found.has_more:
            after = None  # wrap around: the next tick starts again from the oldest
            break
    plan.cursor = RetentionCursor(after)

    # 2. over the cap: the oldest settled keys, whatever their age
    plan.over_cap = max(0, plan.total - len(plan.delete) - max_partitions)
    if plan.over_cap:
        chosen = set(plan.delete)
        want = min(plan.over_cap, batch - len(plan.delete))
        after, scanned = None, 0
        while want > 0 and scanned < scan_budget:
            found = instance.get_paginated_dynamic_partitions(
                name, limit=page, ascending=True, cursor=after
            )
            scanned += len(found.results)
            take = _candidates(conn, found.results, None, in_flight, RetentionPlan(), chosen)
            plan.delete += take[:want]
            chosen.update(take[:want])
            want -= len(take[:want])
            if not found.has_more:
                break
            after = found.cursor
        plan.scanned += scanned
    return plan


def build_retention_sensor(
    clock: Callable[[], datetime] = utcnow,
    *,
    retention: timedelta | None = None,
    max_partitions: int | None = None,
    batch: int = DELETE_BATCH,
    minimum_interval_seconds: int = MINIMUM_INTERVAL_SECONDS,
) -> dg.SensorDefinition:
    """The sensor, on by default unless ``CFI_AUTOMATION=off``; the window and the cap come
    from ``CFI_PARTITION_RETENTION_DAYS`` / ``CFI_PARTITION_MAX`` (read when it is built)."""
    settings = get_settings()
    retention = retention or timedelta(days=settings.partition_retention_days)
    max_partitions = max_partitions or settings.partition_max

    @dg.sensor(
        name="campaign_partitions_retention",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_sensor_status(),
        description=f"Keeps the 'campaigns' dynamic partitions bounded: removes, at most "
        f"{batch} per tick, the partitions of campaigns delivered or rejected more than "
        f"{retention.days} days ago (and the oldest settled ones above {max_partitions} keys); "
        "never one whose export is pending or failed or whose run is in flight. The history "
        "stays in MyCfia's campaign_exports; a re-export adds the partition again.",
    )
    def campaign_partitions_retention(
        context: dg.SensorEvaluationContext, mycfia: DatabaseResource
    ) -> dg.SensorResult:
        cursor = RetentionCursor.parse(context.cursor)
        if backfill_in_progress(context.instance):
            return dg.SensorResult(
                skip_reason="a backfill is in progress: no partition removed",
                cursor=cursor.dump(),
            )
        with mycfia.engine().connect() as conn:
            plan = plan_retention(
                context.instance,
                conn,
                cursor,
                clock(),
                retention=retention,
                max_partitions=max_partitions,
                batch=batch,
            )
        kept = ", ".join(f"{k} {v}" for k, v in sorted(plan.kept.items())) or "none"
        summary = (
            f"{plan.total} 'campaigns' partitions, {plan.scanned} examined, "
            f"{len(plan.delete)} to remove; kept: {kept}"
        )
        context.log.info(summary)
        if not plan.delete:
            return dg.SensorResult(skip_reason=summary, cursor=plan.cursor.dump())
        return dg.SensorResult(
            dynamic_partitions_requests=[campaigns_partitions.build_delete_request(plan.delete)],
            cursor=plan.cursor.dump(),
        )

    return campaign_partitions_retention
