"""The portable path: a signature per followed table, ``(max(updated_at), count(*))``.

Not exact: a quiet signature proves only "no change by ``updated_at`` and row count". It
misses an UPDATE that does not touch ``updated_at``, a write stamped earlier than the
table's newest row, and a delete balanced by a backdated insert; the incremental refresh
by ``updated_at`` (with its aggregate and delete reconciliation) applies what it sees.
Cost: the ``max`` is an index probe, the ``count(*)`` reads the table's smallest index:
O(table). Other modes run it only behind an O(1) gate (SQLite's data_version).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import Capture, Gate


def signatures(conn: sa.Connection, tables: Iterable[sa.Table]) -> dict[str, list]:
    """``{table: [max(updated_at) as ISO text or None, rows]}``. O(table) per table."""
    out = {}
    for t in tables:
        newest, rows = conn.execute(
            sa.select(sa.func.max(t.c.updated_at), sa.func.count()).select_from(t)
        ).one()
        if newest is not None and not isinstance(newest, str):
            newest = newest.isoformat()
        out[t.name] = [newest, int(rows)]
    return out


def _load(position: str | None) -> dict:
    try:
        return json.loads(position) if position else {}
    except ValueError:
        return {}


def compare(since: str | None, sigs: dict[str, list], note: str) -> Gate:
    """A gate from new signatures against the ones in ``since``."""
    before = _load(since).get("sig")
    position = json.dumps({"sig": sigs}, sort_keys=True)
    if before is None:
        return Gate(position, True, None, "first signatures")
    moved = frozenset(n for n, sig in sigs.items() if before.get(n) != sig)
    if moved:
        return Gate(position, True, moved, f"{note}: {', '.join(sorted(moved))} moved")
    return Gate(position, False, frozenset(), f"{note}: no change by updated_at")


class TimestampCapture(Capture):
    mode = "timestamp"
    exact = False
    guarantee = "no change by updated_at (silent updates, backdated writes not seen)"

    def gate(self, since: str | None) -> Gate:
        """``max(updated_at), count(*)`` of every followed table: O(table)."""
        with self.engine.connect() as conn:
            return compare(since, signatures(conn, self.tables), "signatures")
