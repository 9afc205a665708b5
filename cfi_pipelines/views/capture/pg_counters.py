"""PostgreSQL without logical decoding: the server's own counters as the idle gate.

``pg_stat_user_tables`` (its functions, for the followed tables' oids) keeps, per table, the rows inserted, updated (HOT or not) and
deleted since the statistics were reset. One query on that view (a few hundred catalog
rows, none of CFI's) says *which* followed tables were written since the last tick,
whatever their size, silent updates and backdated writes included. It is read in
autocommit (a transaction would cache the statistics snapshot). A counter that went
backwards means a statistics reset: every table is then "maybe changed". Counters are
flushed by the writing sessions within about 10 s (PostgreSQL 15), which adds to the
latency, not to the cost.

Not exact: the tables it names are applied by the incremental refresh by ``updated_at``
with its aggregate and delete reconciliation, which does not see a row whose change kept
an old ``updated_at``; the status says "changes seen by the server's counters, applied by
updated_at".
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import Capture, Gate

_COUNTERS = sa.text(
    # the functions behind pg_stat_user_tables, for the followed tables only (by oid):
    # no scan of pg_class for every table of the database
    "SELECT t.name AS relname, pg_stat_get_tuples_inserted(t.oid) AS n_tup_ins, "
    "pg_stat_get_tuples_updated(t.oid) AS n_tup_upd, "
    "pg_stat_get_tuples_deleted(t.oid) AS n_tup_del "
    "FROM (SELECT n AS name, to_regclass(n)::oid AS oid FROM unnest(CAST(:names AS text[])) n) t "
    "WHERE t.oid IS NOT NULL"
)


class PgCounterCapture(Capture):
    mode = "pg_counters"
    exact = False
    guarantee = "no write counted by pg_stat_user_tables; changes applied by updated_at"

    def counters(self) -> dict[str, list[int]]:
        """``{table: [inserted, updated, deleted]}``, one query, O(1) in the data."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            rows = conn.execute(_COUNTERS, {"names": list(self.table_names)}).all()
        return {r.relname: [int(r.n_tup_ins), int(r.n_tup_upd), int(r.n_tup_del)] for r in rows}

    def gate(self, since: str | None) -> Gate:
        now = self.counters()
        position = json.dumps(now, sort_keys=True)
        try:
            before = json.loads(since) if since else None
        except ValueError:
            before = None
        if not isinstance(before, dict):
            return Gate(position, True, None, "first counters: maybe changed")
        if any(
            any(
                a < b for a, b in zip(now.get(t, [0, 0, 0]), before.get(t, [0, 0, 0]), strict=False)
            )
            for t in self.table_names
        ):
            return Gate(position, True, None, "statistics were reset: maybe changed")
        moved = frozenset(t for t in self.table_names if now.get(t) != before.get(t))
        if moved:
            return Gate(position, True, moved, f"counters moved: {', '.join(sorted(moved))}")
        return Gate(position, False, frozenset(), "no write counted (pg_stat_user_tables)")
