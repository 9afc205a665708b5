"""MyCfia's ``campaign_exports``: one row per (campaign, revision), the export's history.

Statuses: ``pending`` (built, valid, on its way), ``rejected`` (failed validation:
nothing is sent), ``delivered`` (files and manifest on CFI's drop), ``failed``
(a delivery that failed after its retries, or for a reason no retry can fix).
A delivered revision stays delivered: a failed *re*-send never downgrades it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.model import mycfia as model


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
    conn: sa.Connection, campaign_id: int, revision: int, error: str, *, final: bool
) -> None:
    """Count a failed delivery attempt: ``failed`` when final, else still ``pending``.

    A revision already delivered keeps its status (its files are on the drop) and
    its ``error`` stays empty; only the attempt is counted.
    """
    t = model.campaign_exports
    delivered = t.c.status == "delivered"
    record_export(
        conn,
        campaign_id,
        revision,
        status=sa.case((delivered, "delivered"), else_="failed" if final else "pending"),
        attempts=t.c.attempts + 1,
        error=sa.case((delivered, None), else_=error),
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
