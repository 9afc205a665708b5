"""Time as the project stores and prints it: naive UTC in the databases, ISO 8601 with ``Z`` out."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Naive UTC, as stored in the databases (portable across the three dialects)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso_z(value: datetime | None) -> str | None:
    """``2026-12-01T18:00:00Z`` for a naive-UTC or aware datetime; None stays None."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"
