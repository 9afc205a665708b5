"""The validated-campaigns sensor: an export run per new campaign revision, or per batch.

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

A tick with at most :data:`SINGLE_RUNS_MAX` revisions to export (new + due re-tries)
requests one ``campaign_export`` run each, as always (partition = campaign id). A
burst (a seasonal push: hundreds validated at once) would queue hundreds of runs,
each a process start and an SFTP connection of its own: the tick then requests
``campaign_export_batch`` runs instead, of at most :data:`BATCH_SIZE` campaigns each
(split so that up to :data:`PARALLEL_BATCHES` run side by side), one SFTP connection
per run, run key ``batch:<digest of its members' run keys>``. Batch runs are tagged
``cfi/campaign_id=batch-<digest>``: they count in the ``cfi/campaign_id`` limit of
``dagster.yaml`` (at most 4 SFTP sessions to CFI at once) like single runs.
"""

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.exports import (
    BATCH_JOB_NAME,
    campaign_export_batch_job,
    campaign_export_job,
    campaigns_partitions,
)
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
SINGLE_RUNS_MAX = 4
"""Up to this many revisions to export in a tick: one ``campaign_export`` run each;
more: ``campaign_export_batch`` runs."""
BATCH_SIZE = 50
"""Most campaigns in one batch run (one process, one SFTP connection)."""
MIN_BATCH = 10
PARALLEL_BATCHES = 4
"""A burst is split into at least this many batches (of at least :data:`MIN_BATCH`):
as many as the SFTP session limit lets run at once."""


BATCHED_RETRY_MEMORY = timedelta(hours=1)
"""How long a re-try requested inside a batch is not requested again (see the cursor)."""


@dataclass
class CampaignCursor:
    """``since``: newest ``updated_at`` seen; ``seen``: run keys requested within the overlap;
    ``batched``: re-try run keys requested inside a batch run (-> when, ISO), for an hour.

    A single re-try run is never requested twice because Dagster drops a run key it
    already has. A batch's run key is a digest of its members, which differ from tick to
    tick, so a re-try still due because its batch has not run yet would be requested
    again in another batch: ``batched`` prevents that (forgotten after an hour, so a
    batch that never ran does not block the re-try for good)."""

    since: datetime | None = None
    seen: dict[str, str] = field(default_factory=dict)  # run key -> updated_at (ISO)
    batched: dict[str, str] = field(default_factory=dict)  # re-try run key -> requested (ISO)

    @classmethod
    def parse(cls, text: str | None) -> "CampaignCursor":
        if not text:
            return cls()
        data = json.loads(text)
        since = data.get("since")
        return cls(
            datetime.fromisoformat(since) if since else None,
            dict(data.get("seen", {})),
            dict(data.get("batched", {})),
        )

    def dump(self) -> str:
        data: dict = {"since": self.since.isoformat() if self.since else None, "seen": self.seen}
        if self.batched:
            data["batched"] = self.batched
        return json.dumps(data)


def run_key(campaign_id: int, revision: int) -> str:
    """The run key of one campaign revision's export."""
    return f"{campaign_id}:r{revision}"


def retry_run_key(campaign_id: int, revision: int, round_: int) -> str:
    """The run key of the ``round_``-th automatic re-try of a revision's delivery."""
    return f"{run_key(campaign_id, revision)}:retry{round_}"


@dataclass(frozen=True)
class Due:
    """One revision to export this tick; ``retry``: its automatic re-try round, if any."""

    campaign_id: int
    revision: int
    retry: int | None = None

    @property
    def run_key(self) -> str:
        if self.retry is None:
            return run_key(self.campaign_id, self.revision)
        return retry_run_key(self.campaign_id, self.revision, self.retry)

    @property
    def tags(self) -> dict[str, str]:
        tags = {"cfi/campaign_id": str(self.campaign_id), "cfi/revision": str(self.revision)}
        if self.retry is not None:
            tags["cfi/retry"] = str(self.retry)
        return tags


def split_batches(items: list[Due], batch_size: int = BATCH_SIZE) -> list[list[Due]]:
    """``items`` in order, in even batches of at most ``batch_size``, at least
    :data:`PARALLEL_BATCHES` of them when each still gets :data:`MIN_BATCH`."""
    n = len(items)
    if n == 0:
        return []
    count = max(math.ceil(n / batch_size), min(PARALLEL_BATCHES, n // MIN_BATCH), 1)
    size, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def batch_run_request(batch: list[Due]) -> dg.RunRequest:
    """One ``campaign_export_batch`` run for ``batch`` (deterministic run key)."""
    digest = hashlib.sha1(  # noqa: S324 - a run key, not security
        ",".join(d.run_key for d in batch).encode()
    ).hexdigest()[:16]
    ids = [d.campaign_id for d in batch]
    return dg.RunRequest(
        run_key=f"batch:{digest}",
        job_name=BATCH_JOB_NAME,
        run_config={"ops": {"export_campaign_batch": {"config": {"campaigns": ids}}}},
        tags={
            # counts in dagster.yaml's cfi/campaign_id limits: one SFTP session, like a run
            "cfi/campaign_id": f"batch-{digest}",
            "cfi/batch_size": str(len(batch)),
            "cfi/campaigns": f"{ids[0]}..{ids[-1]}",
            **({"cfi/retry": "batch"} if any(d.retry is not None for d in batch) else {}),
        },
    )


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
    return found, CampaignCursor(since, seen, dict(cursor.batched))


def build_campaigns_sensor(
    clock: Callable[[], datetime] = utcnow,
    *,
    single_runs_max: int = SINGLE_RUNS_MAX,
    batch_size: int = BATCH_SIZE,
) -> dg.SensorDefinition:
    """The sensor, on by default unless ``CFI_AUTOMATION=off`` (read when it is built).

    ``clock``: naive UTC now, compared with ``next_attempt_at`` (tests pass their own);
    ``single_runs_max``/``batch_size``: when to batch, and how many per batch."""

    @dg.sensor(
        name="validated_campaigns_sensor",
        jobs=[campaign_export_job, campaign_export_batch_job],
        # 30 s: a campaign is on the drop within a minute, and an idle daemon stays cheap
        minimum_interval_seconds=30,
        default_status=default_sensor_status(),
        description="Requests one export run per newly validated campaign revision "
        "(run key <campaign id>:r<revision>) and adds its 'campaigns' partition; re-tries "
        "deliveries that failed while SFTP was down, with backoff "
        "(run key <campaign id>:r<revision>:retry<k>). More than "
        f"{single_runs_max} due at once: campaign_export_batch runs of up to {batch_size} "
        "campaigns each (run key batch:<digest>).",
    )
    def validated_campaigns_sensor(
        context: dg.SensorEvaluationContext, mycfia: DatabaseResource
    ) -> dg.SensorResult:
        cursor = CampaignCursor.parse(context.cursor)
        now = clock()
        with mycfia.engine().connect() as conn:
            found, next_cursor = scan(conn, cursor)
            due = scan_due(conn, now)
        floor = (now - BATCHED_RETRY_MEMORY).isoformat()
        batched = {k: v for k, v in next_cursor.batched.items() if v >= floor}
        todo = [Due(cid, rev) for cid, rev in found]
        new = set(found)
        todo += [
            d
            for d in (Due(cid, rev, round_) for cid, rev, round_ in due if (cid, rev) not in new)
            if d.run_key not in batched  # already requested in a batch that has not run yet
        ]
        if len(todo) <= single_runs_max:
            requests = [
                dg.RunRequest(
                    run_key=d.run_key,
                    job_name=campaign_export_job.name,
                    partition_key=str(d.campaign_id),
                    tags=d.tags,
                )
                for d in todo
            ]
        else:
            requests = [batch_run_request(b) for b in split_batches(todo, batch_size)]
            batched.update({d.run_key: now.isoformat() for d in todo if d.retry is not None})
        next_cursor.batched = batched
        if not requests:
            return dg.SensorResult(
                skip_reason="no newly validated campaign, no delivery re-try due",
                cursor=next_cursor.dump(),
            )
        ids = sorted({str(d.campaign_id) for d in todo})
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[campaigns_partitions.build_add_request(ids)],
            cursor=next_cursor.dump(),
        )

    return validated_campaigns_sensor
