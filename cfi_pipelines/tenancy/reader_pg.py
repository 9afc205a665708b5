"""Reads as a tenant on PostgreSQL: a connection logged in as the tenant's role, held
open for many reads (what MyCfia pools), each read one guarded statement.

What the binding does (the contract MyCfia follows, README "Reading as a tenant"):

- **once per connection**, in the login itself (startup options, no extra round trip):
  log in as ``cfi_tenant_<id>`` (the policies bind ``current_user`` to the tenant), with
  ``statement_timeout`` and ``default_transaction_read_only = on``;
- **per read**, three statements pipelined in one round trip:
  ``BEGIN READ ONLY``; the reader's SQL as ``SELECT * FROM (<sql>) AS cfi_read LIMIT
  <cap + 1>``, one statement through the extended protocol (a second stacked statement
  is a syntax error, and a subquery accepts a query only: no ``SET``, ``COPY``, DDL,
  data-modifying ``WITH`` or ``SELECT INTO``; the ``LIMIT`` is the row cap, applied by
  the server); ``ROLLBACK``, which undoes whatever the read changed in the session
  (``set_config`` of the time limit, of the read-only default, of the role), so every
  read on a pooled connection starts under the limits set at login.

The three statements go straight through libpq's pipeline (``psycopg.pq``): the same
round trip and nearly the same client work as one plain query.

Cost: what the reader's query costs, bounded by the time limit; the policy adds one
indexed lookup of the tenant's subtree per statement.
"""

from __future__ import annotations

import select
from types import TracebackType
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import Transformer
from sqlalchemy.engine import make_url

from cfi_pipelines.tenancy.binding import RETRYABLE_SQLSTATES, Refused

CONNECT_TIMEOUT_S = 5
BEGIN, ROLLBACK = b"BEGIN READ ONLY", b"ROLLBACK"
MAX_PREPARED = 64
_DONE = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


class StalePlan(Exception):
    """A prepared read whose result columns changed (a view rebuilt with new columns)."""


def guarded_sql(sql: str, max_rows: int) -> str:
    """The one statement a read sends: the reader's query as a subquery, capped. The
    line breaks keep a trailing ``--`` comment from swallowing the wrapper."""
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        raise Refused("empty query")
    return f"SELECT * FROM (\n{sql}\n) AS cfi_read LIMIT {int(max_rows) + 1}"


def login_options(timeout_s: float) -> str:
    """The startup options of a tenant connection: the time limit and the read-only
    default, set by the login itself (a read cannot lift them for the next read)."""
    return f"-c statement_timeout={_ms(timeout_s)} -c default_transaction_read_only=on"


def _ms(timeout_s: float) -> int:
    return max(1, int(timeout_s * 1000))


class TenantSession:
    """A connection logged in as a tenant's role, for many reads (:meth:`read`), one
    thread at a time (a pool hands each connection to one reader).

    A text read ``prepare_after`` times gets a prepared statement on this connection
    (as psycopg does for any query run 5 times): its later reads skip parsing and
    planning. At most ``MAX_PREPARED`` per connection; ``prepare_after=None``: never."""

    def __init__(
        self, conn: psycopg.Connection, timeout_s: float, *, prepare_after: int | None = 2
    ) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.prepare_after = prepare_after
        self._pg = conn.pgconn
        self._tx = Transformer(conn)
        self._seen: dict[bytes, int] = {}
        self._prepared: dict[bytes, bytes] = {}  # guarded query -> statement name

    @classmethod
    def wrap(cls, conn: psycopg.Connection, timeout_s: float, **kw: Any) -> TenantSession:
        """A session over a connection opened elsewhere: its time limit and read-only
        default set once, at session level (one round trip)."""
        conn.autocommit = True
        conn.execute(f"SET statement_timeout = {_ms(timeout_s)}")
        conn.execute("SET default_transaction_read_only = on")
        return cls(conn, timeout_s, **kw)

    def read(
        self, sql: str, *, max_rows: int, timeout_s: float | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]], bool]:
        """One read: ``(columns, rows, truncated)`` or :class:`Refused`. A
        ``timeout_s`` other than the session's adds ``SET LOCAL statement_timeout``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            query = guarded_sql(sql, max_rows).encode(self.conn.info.encoding)
        except UnicodeEncodeError as exc:
            raise Refused(f"not a valid query: {exc}") from None
        if b"\x00" in query:
            raise Refused("not a valid query: NUL character")
        try:
            res = self._run(query, timeout_s)
        except StalePlan:  # the view's columns changed since it was prepared: once more
            res = self._run(query, timeout_s)
        self._tx.set_pgresult(res)
        rows = self._tx.load_rows(0, res.ntuples, tuple)
        columns = [
            (res.fname(i) or b"").decode(self.conn.info.encoding) for i in range(res.nfields)
        ]
        return columns, rows[:max_rows], len(rows) > max_rows

    def _run(self, query: bytes, timeout_s: float) -> pq.PGresult:
        ops: list[tuple[str, bytes]] = [("query", BEGIN)]
        if _ms(timeout_s) != _ms(self.timeout_s):
            ops.append(("query", f"SET LOCAL statement_timeout = {_ms(timeout_s)}".encode()))
        name, new = self._statement(query)
        if name and new:
            ops.append(("prepare", query))
        ops.append(("prepared", name) if name else ("query", query))
        at = len(ops) - 1
        ops.append(("query", ROLLBACK))
        try:
            results = self._pipeline(ops, name)
        except psycopg.Error as exc:
            raise refusal(exc, timeout_s) from None
        finally:
            self._recover()
        if name and new and results[at - 1].status == pq.ExecStatus.COMMAND_OK:
            self._prepared[query] = name
        for r in results:
            if r.status not in _DONE:
                exc = pg_errors.error_from_result(r, encoding=self.conn.info.encoding)
                if name and not new and exc.sqlstate == "0A000":  # cached plan's row type
                    self._forget(query, name)
                    raise StalePlan()
                raise refusal(exc, timeout_s)
        return results[at]

    def _statement(self, query: bytes) -> tuple[bytes | None, bool]:
        """(name of its prepared statement or None, whether to prepare it now)."""
        if query in self._prepared:
            return self._prepared[query], False
        if self.prepare_after is None or len(self._prepared) >= MAX_PREPARED:
            return None, False
        seen = self._seen[query] = self._seen.get(query, 0) + 1
        if len(self._seen) > 4 * MAX_PREPARED:
            self._seen.clear()
        if seen < self.prepare_after:
            return None, False
        return f"cfi_read_{len(self._prepared)}".encode(), True

    def _forget(self, query: bytes, name: bytes) -> None:
        self._prepared.pop(query, None)
        self._seen.pop(query, None)
        try:
            self.conn.execute(f"DEALLOCATE {name.decode()}")  # type: ignore[arg-type]
        except psycopg.Error:
            self.conn.close()

    def _pipeline(self, ops: list[tuple[str, bytes]], name: bytes | None) -> list[pq.PGresult]:
        """Send ``ops`` and a sync in one write; the first result of each."""
        pg = self._pg
        pg.enter_pipeline_mode()
        try:
            for kind, payload in ops:
                if kind == "query":
                    pg.send_query_params(payload, None)
                elif kind == "prepare":
                    pg.send_prepare(name or b"", payload)
                else:
                    pg.send_query_prepared(payload, None)
            pg.pipeline_sync()
            while pg.flush():
                _wait(pg, write=True)
            results: list[pq.PGresult] = []
            while True:
                while pg.is_busy():
                    _wait(pg)
                    pg.consume_input()
                r = pg.get_result()
                if r is None:  # end of one statement's results
                    continue
                if r.status == pq.ExecStatus.PIPELINE_SYNC:
                    return results
                results.append(r)
        finally:
            try:
                pg.exit_pipeline_mode()  # fails only with results still pending
            except psycopg.Error:
                self.conn.close()  # a broken read: this connection is not reused

    def _recover(self) -> None:
        """After a failed read the transaction may be left open (its ROLLBACK was
        skipped): end it, so the next read starts clean."""
        if self.conn.closed or self._pg.pipeline_status != pq.PipelineStatus.OFF:
            return
        if self._pg.transaction_status != pq.TransactionStatus.IDLE:
            try:
                self.conn.execute("ROLLBACK")
            except psycopg.Error:
                self.conn.close()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> TenantSession:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _wait(pg: pq.abc.PGconn, *, write: bool = False) -> None:
    """Block until the socket is readable (or writable); poll: no FD_SETSIZE limit."""
    fd = pg.socket
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        poller.poll()
    else:  # Windows
        select.select([] if write else [fd], [fd] if write else [], [])


def connect(common_url: str, role: str, password: str, *, timeout_s: float) -> TenantSession:
    """A session on the common DB as the tenant role ``role``, its time limit
    ``timeout_s`` and read-only default set by the login."""
    url = make_url(common_url)
    try:
        conn = psycopg.connect(
            host=url.host or "localhost",
            port=url.port or 5432,
            dbname=url.database,
            user=role,
            password=password,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="cfi-pipelines query",
            options=login_options(timeout_s),
            autocommit=True,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise Refused(
            f"cannot log in as {role}: {first} (is deploy/sql/postgresql_row_level_security.sql "
            "installed, has a refresh created the roles, is CFI_TENANT_SECRET the refresh's?)"
        ) from None
    return TenantSession(conn, timeout_s)


def refusal(exc: psycopg.Error, timeout_s: float) -> Refused:
    """The one-line refusal for a server error."""
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag and diag.message_primary else str(exc)).strip()
    message = message.splitlines()[0] if message else type(exc).__name__
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, pg_errors.QueryCanceled):
        return Refused(f"stopped at the time limit ({timeout_s:g} s): {message}")
    if isinstance(exc, pg_errors.SyntaxError) and message.endswith('at or near ";"'):
        return Refused("one statement per read: stacked statements are refused")
    if isinstance(exc, pg_errors.SyntaxError):
        return Refused(f"not a single read-only query (SELECT, WITH, VALUES, TABLE): {message}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return Refused(f"not allowed for a tenant: {message}")
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction | pg_errors.FeatureNotSupported):
        return Refused(f"reads only: {message}")
    return Refused(f"{message} (SQLSTATE {state})", retryable=state in RETRYABLE_SQLSTATES)


def read(
    common_url: str, role: str, password: str, sql: str, *, max_rows: int, timeout_s: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    """Log in as ``role``, run one read, disconnect (``cfi-pipelines query``)."""
    with connect(common_url, role, password, timeout_s=timeout_s) as session:
        return session.read(sql, max_rows=max_rows)
