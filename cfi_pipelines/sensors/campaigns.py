"""The validated-campaigns sensor: one export run per new campaign revision.

It reads MyCfia's ``campaigns`` changed since its cursor (index on
``(status, updated_at)``), so a tick costs O(new rows), not O(all campaigns).
Rows committed late with an older ``updated_at`` are caught by re-reading a short
overlap window; the cursor remembers which (campaign, revision) it already
requested inside that window, so nothing is requested twice. Revisions already
delivered or rejected (``campaign_exports``) are skipped, so a fresh Dagster instance does
not re-export history.

Each tick also re-requests the deliveries that failed for a transient reason (SFTP
down on every attempt of their run) once their ``next_attempt_at`` is due (index on
``(status, next_attempt_at)``, at most :data:`MAX_RETRY_RUNS_PER_TICK`), with a run
key per re-try round, ``<id>:r<rev>:retry<k>``. The backoff and the bound live in
:mod:`cfi_pipelines.exports.records`; permanent failures are never re-tried. A tick
thus costs O(new + due) rows.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.exports import campaign_export_job, campaigns_partitions
from cfi_pipelines.clock import utcnow
from cfi_pipelines.exports.records import TRANSIENT
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import default_sensor_status

OVERLAP = timedelta(minutes=2)
"""How far back each tick re-reads, for transactions that commit late."""
MAX_RUNS_PER_TICK = 500
MAX_RETRY_RUNS_PER_TICK = 100
"""Due automatic re-tries requested per tick (the rest are due at the next tick)."""


@dataclass
class CampaignCursor:
    """``since``: newest ``updated_at`` seen; ``seen``: run keys requested within the overlap."""

    since: datetime | None = None
    seen: dict[str, str] = field(default_factory=dict)  # run key -> updated_at (ISO)

    @classmethod
    def parse(cls, text: str | None) -> "CampaignCursor":
        if not text:
            return cls()
        data = json.loads(text)
        since = data.get("since")
        return cls(datetime.fromisoformat(since) if since else None, dict(data.get("seen", {})))

    def dump(self) -> str:
        return json.dumps(
            {"since": self.since.isoformat() if self.since else None, "seen": self.seen}
        )


def run_key(campaign_id: int, revision: int) -> str:
    """The run key of one campaign revision's export."""
    return f"{campaign_id}:r{revision}"


def retry_run_key(campaign_id: int, revision: int, round_: int) -> str:
    """The run key of the ``round_``-th automatic re-try of a revision's delivery."""
    return f"{run_key(campaign_id, revision)}:retry{round_}"


def scan_due(
    conn: sa.Connection, now: datetime, limit: int = MAX_RETRY_RUNS_PER_TICK
) -> list[tuple[int, int, int]]:
    """(campaign id, revision, re-try round) of failed-transient deliveries due at ``now``.

    Only the campaign's current revision, still validated: an edit is a new revision,
    which the main scan requests anyway.
    """
    c = model.campaigns.c
    e = model.campaign_exports.c
    query = (
        sa.select(e.campaign_id, e.revision, e.transient_failures)
        .join_from(
            model.campaign_exports,
            model.campaigns,
            (c.id == e.campaign_id) & (c.revision == e.revision),
        )
        .where(
            (e.status == "failed")
            & (e.next_attempt_at <= now)
            & (e.failure_kind == TRANSIENT)
            & (c.status == "validated")
        )
        .order_by(e.next_attempt_at, e.campaign_id)
        .limit(limit)
    )
    return [(cid, rev, failures or 1) for cid, rev, failures in conn.execute(query)]


def scan(
    conn: sa.Connection, cursor: CampaignCursor, limit: int = MAX_RUNS_PER_TICK
) -> tuple[list[tuple[int, int]], CampaignCursor]:
    """New validated (campaign id, revision) pairs since ``cursor``, and the next cursor."""
    c = model.campaigns.c
    e = model.campaign_exports.c
    # delivered or rejected: that revision is settled (a fix to a rejected campaign
    # is an edit, hence a new revision); a manual re-export is `cfi-pipelines export`
    delivered = sa.exists().where(
        (e.campaign_id == c.id)
        & (e.revision == c.revision)
        & (e.status.in_(("delivered", "rejected")))
    )
    query = sa.select(c.id, c.revision, c.updated_at).where(c.status == "validated", ~delivered)
    if cursor.since is not None:
        query = query.where(c.updated_at >= cursor.since - OVERLAP)
    query = query.order_by(c.updated_at, c.id).limit(len(cursor.seen) + limit)

    found: list[tuple[int, int]] = []
    since = cursor.since
    seen = dict(cursor.seen)
    for cid, rev, updated_at in conn.execute(query):
        key = run_key(cid, rev)
        if key in seen:
            continue
        if len(found) >= limit:
            break
        found.append((cid, rev))
        seen[key] = updated_at.isoformat()
        since = updated_at if since is None or updated_at > since else since
    if since is not None:
        floor = (since - OVERLAP).isoformat()
        seen = {k: v for k, v in seen.items() if v >= floor}
    return found, CampaignCursor(since, seen)


def build_campaigns_sensor(clock: Callable[[], datetime] = utcnow) -> dg.SensorDefinition:
    """The sensor, on by default unless ``CFI_AUTOMATION=off`` (read when it is built).

    ``clock``: naive UTC now, compared with ``next_attempt_at`` (tests pass their own)."""

    @dg.sensor(
        name="validated_campaigns_sensor",
        job=campaign_export_job,
        minimum_interval_seconds=15,
        default_status=default_sensor_status(),
        description="Requests one export run per newly validated campaign revision "
        "(run key <campaign id>:r<revision>) and adds its 'campaigns' partition; re-tries "
        "deliveries that failed while SFTP was down, with backoff "
        "(run key <campaign id>:r<revision>:retry<k>).",
    )
    def validated_campaigns_sensor(
        context: dg.SensorEvaluationContext, mycfia: DatabaseResource
    ) -> dg.SensorResult:
        cursor = CampaignCursor.parse(context.cursor)
        with mycfia.engine().connect() as conn:
            found, next_cursor = scan(conn, cursor)
            due = scan_due(conn, clock())
        requests = [
            dg.RunRequest(
                run_key=run_key(cid, rev),
                partition_key=str(cid),
                tags={"cfi/campaign_id": str(cid), "cfi/revision": str(rev)},
            )
            for cid, rev in found
        ]
        new = set(found)
        for cid, rev, round_ in due:
            if (cid, rev) in new:  # requested above (e.g. a fresh cursor)
                continue
            requests.append(
                dg.RunRequest(
                    run_key=retry_run_key(cid, rev, round_),
                    partition_key=str(cid),
                    tags={
                        "cfi/campaign_id": str(cid),
                        "cfi/revision": str(rev),
                        "cfi/retry": str(round_),
                    },
                )
            )
        if not requests:
            return dg.SensorResult(
                skip_reason="no newly validated campaign, no delivery re-try due",
                cursor=next_cursor.dump(),
            )
        ids = sorted({r.partition_key for r in requests if r.partition_key})
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[campaigns_partitions.build_add_request(ids)],
            cursor=next_cursor.dump(),
        )

    return validated_campaigns_sensor
