"""The validated-campaigns sensor: one export run per new campaign revision.

It reads MyCfia's ``campaigns`` changed since its cursor (index on
``(status, updated_at)``), so a tick costs O(new rows), not O(all campaigns).
Rows committed late with an older ``updated_at`` are caught by re-reading a short
overlap window; the cursor remembers which (campaign, revision) it already
requested inside that window, so nothing is requested twice. Revisions already
delivered or rejected (``campaign_exports``) are skipped, so a fresh Dagster instance does
not re-export history.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.exports import campaign_export_job, campaigns_partitions
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import default_sensor_status

OVERLAP = timedelta(minutes=2)
"""How far back each tick re-reads, for transactions that commit late."""
MAX_RUNS_PER_TICK = 500


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


def build_campaigns_sensor() -> dg.SensorDefinition:
    """The sensor, on by default unless ``CFI_AUTOMATION=off`` (read when it is built)."""

    @dg.sensor(
        name="validated_campaigns_sensor",
        job=campaign_export_job,
        minimum_interval_seconds=15,
        default_status=default_sensor_status(),
        description="Requests one export run per newly validated campaign revision "
        "(run key <campaign id>:r<revision>) and adds its 'campaigns' partition.",
    )
    def validated_campaigns_sensor(
        context: dg.SensorEvaluationContext, mycfia: DatabaseResource
    ) -> dg.SensorResult:
        cursor = CampaignCursor.parse(context.cursor)
        with mycfia.engine().connect() as conn:
            found, next_cursor = scan(conn, cursor)
        if not found:
            return dg.SensorResult(
                skip_reason="no newly validated campaign", cursor=next_cursor.dump()
            )
        ids = sorted({str(cid) for cid, _ in found})
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key(cid, rev),
                    partition_key=str(cid),
                    tags={"cfi/campaign_id": str(cid), "cfi/revision": str(rev)},
                )
                for cid, rev in found
            ],
            dynamic_partitions_requests=[campaigns_partitions.build_add_request(ids)],
            cursor=next_cursor.dump(),
        )

    return validated_campaigns_sensor
