"""What changed in CFI's source, per view: the tables each view follows, and the verdict.

The change sensor learns *which* followed tables changed, and when, from the source's
change capture (:mod:`cfi_pipelines.views.capture`: one gate query per tick, per
engine). A view needs a refresh exactly when one of its tables changed after the view's
data was read (``cfi_view_status.source_snapshot_at``), and is otherwise verified
current as of the gate, as far as the capture can know (:func:`judge_views`, used for the
captures that are not exact; exact ones compare positions instead).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from cfi_pipelines.views.spec import VIEWS, ViewSpec


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
