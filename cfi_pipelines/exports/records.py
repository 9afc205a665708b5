"""MyCfia's ``campaign_exports``: one row per (campaign, revision), the export's history.

Statuses: ``pending`` (built, valid, on its way), ``rejected`` (failed validation:
nothing is sent), ``delivered`` (files and manifest on CFI's drop), ``failed``
(a delivery that failed after its retries, or for a reason no retry can fix).
A delivered revision stays delivered: a failed *re*-send never downgrades it.

A ``failed`` row also says why (``failure_kind``): ``transient`` (the SFTP server
was down or dropped the connection on every attempt of the run) or ``permanent``
(host key, key refused, a bug, built files gone: no retry can fix it). A
transient failure gets a ``next_attempt_at``, with backoff across runs
(:func:`retry_delay`), and the validated-campaigns sensor requests a new run once
it is due, at most :data:`MAX_AUTO_RETRIES` times; a permanent one gets none.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import mycfia as model

TRANSIENT = "transient"
PERMANENT = "permanent"
FailureKind = Literal["transient", "permanent"]

RETRY_BASE_DELAY = timedelta(minutes=1)
RETRY_MAX_DELAY = timedelta(hours=1)
MAX_AUTO_RETRIES = 30
"""Automatic re-tries of a failed-transient revision: 1, 2, 4 ... 32 min then hourly,
about a day of SFTP outage, after which the row stays ``failed`` (already alerted)."""


def retry_delay(transient_failures: int) -> timedelta | None:
    """The wait after the ``transient_failures``-th failed-transient run (1-based)
    before the next automatic re-try, or None once :data:`MAX_AUTO_RETRIES` are spent."""
    if transient_failures < 1 or transient_failures > MAX_AUTO_RETRIES:
        return None
    exponent = min(transient_failures - 1, 30)  # no overflow; capped below anyway
    return min(RETRY_BASE_DELAY * 2**exponent, RETRY_MAX_DELAY)


def record_export(conn: sa.Connection, campaign_id: int, revision: int, **values: Any) -> None:
    """Insert or update the ``campaign_exports`` row of (campaign, revision)."""
    t = model.campaign_exports
    values["updated_at"] = utcnow()
    where = (t.c.campaign_id == campaign_id) & (t.c.revision == revision)
    if conn.execute(sa.update(t).where(where).values(**values)).rowcount == 0:
        values.setdefault("requested_at", values["updated_at"])
        values.setdefault("attempts", 0)
        conn.execute(sa.insert(t).values(campaign_id=campaign_id, revision=revision, **values))


def record_failed_attempt(
    conn: sa.Connection,
    campaign_id: int,
    revision: int,
    error: str,
    *,
    final: bool,
    kind: FailureKind = PERMANENT,
) -> datetime | None:
    """Count a failed delivery attempt: ``failed`` when final, else still ``pending``.

    A final failure records its ``kind``; a ``transient`` one also counts a failed
    run and schedules the next automatic re-try (returned: None when it is not retried,
    i.e. permanent, re-tries exhausted, or not final).

    A revision already delivered keeps its status (its files are on the drop) and
    its ``error`` stays empty; only the attempt is counted.
    """
    t = model.campaign_exports
    delivered = t.c.status == "delivered"
    values: dict[str, Any] = {}
    next_attempt_at: datetime | None = None
    if final:
        row = conn.execute(
            sa.select(t.c.status, t.c.transient_failures).where(
                (t.c.campaign_id == campaign_id) & (t.c.revision == revision)
            )
        ).first()
        if row is not None and row.status == "delivered":
            final = False  # only the attempt is counted (below)
        elif kind == TRANSIENT:
            failures = (row.transient_failures or 0) + 1 if row is not None else 1
            delay = retry_delay(failures)
            next_attempt_at = utcnow() + delay if delay is not None else None
            values.update(
                failure_kind=TRANSIENT, transient_failures=failures, next_attempt_at=next_attempt_at
            )
        else:
            values.update(failure_kind=PERMANENT, next_attempt_at=None)
    record_export(
        conn,
        campaign_id,
        revision,
        status=sa.case((delivered, "delivered"), else_="failed" if final else "pending"),
        attempts=t.c.attempts + 1,
        error=sa.case((delivered, None), else_=error),
        **values,
    )
    return next_attempt_at


def record_delivered(conn: sa.Connection, campaign_id: int, revision: int, **values: Any) -> None:
    """Record a delivery: ``delivered``, one more attempt, no error, no re-try pending."""
    record_export(
        conn,
        campaign_id,
        revision,
        status="delivered",
        attempts=model.campaign_exports.c.attempts + 1,
        error=None,
        failure_kind=None,
        next_attempt_at=None,
        **values,
    )


def latest_export(conn: sa.Connection, campaign_id: int) -> Any:
    """The ``campaign_exports`` row of the campaign's newest revision, or None."""
    t = model.campaign_exports.c
    return conn.execute(
        sa.select(model.campaign_exports)
        .where(t.campaign_id == campaign_id)
        .order_by(t.revision.desc())
        .limit(1)
    ).first()
