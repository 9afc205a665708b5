"""One read as a tenant on PostgreSQL: log in as the tenant's role, one statement.

What the binding does for each read (the contract MyCfia follows, README "Reading
as a tenant"):

1. connect as ``cfi_tenant_<id>`` (the policies bind ``current_user`` to the tenant);
2. ``BEGIN READ ONLY`` and ``SET LOCAL statement_timeout`` (a role default could be
   lifted by the reader; a per-transaction value set by us before its statement
   cannot be lifted *for that statement*, and the transaction ends with it);
3. the reader's SQL as exactly one ``DECLARE … CURSOR FOR <sql>`` sent through the
   extended protocol: a second stacked statement is refused by the server, and a
   cursor only accepts a query (no ``SET``, ``COPY``, DDL, data-modifying ``WITH``);
4. one ``FETCH`` of ``max_rows + 1`` rows (the row cap, enforced by the server: a
   cross join is never materialised on the client), then ``ROLLBACK``;

all five in one pipeline (one network round trip).

Cost: what the reader's query costs, bounded by the time limit; the policy adds one
indexed lookup of the tenant's subtree per statement.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from sqlalchemy.engine import make_url

from cfi_pipelines.tenancy.binding import RETRYABLE_SQLSTATES, Refused

CONNECT_TIMEOUT_S = 5
CURSOR = "cfi_tenant_read"


def connect(common_url: str, role: str, password: str) -> psycopg.Connection:
    """A connection to the common DB as the tenant role ``role``."""
    url = make_url(common_url)
    try:
        return psycopg.connect(
            host=url.host or "localhost",
            port=url.port or 5432,
            dbname=url.database,
            user=role,
            password=password,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="cfi-pipelines query",
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise Refused(
            f"cannot log in as {role}: {first} (is deploy/sql/postgresql_row_level_security.sql "
            "installed, has a refresh created the roles, is CFI_TENANT_SECRET the refresh's?)"
        ) from None


def refusal(exc: psycopg.Error, timeout_s: float) -> Refused:
    """The one-line refusal for a server error."""
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag and diag.message_primary else str(exc)).strip()
    message = message.splitlines()[0] if message else type(exc).__name__
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, pg_errors.QueryCanceled):
        return Refused(f"stopped at the time limit ({timeout_s:g} s): {message}")
    if "multiple commands" in message:
        return Refused("one statement per read: stacked statements are refused")
    if isinstance(exc, pg_errors.SyntaxError):
        return Refused(f"not a single read-only query (SELECT, WITH, VALUES, TABLE): {message}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return Refused(f"not allowed for a tenant: {message}")
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction | pg_errors.FeatureNotSupported):
        return Refused(f"reads only: {message}")
    return Refused(f"{message} (SQLSTATE {state})", retryable=state in RETRYABLE_SQLSTATES)


def run(
    conn: psycopg.Connection, sql: str, *, max_rows: int, timeout_s: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """Run one read on an open tenant connection: ``(columns, rows, truncated)``.

    The five messages (``BEGIN READ ONLY``, the time limit, ``DECLARE``, ``FETCH``,
    ``ROLLBACK``) go in one pipeline: one round trip, like a plain query's.
    """
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise Refused("empty query")
    ms = max(1, int(timeout_s * 1000))
    columns: list[str] = []
    try:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = True  # the transaction is ours: BEGIN READ ONLY below
        with conn.pipeline():
            conn.execute("BEGIN READ ONLY")
            conn.execute(f"SET LOCAL statement_timeout = {ms}")
            # one statement through the extended protocol, and a cursor takes a query only
            conn.execute(f"DECLARE {CURSOR} NO SCROLL CURSOR FOR {sql}")  # type: ignore[arg-type]
            cur = conn.execute(f"FETCH FORWARD {int(max_rows) + 1} FROM {CURSOR}")  # type: ignore[arg-type]
            conn.execute("ROLLBACK")
        rows = cur.fetchall()
        columns = [d.name for d in cur.description or ()]
    except psycopg.Error as exc:
        raise refusal(exc, timeout_s) from None
    except ValueError as exc:  # e.g. a NUL character: never sent
        raise Refused(f"not a valid query: {exc}") from None
    finally:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
    return columns, [tuple(r) for r in rows[:max_rows]], len(rows) > max_rows


def read(
    common_url: str, role: str, password: str, sql: str, *, max_rows: int, timeout_s: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """Connect as ``role``, run one read, disconnect."""
    with connect(common_url, role, password) as conn:
        return run(conn, sql, max_rows=max_rows, timeout_s=timeout_s)
