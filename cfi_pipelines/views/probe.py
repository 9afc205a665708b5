"""What changed in CFI's source: a cheap signature per source table, and what it means per view.

A table's signature is ``(max(updated_at), count(*))``: the indexed watermark moves
on every insert and update, the count on every delete (an insert and a delete in
the same interval still move the watermark). Comparing signatures between probes
says *when* each table last changed, as seen by the prober; a view needs a refresh
exactly when one of its tables changed after the view's data was read
(``cfi_view_status.source_snapshot_at``), and is otherwise verified current as of
the probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from cfi_pipelines.views.spec import VIEWS, ViewSpec


@dataclass(frozen=True)
class Signature:
    """One source table's change signature."""

    max_updated_at: str | None  # ISO text: comparable and JSON-safe across dialects
    rows: int

    def as_list(self) -> list:
        return [self.max_updated_at, self.rows]


def view_source_tables(spec: ViewSpec) -> tuple[sa.Table, ...]:
    """The source tables whose changes the view follows (its change columns' tables)."""
    seen: dict[str, sa.Table] = {}
    for col in spec.change_columns:
        seen.setdefault(col.table.name, col.table)
    return tuple(seen.values())


def source_tables(views: Iterable[ViewSpec] = VIEWS) -> tuple[sa.Table, ...]:
    """Every source table some view follows, once, in a stable order."""
    seen: dict[str, sa.Table] = {}
    for spec in views:
        for t in view_source_tables(spec):
            seen.setdefault(t.name, t)
    return tuple(seen.values())


def probe_signatures(
    conn: sa.Connection, tables: Iterable[sa.Table] | None = None
) -> dict[str, Signature]:
    """``{table name: Signature}``: one ``max(updated_at), count(*)`` per table (indexed max;
    the count reads the smallest index)."""
    out = {}
    for t in tables or source_tables():
        newest, rows = conn.execute(
            sa.select(sa.func.max(t.c.updated_at), sa.func.count()).select_from(t)
        ).one()
        if newest is not None and not isinstance(newest, str):
            newest = newest.isoformat()
        out[t.name] = Signature(newest, int(rows))
    return out


@dataclass(frozen=True)
class ViewVerdict:
    """What one probe means for one view."""

    view: str
    needs_refresh: bool
    changed_at: datetime | None  # when the prober first saw the newest change of its tables
    reason: str


def judge_views(
    seen_at: Mapping[str, datetime],
    statuses: Mapping[str, Mapping],
    views: Iterable[ViewSpec] = VIEWS,
) -> list[ViewVerdict]:
    """Per view: a refresh is needed when it was never refreshed, or when one of its
    tables changed after its data was read (``source_snapshot_at``)."""
    out = []
    for spec in views:
        row = statuses.get(spec.name) or {}
        snapshot = row.get("source_snapshot_at")
        times = [seen_at[t.name] for t in view_source_tables(spec) if t.name in seen_at]
        changed = max(times) if times else None
        if snapshot is None:
            out.append(ViewVerdict(spec.name, True, changed, "never refreshed"))
        elif changed is not None and changed > snapshot:
            out.append(
                ViewVerdict(spec.name, True, changed, "its source changed after its data was read")
            )
        else:
            out.append(
                ViewVerdict(spec.name, False, changed, "source unchanged since its data was read")
            )
    return out
