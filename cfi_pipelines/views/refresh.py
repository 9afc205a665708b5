"""Refreshing a view of the common DB: plain functions, no Dagster.

Full refresh: load a staging table (through the fastest path the two databases
offer), build its indexes and statistics, check the row-count guard, then swap it
in with one short transaction that also records the status. Readers see the old
complete view or the new complete view, never a partial or empty one; a refresh
that fails at any point leaves the live view untouched and records the error.

Incremental refresh: the rows changed since the last watermark (minus an overlap
window, so late-committing rows are not missed) are loaded into a delta table and
upserted in one transaction (ON CONFLICT on SQLite/PostgreSQL, MERGE on SQL
Server). Parents whose aggregates a change left (a child moved to another parent
or deleted) are found by comparing the cached aggregates with the source's
(:func:`stale_keys`) and reloaded in the same delta. View rows whose own source
row was deleted are found by :func:`cfi_pipelines.views.reconcile.deleted_keys`
(skipped at the cost of one count per side when the cache has no more rows than
the source) and deleted in the refresh's last transaction.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine, make_url

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import (
    BATCH_ROWS,
    WRITE_OPTION,
    copy_into_postgres,
    insert_rows,
    write_transaction,
)
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.reconcile import delete_keys, deleted_keys
from cfi_pipelines.views.spec import VIEWS, ViewSpec

log = logging.getLogger(__name__)

Mode = Literal["auto", "full", "incremental"]
DEFAULT_MAX_DROP_SHARE = 0.5
DEFAULT_OVERLAP = timedelta(minutes=2)
SQLITE_REFRESH_CACHE_KIB = 32 * 1024
"""SQLite page cache (KiB) of the refresh's own write transactions (see :func:`_begin`):
bounded, so that memory stays flat (peak RSS < 150 MB whatever the row count)."""
SWAP_LOCK_TIMEOUT_MS = 200
"""How long one swap attempt waits for its locks (PostgreSQL). Readers that arrive
while the rename waits queue behind it, so this is also the longest they stall."""
SWAP_LOCK_ATTEMPTS = 5
SWAP_RETRY_PAUSE_S = 0.2
"""Pause after the n-th failed attempt: n times this (readers run meanwhile)."""

Loader = Callable[[sa.Table], int]
"""Fills a staging table (given as a Table object) and returns its row count."""


class RefreshError(Exception):
    """A refresh that did not swap anything in; the live view is untouched."""


class RefreshRefused(RefreshError):
    """The row-count guard refused the swap (the source looks broken)."""

    def __init__(self, view: str, staging_rows: int, live_rows: int, max_drop_share: float):
        self.view, self.staging_rows, self.live_rows = view, staging_rows, live_rows
        super().__init__(
            f"view {view}: the new data has {staging_rows} rows against {live_rows} live "
            f"(a drop of more than {max_drop_share:.0%}); not swapped in. If the source really "
            f"shrank, refresh with force (cfi-pipelines refresh {view} --full --force)."
        )


@dataclass(frozen=True)
class RefreshResult:
    view: str
    mode: str  # full / incremental
    source: str  # db / cfi_api
    rows: int  # rows in the view afterwards
    loaded: int  # rows read from the source
    inserted: int
    updated: int
    deleted: int
    duration_s: float
    source_snapshot_at: datetime
    watermark: datetime | None

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- schema


def init_common(engine: Engine) -> None:
    """Create the common DB's tables (idempotent) and one status row per view."""
    with write_transaction(engine) as conn:
        common.metadata.create_all(conn)
        have = set(conn.scalars(sa.select(common.cfi_view_status.c.view)))
        missing = [{"view": v.name, "consecutive_failures": 0} for v in VIEWS if v.name not in have]
        if missing:
            conn.execute(common.cfi_view_status.insert(), missing)


def _schema_for(engine_or_conn) -> str | None:
    # SQLite: the staging table must be named in "main" so that the
    # schema_translate_map used by the ATTACH path does not move it.
    return "main" if engine_or_conn.dialect.name == "sqlite" else None


def _work_table(spec: ViewSpec, suffix: str, schema: str | None) -> sa.Table:
    """A bare copy of the view's table (no indexes), named ``<table>__<suffix>``."""
    md = sa.MetaData()
    return sa.Table(
        f"{spec.table_name}__{suffix}",
        md,
        *(sa.Column(c.name, c.type, nullable=c.nullable) for c in spec.table.columns),
        schema=schema,
    )


def _index_statements(spec: ViewSpec, table: sa.Table, token: str) -> list[sa.Index]:
    """The key's unique index and the lookup indexes, named per refresh.

    Index names are unique per database on SQLite and PostgreSQL and a renamed
    table keeps its index names, so each build uses fresh names.
    """
    base = spec.table_name
    out = [sa.Index(f"ux_{base}_key_{token}", *(table.c[k] for k in spec.key), unique=True)]
    for cols in spec.indexes:
        out.append(sa.Index(f"ix_{base}_{'_'.join(cols)}_{token}", *(table.c[c] for c in cols)))
    return out


@contextmanager
def _begin(engine: Engine) -> Iterator[sa.Connection]:
    """``engine.begin()`` for the refresh's own writes.

    SQLite: Debian and others build it with SECURE_DELETE on, which zeroes every
    page a DROP or an overwrite frees: dropping the old 1M-row view wrote ~180 MB
    to the WAL (~1.9 s). FAST only zeroes what costs no extra I/O. The view holds
    no secret the source does not, and durability is unchanged.

    Also on SQLite: a page cache of :data:`SQLITE_REFRESH_CACHE_KIB` for the
    transaction (the default 2 MB), given back afterwards. Index builds sort in
    the cache before spilling to temporary files, and an upsert of 1 % of a 10M-row
    view touches pages all over the table and its three indexes: with 2 MB, every
    page was read again and dirty pages spilled to the WAL mid-transaction (the
    upsert of 100k rows took 7.6 s of the 13 s incremental at 10M rows).
    """
    with write_transaction(engine) as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA secure_delete = FAST")
            default_cache = conn.exec_driver_sql("PRAGMA cache_size").scalar()
            conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_REFRESH_CACHE_KIB}")
        try:
            yield conn
        finally:
            if sqlite:
                conn.exec_driver_sql(f"PRAGMA cache_size = {default_cache}")


def _analyze_sql(dialect: str, table: sa.Table, preparer) -> str | None:
    name = preparer.format_table(table)
    return {
        "sqlite": f"ANALYZE {name}",
        "postgresql": f"ANALYZE {name}",
        "mssql": f"UPDATE STATISTICS {name}",
    }.get(dialect)


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


def _table_exists(conn: sa.Connection, name: str) -> bool:
    return sa.inspect(conn).has_table(name)


def _count(conn: sa.Connection, table: sa.Table) -> int:
    return conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0


def _count_matching(conn: sa.Connection, a: sa.Table, b: sa.Table, key: tuple[str, ...]) -> int:
    on = sa.and_(*(a.c[k] == b.c[k] for k in key))
    return conn.scalar(sa.select(sa.func.count()).select_from(a.join(b, on))) or 0


# --------------------------------------------------------------------------- loaders


def _sqlite_path(engine: Engine) -> str | None:
    url = make_url(str(engine.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return url.database
    return None


def source_loader(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    incremental: bool,
    params: dict,
) -> Loader:
    """The fastest way to fill a staging table with the view's query over ``source``."""
    query = spec.query(incremental=incremental)
    cols = spec.columns
    src_path, tgt_path = _sqlite_path(source), _sqlite_path(target)

    if src_path and tgt_path:
        # SQLite -> SQLite: one INSERT…SELECT across an ATTACHed file, no Python in the loop.
        def load(staging: sa.Table) -> int:
            with target.connect() as conn:
                raw = conn.connection.dbapi_connection
                # read-only: the refresh cannot write into CFI's DB, nor lock it for writing
                src_uri = f"{Path(src_path).resolve().as_uri()}?mode=ro"
                raw.execute("ATTACH DATABASE ? AS cfi_src", (src_uri,))
                default_cache = raw.execute("PRAGMA main.cache_size").fetchone()[0]
                raw.execute(f"PRAGMA main.cache_size = -{SQLITE_REFRESH_CACHE_KIB}")
                try:
                    conn = conn.execution_options(
                        schema_translate_map={None: "cfi_src"}, **{WRITE_OPTION: True}
                    )
                    with conn.begin():
                        res = conn.execute(sa.insert(staging).from_select(cols, query), params)
                    return res.rowcount
                finally:
                    conn.rollback()
                    raw.execute("DETACH DATABASE cfi_src")
                    raw.execute(f"PRAGMA main.cache_size = {default_cache}")

        return load

    if source.dialect.name == "postgresql" and target.dialect.name == "postgresql":
        # PostgreSQL -> PostgreSQL: COPY TO STDOUT streamed into COPY FROM STDIN.
        sql = str(
            query.params(**params).compile(
                dialect=source.dialect, compile_kwargs={"literal_binds": True}
            )
        )

        def load(staging: sa.Table) -> int:
            prep = target.dialect.identifier_preparer
            col_list = ", ".join(prep.quote(c) for c in cols)
            with source.connect() as sconn, write_transaction(target) as tconn:
                s_raw = sconn.connection.driver_connection
                t_raw = tconn.connection.driver_connection
                with (
                    s_raw.cursor() as scur,
                    t_raw.cursor() as tcur,
                    scur.copy(f"COPY ({sql}) TO STDOUT") as out,
                    tcur.copy(f"COPY {prep.format_table(staging)} ({col_list}) FROM STDIN") as into,
                ):
                    rows = 0
                    for block in out:
                        # text format: one unescaped newline per row (embedded ones are \n)
                        rows += bytes(block).count(b"\n")
                        into.write(block)
                return rows

        return load

    # Portable path: stream rows from the source, bulk-write them (COPY on PostgreSQL,
    # fast_executemany on SQL Server, batched executemany elsewhere).
    def load(staging: sa.Table) -> int:
        with source.connect() as sconn, write_transaction(target) as tconn:
            result = sconn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(
                query, params
            )
            rows = (tuple(r) for r in result)
            if tconn.dialect.name == "postgresql":
                return copy_into_postgres(tconn, staging, cols, rows)
            return insert_rows(tconn, staging, rows, cols)

    return load


# --------------------------------------------------------------------------- status


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
        insert_rows(conn, t, rows)


# --------------------------------------------------------------------------- full


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
        super().__init__(
            f"view {view}: not swapped in, the swap waited {attempts} times "
            f"{SWAP_LOCK_TIMEOUT_MS} ms for its lock: {who}. A reader probably left its "
            "transaction open; the live view is untouched and the next refresh retries."
        )


def _describe_holder(h: dict) -> str:
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
        "a.usename, a.xact_start "
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
    """
    for attempt in range(1, SWAP_LOCK_ATTEMPTS + 1):
        try:
            with _begin(target) as conn:
                if target.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT_MS}ms'")
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
            time.sleep(SWAP_RETRY_PAUSE_S * attempt)
    raise AssertionError("unreachable")


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
    try:
        loaded = loader(staging)
        with _begin(target) as conn:
            for ix in _index_statements(spec, staging, token):
                ix.create(conn)
            if dialect == "sqlite":
                # Sample ~1000 rows per index instead of reading every index in full
                # (0.35 s at 1M rows): the planner needs orders of magnitude only.
                conn.exec_driver_sql("PRAGMA analysis_limit = 1000")
            if sql := _analyze_sql(dialect, staging, prep):
                conn.exec_driver_sql(sql)
        with target.connect() as conn:
            live_exists = _table_exists(conn, live.name)
            live_rows = _count(conn, live) if live_exists else 0
            staging_rows = _count(conn, staging)
            matched = _count_matching(conn, staging, live, spec.key) if live_exists else 0
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
                for stmt in swap_statements(dialect, live.name, staging.name, old_name):
                    conn.exec_driver_sql(stmt)
            else:
                conn.exec_driver_sql(swap_statements(dialect, live.name, staging.name, old_name)[1])
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
                inserted=staging_rows - matched,
                updated=matched,
                deleted=live_rows - matched,
                duration_s=duration,
                source_snapshot_at=snapshot_at,
                watermark=watermark,
            )
            _record_success(conn, result, now)
            return result

        result = _swap_with_retries(spec, target, (live.name, staging.name), swap_transaction)
        if live_exists:
            # Dropped after the commit: a big DROP must not lengthen the swap.
            with _begin(target) as conn:
                conn.exec_driver_sql(f"DROP TABLE {prep.quote(old_name)}")
        return result
    except BaseException:
        with _begin(target) as conn:
            if _table_exists(conn, staging.name):
                conn.exec_driver_sql(f"DROP TABLE {prep.quote(staging.name)}")
        raise


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


# --------------------------------------------------------------------------- incremental


def upsert_statement(dialect: str, live: sa.Table, delta: sa.Table, key: tuple[str, ...]):
    """INSERT … ON CONFLICT DO UPDATE (SQLite, PostgreSQL) or MERGE (SQL Server)."""
    cols = [c.name for c in live.columns]
    non_key = [c for c in cols if c not in key]
    if dialect in ("postgresql", "sqlite"):
        ins = (pg_dialect if dialect == "postgresql" else sqlite_dialect).insert(live)
        # "WHERE true": SQLite's parser needs it to tell ON CONFLICT from a join's ON.
        stmt = ins.from_select(cols, sa.select(*(delta.c[c] for c in cols)).where(sa.true()))
        return stmt.on_conflict_do_update(
            index_elements=list(key), set_={c: stmt.excluded[c] for c in non_key}
        )
    if dialect == "mssql":
        on = " AND ".join(f"t.[{k}] = s.[{k}]" for k in key)
        sets = ", ".join(f"t.[{c}] = s.[{c}]" for c in non_key)
        col_list = ", ".join(f"[{c}]" for c in cols)
        vals = ", ".join(f"s.[{c}]" for c in cols)
        return sa.text(
            f"MERGE [{live.name}] WITH (HOLDLOCK) AS t USING [{delta.name}] AS s ON {on} "
            f"WHEN MATCHED THEN UPDATE SET {sets} "
            f"WHEN NOT MATCHED BY TARGET THEN INSERT ({col_list}) VALUES ({vals});"
        )
    raise RefreshError(f"no upsert for dialect {dialect!r}")


def _upsert(conn: sa.Connection, spec: ViewSpec, delta: sa.Table) -> None:
    conn.execute(upsert_statement(conn.dialect.name, spec.table, delta, spec.key))


def _high_watermark(spec: ViewSpec, source: Engine) -> datetime | None:
    with source.connect() as conn:
        # one scalar subquery per table (each served by its updated_at index)
        maxima = (sa.select(sa.func.max(c)).scalar_subquery() for c in spec.change_columns)
        values = conn.execute(sa.select(*maxima)).one()
    values = [v for v in values if v is not None]
    if not values:
        return None
    # SQLite hands back strings for max(); normalise.
    return max(v if isinstance(v, datetime) else datetime.fromisoformat(str(v)) for v in values)


STALE_KEYS_PER_LOAD = 500
"""Keys per reload of stale parents (one ``IN`` list: under SQL Server's 2100 and
old SQLite's 999 bound parameters)."""


def _comparable(value):
    """A value as the view means it: money to the cent, bools as 0/1, None kept.

    Cached and source values come back as float, int, Decimal or bool depending on
    the dialect; two values that map to the same comparable are the same view value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | Decimal):
        return Decimal(str(value)).quantize(_CENT) + 0  # + 0: -0.00 == 0.00 anyway
    return value


_CENT = Decimal("0.01")


def stale_keys(spec: ViewSpec, source: Engine, target: Engine) -> list:
    """Keys of the view rows whose :attr:`~ViewSpec.aggregate_columns` differ between
    the cache and the source, or that the source has and the cache lacks.

    This is how the *old* parent of a moved child, and the parent of a deleted
    child, are found: neither leaves an ``updated_at`` behind (the child row now
    names its new parent, or is gone), but the parent's cached aggregate no longer
    equals the source's. Comparing the aggregates themselves is exact: a parent
    whose aggregates compare equal has the right view row, whatever happened to
    its children (and a change of the refresh date, which moves ``overdue``, is
    caught the same way).

    Cost, per incremental refresh of a view with aggregates: on the source, the
    view's child aggregates once (one GROUP BY per child table over its parent-id
    index, the same work the incremental query already does for its aggregate
    subqueries) and a scan of the parent table; on the cache, a scan of the key
    and the aggregate columns in key order (the unique key index). Both are
    streamed and merged in key order in Python, in ``BATCH_ROWS`` batches: memory
    stays flat, the transfer is a few numbers per parent (about 1 s per million
    parents). Nothing is written for parents that compare equal.
    """
    if not spec.aggregate_columns:
        return []
    (key,) = spec.key
    cached_q = sa.select(
        spec.table.c[key], *(spec.table.c[c] for c in spec.aggregate_columns)
    ).order_by(spec.table.c[key])
    stale = []
    with source.connect() as sconn, target.connect() as tconn:
        opts = {"stream_results": True, "yield_per": BATCH_ROWS}
        theirs = sconn.execution_options(**opts).execute(spec.check_query(), spec.params())
        ours = tconn.execution_options(**opts).execute(cached_q)
        mine = next(ours, None)
        for row in theirs:
            while mine is not None and mine[0] < row[0]:
                mine = next(ours, None)  # a parent deleted in the source: full refresh
            if mine is None or mine[0] != row[0]:
                stale.append(row[0])  # the cache lacks it (stamped before the window)
            elif any(
                _comparable(a) != _comparable(b) for a, b in zip(row[1:], mine[1:], strict=True)
            ):
                stale.append(row[0])
    return stale


def _incremental(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    last_watermark: datetime,
    overlap: timedelta,
    started: float,
    closure: list[tuple[int, int, int]],
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
    last_rows: int | None = None,
) -> RefreshResult:
    """Upsert the rows changed since ``last_watermark - overlap``, and the parents
    whose aggregates differ from the source (:func:`stale_keys`: old parents of
    moved children, parents of deleted children, overdue flags of a new day).

    Then the view rows whose driving source row was deleted are deleted
    (:func:`cfi_pipelines.views.reconcile.deleted_keys`), in one short transaction
    with the status, under the row-count guard: more than ``max_drop_share`` of the
    view gone at once is refused unless ``force``.

    Left for the nightly full refresh: non-aggregate columns of a row whose source
    change was stamped (``updated_at``) older than the overlap window before the
    last watermark (an aggregate change is caught whatever its stamp).
    """
    snapshot_at = utcnow()
    high = _high_watermark(spec, source) or last_watermark
    since = last_watermark - overlap
    schema = _schema_for(target)
    delta = _work_table(spec, "delta", schema)
    prep = target.dialect.identifier_preparer
    with _begin(target) as conn:
        if _table_exists(conn, delta.name):
            conn.exec_driver_sql(f"DROP TABLE {prep.quote(delta.name)}")
        delta.create(conn)
    try:
        loader = source_loader(
            spec, source, target, incremental=True, params=spec.params(since=since)
        )
        loaded = loader(delta)
        # Parents a change left (moved or deleted children): not found by updated_at.
        if stale := stale_keys(spec, source, target):
            with target.connect() as conn:
                have = set(conn.scalars(sa.select(delta.c[spec.key[0]])))
            stale = [k for k in stale if k not in have]
            for i in range(0, len(stale), STALE_KEYS_PER_LOAD):
                chunk = spec.for_keys(stale[i : i + STALE_KEYS_PER_LOAD])
                loaded += source_loader(
                    chunk, source, target, incremental=False, params=chunk.params()
                )(delta)
        with _begin(target) as conn:
            matched = _count_matching(conn, delta, spec.table, spec.key) if loaded else 0
            if loaded:
                _upsert(conn, spec, delta)
            _write_closure(conn, closure)
            # the view's rows now: the delete reconciliation's cheap test (no more rows
            # than the source) and the guard. The status row is written in the same
            # transaction as every change of the view (refreshes never overlap), so
            # its count plus the insertions is exact; counting (a full scan on
            # PostgreSQL right after an upsert: 0.4 s at 1M rows) only without one.
            rows = _count(conn, spec.table) if last_rows is None else last_rows + loaded - matched
        gone = deleted_keys(spec, source, target, cached_rows=rows)
        with _begin(target) as conn:
            if gone and not force and len(gone) > max_drop_share * rows:
                raise RefreshRefused(spec.name, rows - len(gone), rows, max_drop_share)
            deleted = delete_keys(conn, spec, gone)
            rows -= deleted
            result = RefreshResult(
                view=spec.name,
                mode="incremental",
                source="db",
                rows=rows,
                loaded=loaded,
                inserted=loaded - matched,
                updated=matched,
                deleted=deleted,
                duration_s=time.perf_counter() - started,
                source_snapshot_at=snapshot_at,
                watermark=high,
            )
            _record_success(conn, result, utcnow())
        return result
    finally:
        with _begin(target) as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prep.quote(delta.name)}")


# --------------------------------------------------------------------------- entry point


def refresh_view(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    mode: Mode = "auto",
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> RefreshResult:
    """Refresh one view of the common DB from CFI's source DB.

    ``auto`` is incremental when the view has a watermark from a previous refresh
    from the DB, full otherwise. Every outcome is recorded in ``cfi_view_status``
    and ``cfi_refresh_log``; failures are re-raised.
    """
    started = time.perf_counter()
    started_at = utcnow()
    init_common(target)
    status = read_status(target).get(spec.name) or {}
    with target.connect() as conn:
        live_exists = _table_exists(conn, spec.table_name)
    can_increment = (
        live_exists and status.get("watermark") is not None and status.get("source") == "db"
    )
    effective = (
        "full" if mode == "full" or (mode == "auto" and not can_increment) else "incremental"
    )
    if effective == "incremental" and not can_increment:
        effective = "full"  # nothing to increment from yet: a first refresh is always full
    try:
        closure = _read_closure(source)
        if effective == "incremental":
            return _incremental(
                spec,
                source,
                target,
                last_watermark=status["watermark"],
                overlap=overlap,
                started=started,
                closure=closure,
                force=force,
                max_drop_share=max_drop_share,
                last_rows=status.get("rows"),
            )
        snapshot_at = utcnow()  # taken before reading: the data is at least this fresh
        watermark = _high_watermark(spec, source)
        loader = source_loader(spec, source, target, incremental=False, params=spec.params())
        return swap_in(
            spec,
            target,
            loader,
            source="db",
            snapshot_at=snapshot_at,
            force=force,
            max_drop_share=max_drop_share,
            watermark=watermark,
            closure=closure,
            started=started,
        )
    except BaseException as exc:
        outcome = "refused" if isinstance(exc, RefreshRefused) else "failed"
        record_failure(
            target,
            spec.name,
            mode=effective,
            source="db",
            started_at=started_at,
            error=exc if str(exc) else repr(exc),
            outcome=outcome,
        )
        raise
