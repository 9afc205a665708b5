"""SQL Server (CFI's production engine): exact changes from Change Tracking.

What CFI's DBA enables once (``deploy/sql/sqlserver_change_tracking.sql``): Change
Tracking on the database (2 days of retention, auto cleanup) and on each table the
views read, snapshot isolation, and ``VIEW CHANGE TRACKING`` for the reading account.
No object of ours lives in CFI's database: the position is a version number we store.

- **gate**: ``SELECT CHANGE_TRACKING_CURRENT_VERSION()``, one query whatever the size of
  the tables (the version of the last committed transaction of the whole database).
  Unchanged since the stored position: nothing moved, proved. Moved: one more query
  (``MAX(SYS_CHANGE_VERSION)`` of ``CHANGETABLE(CHANGES t, @since)`` per followed
  table, O(changes): CT's side tables are keyed by version) names the tables that
  changed, and the newest change of each; a write to a table we do not follow leaves
  ``changed`` False.
- **changes**: in one SNAPSHOT transaction (so the version, the changed keys and the
  row images are of one instant): ``CHANGE_TRACKING_MIN_VALID_VERSION`` of each table
  against the stored position (past it, or the table truncated: :class:`CaptureLost`,
  the caller does a full refresh and logs why), ``CHANGE_TRACKING_CURRENT_VERSION()`` as
  the new position, then per table ``CHANGETABLE(CHANGES t, @since)`` LEFT JOINed to
  the table by primary key: the primary key, I/U/D (``SYS_CHANGE_OPERATION``) and the
  row as it is now. O(changes).

What Change Tracking gives, and so what the apply can derive (see
:class:`~cfi_pipelines.views.capture.base.RowChange`):

- the *net* change per primary key since the position (a row inserted then updated
  is one ``I``; ``SYS_CHANGE_VERSION`` is its last change), never the intermediate
  images, and for U and D **only the primary key** of the old row
  (``old_complete=False``). Every changed row's *current* image is exact (``new``).
- Exact from the key alone: a deleted row whose key is the view's key
  (``operations``, ``invoices``, ``campaigns`` rows), or names a column the cache
  carries (a deleted product, warehouse, client or operation: the cache rows with that
  ``product_id``/``warehouse_id``/``client_id``/``operation_id``), and a deleted
  ``operation_products`` row (its key holds ``operation_id``: the parent is known).
- Not derivable from the key (the old row's other columns are gone): the parent a
  child row *left*, when the child's key is a surrogate ``id`` — a deleted or moved
  ``invoice_lines``/``payments`` row (its invoice), ``campaign_targets``/
  ``campaign_results`` row (its campaign), ``campaigns`` row (its operation's
  ``campaign_count``), and a deleted ``stock_levels`` row (the stocks view is keyed by
  ``product_id, warehouse_id``, which the cache holds but CT does not give). For those
  the apply falls back to the aggregate and delete reconciliation of the affected
  views (:func:`cfi_pipelines.views.incremental.stale_keys`,
  :func:`cfi_pipelines.views.reconcile.deleted_keys`), which cost O(table), and says so
  in the log. The new parent of a moved child is exact (it is in ``new``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import (
    Capture,
    CaptureLost,
    CaptureUnavailable,
    ChangeSet,
    Gate,
    RowChange,
)

log = logging.getLogger(__name__)

DBA_SCRIPT = "deploy/sql/sqlserver_change_tracking.sql"
CURRENT_VERSION = sa.text("SELECT CHANGE_TRACKING_CURRENT_VERSION() AS v")
OPERATIONS = {"I", "U", "D"}


# --------------------------------------------------------------------------- statements


def _quoted(table: sa.Table, prep: Any) -> str:
    """``[schema].[name]``, or ``[name]`` in the reading account's default schema (as the
    view queries read it)."""
    return prep.format_table(table)


def _object_id(table: sa.Table, prep: Any) -> str:
    return f"OBJECT_ID(N'{_quoted(table, prep)}')"


def moved_tables_sql(tables: Sequence[sa.Table], prep: Any) -> sa.TextClause:
    """Per followed table ``i``: ``l<i>`` the newest change after ``:since`` (NULL: none)
    and ``m<i>`` its minimum valid version (NULL: not tracked, or no permission).

    O(changes): each ``CHANGETABLE(CHANGES …)`` reads CT's side table from ``:since`` on.
    """
    cols = []
    for i, t in enumerate(tables):
        cols.append(
            f"(SELECT MAX(c.SYS_CHANGE_VERSION) FROM CHANGETABLE(CHANGES {_quoted(t, prep)}, "
            f":since) AS c) AS l{i}"
        )
        cols.append(f"CHANGE_TRACKING_MIN_VALID_VERSION({_object_id(t, prep)}) AS m{i}")
    return sa.text("SELECT " + ", ".join(cols))


def versions_sql(tables: Sequence[sa.Table], prep: Any) -> sa.TextClause:
    """The current version ``v`` and each table's minimum valid version ``m<i>``: the
    first statement of :meth:`MssqlChangeTracking.changes`' snapshot transaction. O(1)."""
    mins = ", ".join(
        f"CHANGE_TRACKING_MIN_VALID_VERSION({_object_id(t, prep)}) AS m{i}"
        for i, t in enumerate(tables)
    )
    return sa.text(f"SELECT CHANGE_TRACKING_CURRENT_VERSION() AS v, {mins}")


def changes_sql(table: sa.Table, prep: Any) -> sa.TextClause:
    """The changed keys of ``table`` after ``:since``, with I/U/D, their version, and the
    row as it is now (NULLs for a deleted row). O(changes).

    Columns: ``ct_op``, ``ct_version``, ``ct_<key>`` per primary-key column, then every
    column of the table under its own name (typed as the table's columns)."""
    pk = [c.name for c in table.primary_key.columns]
    if not pk:
        raise CaptureUnavailable(f"{table.name} has no primary key: Change Tracking needs one")
    q = prep.quote
    name = _quoted(table, prep)
    on = " AND ".join(f"t.{q(k)} = c.{q(k)}" for k in pk)
    select = [
        "c.SYS_CHANGE_OPERATION AS ct_op",
        "c.SYS_CHANGE_VERSION AS ct_version",
        *(f"c.{q(k)} AS {q('ct_' + k)}" for k in pk),
        *(f"t.{q(c.name)} AS {q(c.name)}" for c in table.columns),
    ]
    sql = (
        f"SELECT {', '.join(select)} FROM CHANGETABLE(CHANGES {name}, :since) AS c "
        f"LEFT OUTER JOIN {name} AS t ON {on} ORDER BY c.SYS_CHANGE_VERSION"
    )
    return sa.text(sql).columns(
        sa.column("ct_op", sa.String),
        sa.column("ct_version", sa.BigInteger),
        *(sa.column(f"ct_{k}", table.c[k].type) for k in pk),
        *(sa.column(c.name, c.type) for c in table.columns),
    )


# --------------------------------------------------------------------------- decisions


def gate_decision(
    since: str | None,
    current: int | None,
    moved: Mapping[str, tuple[int | None, int | None]] | None = None,
) -> Gate:
    """The gate's answer from the current version and, when it moved, per table
    ``(newest change after since, minimum valid version)``.

    A table whose minimum valid version passed ``since`` is a suspect (its changes are
    gone: :meth:`MssqlChangeTracking.changes` will raise :class:`CaptureLost`)."""
    if current is None:
        raise CaptureUnavailable(
            "Change Tracking is not enabled on CFI's source database "
            f"(CHANGE_TRACKING_CURRENT_VERSION() is NULL): have the DBA run {DBA_SCRIPT}"
        )
    position = str(current)
    if since is None:
        return Gate(position, changed=True, note="first gate: no stored version")
    last = int(since)
    if current <= last:
        return Gate(position, changed=False, tables=frozenset(), note=f"version {current}")
    if moved is None:  # moved, and which tables is not asked
        return Gate(position, changed=True, note=f"version {last} -> {current}")
    tables, latest, lost = set(), {}, []
    for name, (newest, min_valid) in moved.items():
        if min_valid is None or min_valid > last:
            tables.add(name)
            lost.append(name)
        elif newest is not None:
            tables.add(name)
            latest[name] = str(newest)
    note = f"version {last} -> {current}"
    if lost:
        note += f"; changes since {last} no longer available for {', '.join(sorted(lost))}"
    elif not tables:
        note += ": no followed table changed"
    return Gate(position, bool(tables), frozenset(tables), note, latest or None)


def check_versions(
    since: int, mins: Mapping[str, int | None], *, current: int | None = None
) -> None:
    """Raise :class:`CaptureLost` when a table's changes since ``since`` are gone (its
    minimum valid version passed it: retention cleanup, truncation, CT re-enabled), and
    :class:`CaptureUnavailable` when a table is not tracked (or not visible)."""
    if current is None:
        raise CaptureUnavailable(
            f"Change Tracking is not enabled on CFI's source database: run {DBA_SCRIPT}"
        )
    untracked = sorted(n for n, m in mins.items() if m is None)
    if untracked:
        raise CaptureUnavailable(
            f"Change Tracking is not enabled on {', '.join(untracked)} (or the reading "
            f"account lacks VIEW CHANGE TRACKING on it): run {DBA_SCRIPT}"
        )
    past = sorted((n, m) for n, m in mins.items() if m is not None and m > since)
    if past:
        which = ", ".join(f"{n} (min valid {m})" for n, m in past)
        raise CaptureLost(
            f"Change Tracking no longer holds the changes since version {since} for "
            f"{which}: retention passed or the table was truncated; a full refresh follows"
        )


def row_change(table: sa.Table, row: Mapping[str, Any]) -> RowChange:
    """One CHANGETABLE row (``changes_sql``'s columns) as a :class:`RowChange`."""
    pk = [c.name for c in table.primary_key.columns]
    op = row["ct_op"]
    if op not in OPERATIONS:
        raise ValueError(f"unexpected SYS_CHANGE_OPERATION {op!r} on {table.name}")
    key = {k: row[f"ct_{k}"] for k in pk}
    present = all(row[k] is not None for k in pk)  # LEFT JOIN found the row
    if op == "D" or not present:
        return RowChange(table.name, "D", new=None, old=key, old_complete=False)
    new = {c.name: row[c.name] for c in table.columns}
    if op == "I":
        return RowChange(table.name, "I", new=new)
    return RowChange(table.name, "U", new=new, old=key, old_complete=False)


def cut(
    rows: Sequence[tuple[int, RowChange]], upto: int, limit: int | None
) -> tuple[int, list[RowChange], bool]:
    """Keep whole versions (one version is one transaction) until ``limit`` row changes.

    A row's net change carries its *last* version, so the rows at or before a version
    ``V`` are exactly the keys whose newest change is at or before ``V``, and their
    current images are their images at ``V``: the rest come from ``V`` next call."""
    ordered = sorted(rows, key=lambda r: r[0])
    if limit is None or len(ordered) <= limit:
        return upto, [c for _, c in ordered], False
    boundary = ordered[limit - 1][0]
    kept = [c for v, c in ordered if v <= boundary]
    return boundary, kept, boundary < upto


# --------------------------------------------------------------------------- capture


class MssqlChangeTracking(Capture):
    """SQL Server Change Tracking (see the module docstring). Positions are versions."""

    mode = "mssql_ct"
    exact = True
    guarantee = (
        "every committed insert, update and delete of the followed tables "
        "(SQL Server Change Tracking, net per primary key)"
    )

    def sort_key(self, position: str) -> int:
        return int(position)

    def _names(self) -> list[str]:
        return [t.name for t in self.tables]

    def gate(self, since: str | None) -> Gate:
        """``CHANGE_TRACKING_CURRENT_VERSION()``: one query on an idle tick (O(1)); one more,
        O(changes), naming the tables when the version moved."""
        prep = self.engine.dialect.identifier_preparer
        with self.engine.connect() as conn:
            current = conn.execute(CURRENT_VERSION).scalar()
            moved = None
            if since is not None and current is not None and current > int(since):
                row = conn.execute(moved_tables_sql(self.tables, prep), {"since": int(since)})
                values = row.mappings().one()
                moved = {
                    name: (values[f"l{i}"], values[f"m{i}"]) for i, name in enumerate(self._names())
                }
            conn.rollback()
        return gate_decision(since, current, moved)

    def position(self) -> str:
        """The current version, read before a full refresh reads the source: a change
        committed during the refresh's read is returned again by :meth:`changes` (the
        apply recomputes by key: idempotent)."""
        with self.engine.connect() as conn:
            current = conn.execute(CURRENT_VERSION).scalar()
            conn.rollback()
        return gate_decision(None, current).position

    def changes(self, since: str, *, limit: int | None = None) -> ChangeSet:
        """The net changes of the followed tables after version ``since``, with their
        current rows, in one SNAPSHOT transaction. O(changes). Raises
        :class:`CaptureLost` when a table's minimum valid version passed ``since``."""
        last = int(since)
        prep = self.engine.dialect.identifier_preparer
        names = self._names()
        collected: list[tuple[int, RowChange]] = []
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="SNAPSHOT")
            with conn.begin():
                values = conn.execute(versions_sql(self.tables, prep)).mappings().one()
                current = values["v"]
                check_versions(
                    last, {n: values[f"m{i}"] for i, n in enumerate(names)}, current=current
                )
                if current > last:
                    for table in self.tables:
                        result = conn.execute(changes_sql(table, prep), {"since": last})
                        for row in result.mappings():
                            collected.append((row["ct_version"], row_change(table, row)))
        upto, kept, more = cut(collected, max(current, last), limit)
        versions = {v for v, _ in collected if v <= upto}
        return ChangeSet(
            since=since,
            upto=str(upto),
            changes=tuple(kept),
            transactions=len(versions),
            more=more,
            notes=(f"Change Tracking versions {last} -> {upto}",),
        )


# --------------------------------------------------------------------------- doctor


def change_tracking_problems(conn: sa.Connection, tables: Sequence[sa.Table]) -> list[str]:
    """What the DBA script has not (yet) done on this database, one line each; empty when
    Change Tracking is usable by this account. Catalog functions only: O(1)."""
    prep = conn.dialect.identifier_preparer
    cols = ["CHANGE_TRACKING_CURRENT_VERSION() AS v"]
    cols.append(
        "(SELECT snapshot_isolation_state FROM sys.databases WHERE database_id = DB_ID()) AS s"
    )
    for i, t in enumerate(tables):
        cols.append(f"CHANGE_TRACKING_MIN_VALID_VERSION({_object_id(t, prep)}) AS m{i}")
        cols.append(
            f"HAS_PERMS_BY_NAME(N'{_quoted(t, prep)}', 'OBJECT', 'VIEW CHANGE TRACKING') AS p{i}"
        )
    values = conn.execute(sa.text("SELECT " + ", ".join(cols))).mappings().one()
    if values["v"] is None:
        return ["Change Tracking is off on the database (ALTER DATABASE … SET CHANGE_TRACKING)"]
    problems = []
    if values["s"] != 1:
        problems.append("ALLOW_SNAPSHOT_ISOLATION is off (changes are read in a snapshot)")
    untracked = [t.name for i, t in enumerate(tables) if values[f"m{i}"] is None]
    denied = [t.name for i, t in enumerate(tables) if values[f"p{i}"] != 1]
    if untracked:
        problems.append(f"not tracked (or not visible): {', '.join(untracked)}")
    if denied:
        problems.append(f"VIEW CHANGE TRACKING not granted on {', '.join(denied)}")
    return problems


def change_tracking_capture(engine: sa.Engine, tables: Sequence[sa.Table]) -> MssqlChangeTracking:
    """The Change Tracking capture of ``engine`` (what ``capture_for`` picks on SQL Server),
    after checking the DBA script was run; :class:`CaptureUnavailable` naming what is
    missing otherwise (the caller falls back to the timestamp path). O(1)."""
    with engine.connect() as conn:
        problems = change_tracking_problems(conn, tables)
        conn.rollback()
    if problems:
        raise CaptureUnavailable("; ".join(problems) + f": have CFI's DBA run {DBA_SCRIPT}")
    return MssqlChangeTracking(
        engine, tables, why="Change Tracking on the database and every followed table"
    )
