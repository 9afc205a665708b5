"""One read as a tenant on SQLite (no row-level security exists): the reference reader.

The rule is enforced by the connection the reader's SQL runs on:

* the file is opened read-only (``mode=ro`` URI) and ``PRAGMA query_only`` is on;
* TEMP views named like the read model (``cfi_stocks``…, ``cfi_tenant_closure``,
  ``cfi_tenants``) filter by the tenant's subtree; TEMP objects shadow ``main`` for
  unqualified names, so ``SELECT * FROM cfi_stocks`` reads the tenant's rows;
* an authorizer allows ``SELECT``, functions, and reads of ``main`` tables *only*
  through those views (the authorizer's 4th argument names the view): a read of
  ``main.cfi_stocks``, ``sqlite_master`` or another table, ``ATTACH``, ``PRAGMA``,
  writes, DDL and transactions are denied;
* one statement only (``sqlite3`` refuses a second one), a time limit (progress
  handler) and a row cap (at most ``max_rows + 1`` rows are ever fetched).

Cost: what the reader's query costs, bounded by the time limit; the views filter
with ``tenant_id IN (…)`` on the indexes that lead with ``tenant_id``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import make_url

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.tenancy.binding import Refused

PROGRESS_EVERY = 2000  # SQLite VM instructions between two clock checks (~tens of µs)
DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})


def _subtree(tenant_id: int) -> str:
    return f"SELECT descendant FROM main.cfi_tenant_closure WHERE ancestor = {int(tenant_id)}"


def tenant_views(tenant_id: int) -> dict[str, str]:
    """``{name: SELECT}`` of the TEMP views that stand for the read model."""
    views = {
        t.name: f"SELECT * FROM main.{t.name} WHERE tenant_id IN ({_subtree(tenant_id)})"
        for t in common.VIEW_TABLES.values()
    }
    views["cfi_tenant_closure"] = (
        f"SELECT * FROM main.cfi_tenant_closure WHERE ancestor = {int(tenant_id)}"
    )
    views["cfi_tenants"] = f"SELECT * FROM main.cfi_tenants WHERE tenant_id = {int(tenant_id)}"
    views["cfi_view_status"] = "SELECT * FROM main.cfi_view_status"
    return views


def _authorizer(views: frozenset[str]):
    allowed_main = frozenset(views)

    def decide(action: int, arg1: str | None, arg2: str | None, db: str | None, inner: str | None):
        if action == sqlite3.SQLITE_SELECT:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            # a main table read by one of our TEMP views (inner names the view)
            if db == "main" and inner in allowed_main:
                return sqlite3.SQLITE_OK
            # a column of one of our TEMP views, or of a CTE (no database: not a table)
            if (db == "temp" and arg1 in allowed_main) or db is None:
                return sqlite3.SQLITE_OK
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION:
            return (
                sqlite3.SQLITE_DENY
                if (arg2 or "").lower() in DENIED_FUNCTIONS
                else sqlite3.SQLITE_OK
            )
        if action == sqlite3.SQLITE_RECURSIVE:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    return decide


def connect(common_url: str, tenant_id: int) -> sqlite3.Connection:
    """A read-only connection whose read model is the tenant's subtree."""
    path = make_url(common_url).database
    if not path or path == ":memory:" or not Path(path).is_file():
        raise Refused(f"the common DB {path!r} does not exist: run `cfi-pipelines seed` or refresh")
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    views = tenant_views(tenant_id)
    for name, select in views.items():
        conn.execute(f'CREATE TEMP VIEW "{name}" AS {select}')
    conn.execute("PRAGMA query_only = 1")
    conn.set_authorizer(_authorizer(frozenset(views)))
    return conn


def _refusal(exc: sqlite3.Error, timeout_s: float, timed_out: bool) -> Refused:
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if timed_out or message == "interrupted":
        return Refused(f"stopped at the time limit ({timeout_s:g} s)")
    if "one statement at a time" in message:
        return Refused("one statement per read: stacked statements are refused")
    if "not authorized" in message or "prohibited" in message:
        return Refused(
            "not allowed for a tenant: only SELECT on cfi_stocks, cfi_operations, "
            "cfi_invoices, cfi_campaigns, cfi_tenant_closure, cfi_tenants, cfi_view_status"
        )
    if any(w in message for w in ("readonly", "read-only", "query_only", "cannot modify")):
        return Refused(f"reads only: {message}")
    retryable = "locked" in message or "busy" in message
    return Refused(message, retryable=retryable)


def run(
    conn: sqlite3.Connection, sql: str, *, max_rows: int, timeout_s: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """Run one read on a tenant connection: ``(columns, rows, truncated)``."""
    sql = sql.strip()
    if not sql.rstrip(";").strip():
        raise Refused("empty query")
    deadline = time.monotonic() + timeout_s
    timed_out = False

    def progress() -> int:
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return 1 if timed_out else 0

    conn.set_progress_handler(progress, PROGRESS_EVERY)
    cur = conn.cursor()
    try:
        cur.execute(sql)
        rows = cur.fetchmany(max_rows + 1)
        columns = [d[0] for d in cur.description or ()]
    except sqlite3.Error as exc:
        raise _refusal(exc, timeout_s, timed_out) from None
    except sqlite3.Warning as exc:  # "You can only execute one statement at a time."
        raise _refusal(exc, timeout_s, timed_out) from None  # type: ignore[arg-type]
    finally:
        cur.close()
        conn.set_progress_handler(None, 0)
    if conn.in_transaction:
        conn.rollback()
    return columns, rows[:max_rows], len(rows) > max_rows


def read(
    common_url: str, tenant_id: int, sql: str, *, max_rows: int, timeout_s: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """Open a tenant connection, run one read, close it."""
    conn = connect(common_url, tenant_id)
    try:
        return run(conn, sql, max_rows=max_rows, timeout_s=timeout_s)
    finally:
        conn.close()
