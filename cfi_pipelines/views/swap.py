"""Putting a freshly loaded staging table in place of the live view: the guard, the
renames in one short transaction (:func:`swap_statements`), the grants carried over
(:func:`copy_grants_sql`), the bounded lock wait with retries and the naming of the
session that holds the lock (:class:`SwapLockTimeout`).

:func:`swap_in` is the whole full refresh once a loader is given (used with the
source DB's loader and with the API fallback's). Costs: the load is O(table); the
swap itself is O(1) (renames), the old table is dropped after the commit.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.tenancy.policies import copy_policies, mssql_swap_statements
from cfi_pipelines.views.load import (
    Loader,
    _analyze_sql,
    _begin,
    _count,
    _index_statements,
    _schema_for,
    _table_exists,
    _work_table,
)
from cfi_pipelines.views.result import (
    DEFAULT_MAX_DROP_SHARE,
    RefreshError,
    RefreshRefused,
    RefreshResult,
)
from cfi_pipelines.views.spec import ViewSpec
from cfi_pipelines.views.status import _record_success, _write_closure

log = logging.getLogger(__name__)

SWAP_LOCK_TIMEOUT_MS = 200
"""How long one swap attempt waits for its locks (PostgreSQL). Readers that arrive
while the rename waits queue behind it, so this is also the longest they stall."""
SWAP_LOCK_ATTEMPTS = 5
SWAP_RETRY_PAUSE_S = 0.2
"""Pause after the n-th failed attempt: n times this (readers run meanwhile)."""
PG_INDEX_BUILD_MEMORY = "256MB"
"""``maintenance_work_mem`` of the index builds of a full refresh (PostgreSQL; server
memory, for the build's transaction only; the default 64MB spills a 1M-row key sort)."""
AUTOVACUUM_MARGIN_MS = 300
"""When autovacuum alone held the lock, the next attempt waits deadlock_timeout plus
this: PostgreSQL cancels an autovacuum that blocks a waiter for deadlock_timeout (1 s
by default), which a 200 ms attempt never reaches. Readers queue that long, once."""
SWAP_LOCK_RUNNING_MAX_MS = 5000
"""When every holder was running a statement (a long read, not a transaction left open),
the next attempt waits twice as long as the last, up to this. Reads longer than an
attempt that follow each other closely (or overlap) would otherwise hold the table at
every attempt: at 10M rows, a reader counting the view in a loop (~1 s a count) made
every full refresh fail. Readers queued behind the rename stall that long, once, as
they would behind any statement that needs the table to itself."""


def swap_statements(dialect: str, live: str, staging: str, old: str) -> list[str]:
    """The renames that put ``staging`` in place of ``live`` (run in one transaction)."""
    if dialect == "mssql":
        return [
            f"IF OBJECT_ID(N'{live}', N'U') IS NOT NULL EXEC sp_rename N'{live}', N'{old}'",
            f"EXEC sp_rename N'{staging}', N'{live}'",
        ]
    q = '"{}"'.format
    return [
        f"ALTER TABLE {q(live)} RENAME TO {q(old)}",
        f"ALTER TABLE {q(staging)} RENAME TO {q(live)}",
    ]


def copy_grants_sql(dialect: str, live: str, staging: str) -> str | None:
    """A query listing ``(grantee, privilege)`` on ``live``, to re-grant on ``staging``.

    The swap replaces the table object, and grants belong to the object: without
    this, the read-only account would lose SELECT at the first refresh.
    """
    if dialect == "postgresql":
        return (
            "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
            f"WHERE table_schema = current_schema() AND table_name = '{live}' "
            "AND grantee <> current_user"
        )
    if dialect == "mssql":
        return (
            "SELECT USER_NAME(p.grantee_principal_id), p.permission_name "
            "FROM sys.database_permissions p "
            f"WHERE p.major_id = OBJECT_ID(N'{live}') AND p.state = 'G'"
        )
    return None


class SwapLockTimeout(RefreshError):
    """The swap could not get its lock within the retries: a session holds a lock
    on the live table (typically a reader idle in its transaction). Not a database
    outage; the live view is untouched."""

    def __init__(self, view: str, attempts: int, holders: list[dict]):
        self.view, self.attempts, self.holders = view, attempts, holders
        if holders:
            who = "; ".join(_describe_holder(h) for h in holders)
        else:
            who = "lock held by a session that released it before it could be named"
        why = (
            "autovacuum kept working on the table (a wraparound vacuum is never cancelled)"
            if holders and all(is_autovacuum(h) for h in holders)
            else "A reader probably left its transaction open"
        )
        super().__init__(
            f"view {view}: not swapped in, the swap waited {attempts} times "
            f"{SWAP_LOCK_TIMEOUT_MS} ms or more for its lock: {who}. {why}; the live view is "
            "untouched and the next refresh retries."
        )


def is_autovacuum(h: dict) -> bool:
    """Whether a lock holder is an autovacuum worker: by ``backend_type`` when visible
    (superuser, pg_read_all_stats), else by what only autovacuum looks like (no user, a
    SHARE UPDATE EXCLUSIVE lock on a table)."""
    if h.get("backend_type"):
        return h["backend_type"] == "autovacuum worker"
    return not h.get("usename") and h.get("mode") == "ShareUpdateExclusiveLock"


def is_running(h: dict) -> bool:
    """Whether a lock holder is running a statement (it will end by itself), as opposed to
    a transaction left open; known only when its state is visible (see is_autovacuum)."""
    return h.get("state") == "active" and not is_autovacuum(h)


def _describe_holder(h: dict) -> str:
    if is_autovacuum(h):
        sure = "" if h.get("backend_type") else "probably "
        what = f": {h['query']!r}" if (h.get("query") or "").startswith("autovacuum") else ""
        return (
            f"lock held by {sure}autovacuum (pid {h['pid']}{what}) {h['mode']} on "
            f"{h['relname']}: PostgreSQL's own maintenance, not a reader; it yields to a "
            "waiting lock only after deadlock_timeout"
        )
    state = h.get("state") or "unknown (grant pg_read_all_stats to the refresher to see it)"
    since = (
        f", transaction open since {h['xact_start']:%Y-%m-%d %H:%M:%S%z}"
        if h.get("xact_start")
        else ""
    )
    return (
        f"lock held by pid {h['pid']} (application {h.get('application_name') or '?'!r}, "
        f"state {state}, user {h.get('usename') or '?'}{since}) "
        f"{h['mode']} on {h['relname']}"
    )


def _is_lock_timeout(exc: sa.exc.OperationalError) -> bool:
    # 55P03 lock_not_available (psycopg 3: .sqlstate, psycopg2: .pgcode)
    orig = exc.orig
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "55P03"


def _lock_holders(target: Engine, tables: tuple[str, ...]) -> list[dict]:
    """Sessions holding a granted lock on ``tables`` (PostgreSQL names the holder;
    state and query are visible to superusers and pg_read_all_stats only)."""
    sql = sa.text(
        "SELECT DISTINCT l.pid, l.mode, c.relname, a.application_name, a.state, "
        "a.usename, a.xact_start, a.backend_type, left(a.query, 200) AS query "
        "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid() "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.relation IN ("
        + ", ".join(f"to_regclass(:t{i})" for i in range(len(tables)))
        + ") ORDER BY l.pid"
    )
    try:
        with target.connect() as conn:
            rows = conn.execute(sql, {f"t{i}": t for i, t in enumerate(tables)}).mappings()
            return [dict(r) for r in rows]
    except sa.exc.SQLAlchemyError:  # best effort: the error message must still come out
        log.exception("could not list the sessions holding locks on %s", tables)
        return []


def _deadlock_timeout_ms(target: Engine) -> int:
    with target.connect() as conn:
        value = conn.exec_driver_sql(
            "SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'"
        ).scalar()
        conn.rollback()
    return int(value or 1000)


def _swap_with_retries(
    spec: ViewSpec,
    target: Engine,
    tables: tuple[str, ...],
    body: Callable[[sa.Connection], RefreshResult],
) -> RefreshResult:
    """Run the swap transaction ``body`` with a short lock_timeout, a few times.

    The renames need ACCESS EXCLUSIVE on the live table, which conflicts with the
    ACCESS SHARE every reader holds until its transaction ends. While the rename
    waits, every reader arriving after it queues behind it: one reader idle in its
    transaction would stall all readers for as long as the swap waits. So each
    attempt waits SWAP_LOCK_TIMEOUT_MS at most, then gives the lock up (the queued
    readers run) and pauses before the next one; after SWAP_LOCK_ATTEMPTS it raises
    :class:`SwapLockTimeout` naming the holder (not an OperationalError: this is no
    outage).

    SQL Server: the same reasoning holds. sp_rename needs a Sch-M lock, which
    conflicts with everything, including the Sch-S of every reader, and a waiting
    Sch-M request blocks the readers queued behind it; a reader keeps its IS lock
    until its transaction ends under REPEATABLE READ/SERIALIZABLE or HOLDLOCK. There
    the bound would be SET LOCK_TIMEOUT 200 on the swap's session (error 1222 on
    timeout) with the same retries, and the holder is named by
    sys.dm_tran_locks / sys.dm_exec_requests.blocking_session_id joined to
    sys.dm_exec_sessions (program_name, status, open_transaction_count). Not done
    yet: today the SQL Server swap waits without a lock timeout.

    Autovacuum (PostgreSQL): it holds SHARE UPDATE EXCLUSIVE on a table it works on,
    and yields to a waiter only when the waiter's deadlock check runs, after
    deadlock_timeout (1 s by default), longer than an attempt. The staging table has
    autovacuum off until it is live (nothing to wait for there); when autovacuum alone
    held the live table, the next attempt waits deadlock_timeout +
    :data:`AUTOVACUUM_MARGIN_MS` so that PostgreSQL cancels it, and the holder is named
    as autovacuum, not as a reader.

    Long reads (PostgreSQL): when every holder was running a statement, the next attempt
    waits twice as long, up to :data:`SWAP_LOCK_RUNNING_MAX_MS` (the reads end by
    themselves; readers arriving meanwhile queue behind the rename that long, once). A
    holder idle in its transaction, or whose state is not visible, keeps the short wait.
    """
    wait_ms = SWAP_LOCK_TIMEOUT_MS
    for attempt in range(1, SWAP_LOCK_ATTEMPTS + 1):
        try:
            with _begin(target) as conn:
                if target.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{wait_ms}ms'")
                return body(conn)
        except sa.exc.OperationalError as exc:
            if target.dialect.name != "postgresql" or not _is_lock_timeout(exc):
                raise
            holders = _lock_holders(target, tables)
            log.warning(
                "view %s: swap attempt %d/%d timed out on its lock: %s",
                spec.name,
                attempt,
                SWAP_LOCK_ATTEMPTS,
                "; ".join(_describe_holder(h) for h in holders) or "holder gone",
            )
            if attempt == SWAP_LOCK_ATTEMPTS:
                raise SwapLockTimeout(spec.name, attempt, holders) from exc
            if holders and all(is_autovacuum(h) for h in holders):
                wait_ms = _deadlock_timeout_ms(target) + AUTOVACUUM_MARGIN_MS
            elif holders and all(is_running(h) for h in holders):
                wait_ms = min(max(wait_ms, SWAP_LOCK_TIMEOUT_MS) * 2, SWAP_LOCK_RUNNING_MAX_MS)
            else:
                wait_ms = SWAP_LOCK_TIMEOUT_MS
            time.sleep(SWAP_RETRY_PAUSE_S * attempt)
    raise AssertionError("unreachable")


def _build_indexes(target: Engine, spec: ViewSpec, staging: sa.Table, token: str) -> None:
    """The view's indexes on the loaded staging table, and its statistics. O(table)."""
    dialect = target.dialect.name
    with _begin(target) as conn:
        if dialect == "postgresql":
            # each build sorts its keys in memory instead of spilling sorted runs to disk
            conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{PG_INDEX_BUILD_MEMORY}'")
        for ix in _index_statements(spec, staging, token):
            ix.create(conn)
        if dialect == "sqlite":
            # Sample ~1000 rows per index instead of reading every index in full
            # (0.35 s at 1M rows): the planner needs orders of magnitude only.
            conn.exec_driver_sql("PRAGMA analysis_limit = 1000")
        if sql := _analyze_sql(dialect, staging, target.dialect.identifier_preparer):
            conn.exec_driver_sql(sql)


def _drop_table(target: Engine, name: str) -> None:
    with _begin(target) as conn:
        conn.exec_driver_sql(f"DROP TABLE {target.dialect.identifier_preparer.quote(name)}")


def swap_in(
    spec: ViewSpec,
    target: Engine,
    loader: Loader,
    *,
    source: str,
    snapshot_at: datetime,
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
    watermark: datetime | None = None,
    closure: list[tuple[int, int, int]] | None = None,
    started: float | None = None,
) -> RefreshResult:
    """Load a staging copy with ``loader``, index it, guard it, and swap it in.

    Used by the full refresh from the source DB and by the API fallback
    (``source="cfi_api"``). Raises :class:`RefreshRefused`, :class:`SwapLockTimeout`
    or the loader's error; the live view is untouched in all cases (the caller
    records the failure).
    """
    started = started or time.perf_counter()
    dialect = target.dialect.name
    schema = _schema_for(target)
    staging = _work_table(spec, "staging", schema)
    live = spec.table
    old_name = f"{spec.table_name}__old"
    token = secrets.token_hex(3)
    prep = target.dialect.identifier_preparer

    with _begin(target) as conn:
        for name in (staging.name, old_name):  # leftovers of a killed refresh
            if _table_exists(conn, name):
                conn.exec_driver_sql(f"DROP TABLE {prep.quote(name)}")
        staging.create(conn)
        if dialect == "postgresql":
            # Autovacuum would take the freshly loaded table's SHARE UPDATE EXCLUSIVE lock
            # and hold the index builds and the swap (it yields only after deadlock_timeout):
            # off until the swap, which turns it back on for the live table.
            conn.exec_driver_sql(
                f"ALTER TABLE {prep.quote(staging.name)} SET "
                "(autovacuum_enabled = false, toast.autovacuum_enabled = false)"
            )
    try:
        loaded = loader(staging)
        _build_indexes(target, spec, staging, token)
        with target.connect() as conn:
            live_exists = _table_exists(conn, live.name)
            live_rows = _count(conn, live) if live_exists else 0
            staging_rows = _count(conn, staging)
            conn.rollback()
        if not force and live_rows and staging_rows < live_rows * (1 - max_drop_share):
            raise RefreshRefused(spec.name, staging_rows, live_rows, max_drop_share)

        def swap_transaction(conn: sa.Connection) -> RefreshResult:
            if live_exists and (grants_sql := copy_grants_sql(dialect, live.name, staging.name)):
                for grantee, privilege in conn.exec_driver_sql(grants_sql).all():
                    conn.exec_driver_sql(
                        f"GRANT {privilege} ON {prep.quote(staging.name)} TO {prep.quote(grantee)}"
                    )
            if live_exists:
                # row-level security belongs to the table object too (tenancy.policies)
                copy_policies(conn, live.name, staging.name)
                if dialect == "mssql":
                    add_predicates, drop_predicates = mssql_swap_statements(
                        live.name, staging.name, old_name
                    )
                    conn.exec_driver_sql(add_predicates)
                for stmt in swap_statements(dialect, live.name, staging.name, old_name):
                    conn.exec_driver_sql(stmt)
                if dialect == "mssql":
                    conn.exec_driver_sql(drop_predicates)
            else:
                conn.exec_driver_sql(swap_statements(dialect, live.name, staging.name, old_name)[1])
            if dialect == "postgresql":  # the live table is maintained as any other
                conn.exec_driver_sql(
                    f"ALTER TABLE {prep.quote(live.name)} "
                    "RESET (autovacuum_enabled, toast.autovacuum_enabled)"
                )
            if closure is not None:
                _write_closure(conn, closure)
            duration = time.perf_counter() - started
            now = utcnow()
            result = RefreshResult(
                view=spec.name,
                mode="full",
                source=source,
                rows=staging_rows,
                loaded=loaded,
                # net figures (no key-by-key join of two whole tables: O(table) for a
                # number): rows gained, rows lost, and the rest replaced
                inserted=max(staging_rows - live_rows, 0),
                updated=min(staging_rows, live_rows),
                deleted=max(live_rows - staging_rows, 0),
                duration_s=duration,
                source_snapshot_at=snapshot_at,
                watermark=watermark,
            )
            _record_success(conn, result, now)
            return result

        result = _swap_with_retries(spec, target, (live.name, staging.name), swap_transaction)
        if live_exists:
            _drop_table(target, old_name)  # after the commit: a big DROP must not lengthen the swap
        return result
    except BaseException:
        with _begin(target) as conn:
            if _table_exists(conn, staging.name):
                conn.exec_driver_sql(f"DROP TABLE {prep.quote(staging.name)}")
        raise
