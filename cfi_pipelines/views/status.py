"""The refresh's bookkeeping in the common DB: ``cfi_view_status`` (one row per
view: last success, watermark, failures), ``cfi_refresh_log`` (one row per attempt)
and ``cfi_tenant_closure`` (the tenant hierarchy the views filter by).

Costs: status reads and writes touch one row per view; the closure is read from
CFI's ``tenants`` table in full (O(tenants), small) and rewritten only when it changed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import write_transaction
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.result import RefreshError, RefreshResult
from cfi_pipelines.views.spec import VIEWS

log = logging.getLogger(__name__)


def init_common(engine: Engine) -> None:
    """Create the common DB's tables (idempotent) and one status row per view."""
    with write_transaction(engine) as conn:
        common.metadata.create_all(conn)
        have = set(conn.scalars(sa.select(common.cfi_view_status.c.view)))
        missing = [{"view": v.name, "consecutive_failures": 0} for v in VIEWS if v.name not in have]
        if missing:
            conn.execute(common.cfi_view_status.insert(), missing)


def _write_status(conn: sa.Connection, view: str, values: dict) -> None:
    t = common.cfi_view_status
    if conn.execute(t.update().where(t.c.view == view).values(**values)).rowcount == 0:
        conn.execute(t.insert().values(view=view, **{"consecutive_failures": 0, **values}))


def _log(conn: sa.Connection, **values) -> None:
    conn.execute(common.cfi_refresh_log.insert().values(**values))


def record_failure(
    engine: Engine,
    view: str,
    *,
    mode: str,
    source: str,
    started_at: datetime,
    error: BaseException | str,
    outcome: str = "failed",
) -> None:
    """Record a failed/refused refresh in the status and the history (best effort)."""
    message = str(error)[:4000]
    now = utcnow()
    try:
        with write_transaction(engine) as conn:
            t = common.cfi_view_status
            _write_status(
                conn,
                view,
                {
                    "last_attempt_at": now,
                    "error": message,
                    "consecutive_failures": t.c.consecutive_failures + 1,
                },
            )
            _log(
                conn,
                view=view,
                started_at=started_at,
                finished_at=now,
                mode=mode,
                source=source,
                outcome=outcome,
                duration_s=(now - started_at).total_seconds(),
                error=message,
            )
    except Exception:  # the common DB itself may be what failed
        log.exception("could not record the failed refresh of %s", view)


def read_status(engine: Engine) -> dict[str, dict]:
    """``cfi_view_status`` as ``{view: row dict}``."""
    with engine.connect() as conn:
        return {r.view: dict(r._mapping) for r in conn.execute(sa.select(common.cfi_view_status))}


def _record_success(conn: sa.Connection, r: RefreshResult, now: datetime) -> None:
    values = {
        "last_success_at": now,
        "last_attempt_at": now,
        "source_snapshot_at": r.source_snapshot_at,
        "rows": r.rows,
        "mode": r.mode,
        "source": r.source,
        "duration_s": r.duration_s,
        "consecutive_failures": 0,
        "error": None,
    }
    if r.source == "db":
        values["watermark"] = r.watermark
    _write_status(conn, r.view, values)
    _log(
        conn,
        view=r.view,
        started_at=now - timedelta(seconds=r.duration_s),
        finished_at=now,
        source_snapshot_at=r.source_snapshot_at,
        mode=r.mode,
        source=r.source,
        outcome="success",
        rows=r.rows,
        inserted=r.inserted,
        updated=r.updated,
        deleted=r.deleted,
        duration_s=r.duration_s,
    )


# --------------------------------------------------------------------------- closure


def tenant_closure(parents: dict[int, int | None]) -> list[tuple[int, int, int]]:
    """(ancestor, descendant, depth) rows, the tenant itself included at depth 0."""
    rows = []
    for tenant in parents:
        seen = set()
        node, depth = tenant, 0
        while node is not None:
            if node in seen:
                raise RefreshError(f"tenant hierarchy has a cycle through tenant {tenant}")
            seen.add(node)
            rows.append((node, tenant, depth))
            node, depth = parents.get(node), depth + 1
    return rows


def _read_closure(source: Engine) -> list[tuple[int, int, int]]:
    with source.connect() as conn:
        parents = dict(conn.execute(sa.select(src.tenants.c.id, src.tenants.c.parent_id)).all())
    return tenant_closure(parents)


def _write_closure(conn: sa.Connection, rows: list[tuple[int, int, int]]) -> None:
    t = common.cfi_tenant_closure
    current = set(conn.execute(sa.select(t.c.ancestor, t.c.descendant, t.c.depth)).tuples())
    if current != set(rows):
        conn.execute(t.delete())
        if rows:  # INSERT, not COPY: PostgreSQL refuses COPY FROM into a table with
            # row-level security (deploy/sql/postgresql_row_level_security.sql forces it)
            keys = ("ancestor", "descendant", "depth")
            conn.execute(t.insert(), [dict(zip(keys, r, strict=True)) for r in rows])
