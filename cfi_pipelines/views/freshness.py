"""How fresh a view is: its age, the state that age means, one way to say it.

The age is ``now − source_snapshot_at`` of ``cfi_view_status`` (the time the data
is as of, whether it came from CFI's DB or from the API). Windows: PASS up to
5 min, WARN above, ERROR above 15 min or when the view was never refreshed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from cfi_pipelines.clock import utcnow
from cfi_pipelines.settings import FRESH_WINDOW, INCIDENT_WINDOW

State = Literal["PASS", "WARN", "ERROR"]


def view_age(status_row: dict | None, now: datetime | None = None) -> timedelta | None:
    """now − source_snapshot_at, or None when the view was never refreshed."""
    if not status_row or status_row.get("source_snapshot_at") is None:
        return None
    return (now or utcnow()) - status_row["source_snapshot_at"]


def freshness_state(age: timedelta | None) -> State:
    """PASS ≤ 5 min, WARN above, ERROR above 15 min or never refreshed."""
    if age is not None and age <= FRESH_WINDOW:
        return "PASS"
    if age is not None and age <= INCIDENT_WINDOW:
        return "WARN"
    return "ERROR"


def format_age(age: timedelta | float | None) -> str:
    """``never refreshed``, ``42 s old``, ``7.5 min old``, ``23 min old``: the one way ages are printed."""
    if age is None:
        return "never refreshed"
    seconds = age.total_seconds() if isinstance(age, timedelta) else float(age)
    if seconds < 60:
        return f"{seconds:.0f} s old"
    if seconds < 600:
        return f"{seconds / 60:.1f} min old"
    return f"{seconds / 60:.0f} min old"
