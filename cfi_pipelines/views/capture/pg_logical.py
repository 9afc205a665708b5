"""PostgreSQL with ``wal_level=logical``: exact changes from a logical replication slot, through SQL.

A publication limited to the followed tables and a slot using the built-in ``pgoutput``
plugin (both named by ``CFI_CAPTURE_SLOT``, default ``cfi_pipelines``). Everything goes
through ordinary SQL on the reading account (it needs the REPLICATION attribute):

- **gate**: one statement, ``pg_logical_slot_peek_binary_changes`` up to the current WAL
  (flushed) position. No WAL since the slot's position: nothing is decoded, no table is
  read. WAL written but nothing for the followed tables in it (other tables, other
  databases): the same statement moves the slot past it, so the next idle tick decodes
  nothing again; that tick reads a few hundred catalog rows (decoding start-up).
- **changes**: the same peek, parsed (:mod:`.pgoutput`): every insert, update and
  delete of the followed tables, with the old row when the table has REPLICA IDENTITY
  FULL (``deploy/sql/postgresql_logical_decoding.sql``). O(changes). Peeking consumes
  nothing: after a crash the same changes come again, and the apply is idempotent.
- **release**: after the apply committed, the slot is advanced to the minimum position
  every view has applied (``pg_replication_slot_advance``), never further.

A position is the LSN text (``"0/16B3748"``) and covers every transaction whose commit
record starts before it. A full refresh records the slot's *confirmed* position, read
before it reads the source: every change not yet confirmed is replayed afterwards
(idempotently), so no commit racing the refresh's snapshot can be missed. A missing or
``lost`` slot raises :class:`CaptureLost`: the views get a full refresh and a new slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from cfi_pipelines.views.capture.base import (
    Capture,
    CaptureLost,
    CaptureUnavailable,
    ChangeSet,
    Gate,
    RowChange,
    gc_paused,
)
from cfi_pipelines.views.capture.pgoutput import (
    Transaction,
    int_to_lsn,
    lsn_to_int,
    parse_messages,
    typed,
)

log = logging.getLogger(__name__)

GATE_CHANGES = 2_000
"""Messages the gate decodes at most to name the tables that moved (more: all suspect)."""
CHANGES_PER_BATCH = 50_000
"""Row changes per :meth:`PgLogicalCapture.changes` call by default (memory bound)."""
GATE_TIMEOUT_MS = 500
"""The gate's statement gives up after this (within the sensor's 0.8-s deadline for the
source): the tick then judges nothing and the next one asks again (:attr:`Gate.busy`)."""
BUSY_RETRIES = 50
BUSY_PAUSE_S = 0.1
_OBJECT_IN_USE = "55006"  # "replication slot … is active for PID …"
_QUERY_CANCELED = "57014"  # statement_timeout

_PEEK = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes("
    ":slot, CAST(:upto AS pg_lsn), :n, 'proto_version', '1', 'publication_names', :pub)"
)
_FLUSHED_UPTO = sa.text(
    "SELECT pg_current_wal_insert_lsn()::text AS upto, "
    "set_config('synchronous_commit', 'on', true), "
    "pg_logical_emit_message(true, :prefix, '')"
)
"""A record boundary every change before which is flushed: the insert position, then a
transactional logical message committed synchronously (its flush covers every record
before it). Not output by pgoutput (no ``messages`` option); works in a read-only
transaction for the REPLICATION account."""
_SLOT = sa.text(
    "SELECT pg_current_wal_flush_lsn()::text AS now, s.confirmed_flush_lsn::text AS confirmed, "
    "s.wal_status FROM (SELECT 1) one "
    "LEFT JOIN pg_replication_slots s ON s.slot_name = :slot AND s.database = current_database()"
)


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def logical_decoding_problem(
    conn: sa.Connection, publication: str | None = None, tables: Sequence[str] = ()
) -> str | None:
    """Why this account cannot use logical decoding here (one line), or None when it can.

    With ``publication``: it must cover ``tables``, or be creatable by this account (a
    superuser; otherwise CFI's DBA creates it). Catalog reads only."""
    level = conn.exec_driver_sql("SHOW wal_level").scalar()
    script = "run deploy/sql/postgresql_logical_decoding.sql"
    if level != "logical":
        return f"wal_level is {level}: counter gate; {script} (wal_level=logical, then a restart)"
    superuser, allowed = conn.exec_driver_sql(
        "SELECT rolsuper, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).one()
    if not allowed:
        return f"the reading account has no REPLICATION attribute: counter gate; {script}"
    if publication is None or superuser:
        return None
    have = set(
        conn.execute(
            sa.text("SELECT tablename FROM pg_publication_tables WHERE pubname = :p"),
            {"p": publication},
        ).scalars()
    )
    if missing := sorted(set(tables) - have):
        what = "is missing" if not have else f"lacks {', '.join(missing)}"
        return f"publication {publication} {what}: counter gate; {script}"
    return None


class PgLogicalCapture(Capture):
    mode = "pg_logical"
    exact = True
    guarantee = "every committed insert, update and delete (logical decoding)"

    def __init__(
        self, engine: sa.Engine, tables: Sequence[sa.Table], *, slot: str, why: str = ""
    ) -> None:
        super().__init__(engine, tables, why=why)
        self.slot = self.publication = slot
        self._by_name = {t.name: t for t in self.tables}

    # ------------------------------------------------------------------ plumbing

    def _autocommit(self) -> sa.Connection:
        # slot functions refuse a transaction that wrote, and stats/snapshots must be fresh
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _retry_busy(self, fn):
        """Run ``fn`` again while another session is reading the slot (the sensor's gate
        and a run's apply may meet); each attempt is short."""
        for attempt in range(BUSY_RETRIES):
            try:
                return fn()
            except sa.exc.DBAPIError as exc:
                if _sqlstate(exc) != _OBJECT_IN_USE or attempt == BUSY_RETRIES - 1:
                    raise
                log.info("slot %s busy (attempt %d): %s", self.slot, attempt + 1, exc.orig)
                time.sleep(BUSY_PAUSE_S)
        raise AssertionError("unreachable")

    def _slot_state(self, conn: sa.Connection) -> tuple[str, str | None, str | None]:
        row = conn.execute(_SLOT, {"slot": self.slot}).one()
        return row.now, row.confirmed, row.wal_status

    def _peek(self, conn: sa.Connection, upto: str | None, n: int | None) -> list[bytes]:
        params = {"slot": self.slot, "upto": upto, "n": n, "pub": self.publication}
        return conn.execute(sa.text(_PEEK), params).scalars().all()  # one fetch, not one per row

    def sort_key(self, position: str) -> int:
        return lsn_to_int(position)

    # ------------------------------------------------------------------ interface

    def gate(self, since: str | None) -> Gate:
        """One statement: the flushed WAL position, the slot's state, and — only when WAL
        was written since the slot's position — its pending changes (peeked, not consumed).
        When they hold nothing for the followed tables, the same statement advances the
        slot to that position (nothing to lose), so the next idle tick decodes nothing.
        Idle source: no decoding, no table read."""
        sql = sa.text(
            "WITH w AS MATERIALIZED (SELECT pg_current_wal_flush_lsn() AS now), "
            "s AS MATERIALIZED (SELECT confirmed_flush_lsn AS confirmed, wal_status "
            "FROM pg_replication_slots WHERE slot_name = :slot AND database = current_database()), "
            "p AS MATERIALIZED (SELECT array_agg(c.data) AS data, count(c.data) AS n "
            "FROM w JOIN s ON s.wal_status <> 'lost' AND s.confirmed < w.now, "
            "LATERAL pg_logical_slot_peek_binary_changes(:slot, w.now, :n, 'proto_version', '1', "
            "'publication_names', :pub) c) "
            "SELECT w.now::text AS now, s.confirmed::text AS confirmed, s.wal_status, p.data, "
            "CASE WHEN p.n = 0 AND s.wal_status <> 'lost' AND s.confirmed < w.now "
            "THEN (SELECT true FROM pg_replication_slot_advance(:slot, w.now)) END AS advanced "
            "FROM w LEFT JOIN s ON true CROSS JOIN p"
        )
        params = {"slot": self.slot, "n": GATE_CHANGES, "pub": self.publication}
        with self._autocommit() as conn:
            try:
                # bounded: decoding up to the flush position waits when that position ends
                # inside a record (see _flushed_upto), seconds with no commit behind it
                conn.exec_driver_sql(f"SET statement_timeout = {GATE_TIMEOUT_MS}")
                row = conn.execute(sql, params).one()
            except sa.exc.DBAPIError as exc:
                state = _sqlstate(exc)
                if state not in (_OBJECT_IN_USE, _QUERY_CANCELED):
                    raise
                now = conn.exec_driver_sql("SELECT pg_current_wal_flush_lsn()::text").scalar()
                why = (
                    "slot busy: an apply is reading it"
                    if state == _OBJECT_IN_USE
                    else f"the WAL to decode was still being flushed after {GATE_TIMEOUT_MS} ms"
                )
                return Gate(now, True, None, why, busy=True)
            finally:
                conn.exec_driver_sql("RESET statement_timeout")
        if row.confirmed is None or row.wal_status == "lost":
            why = "missing" if row.confirmed is None else "lost"
            return Gate(row.now, True, None, f"slot {self.slot} {why}: full refresh needed")
        txs = parse_messages(row.data or [], {})
        latest: dict[str, str] = {}
        floor = lsn_to_int(since) if since else 0
        for tx in txs:
            if tx.commit_lsn < floor:
                continue
            for ch in tx.changes:
                if ch.relation.name in self._by_name:
                    latest[ch.relation.name] = int_to_lsn(tx.end_lsn)
        # the peek's limit counts messages (begin, relation, change, commit): stopped by
        # it, the peek may not have reached the tables changed later, so every table is
        # a suspect (naming only those seen would let the others be 'verified' past them)
        truncated = len(row.data or []) >= GATE_CHANGES
        if truncated:
            return Gate(row.now, True, None, "many changes pending")
        if latest:
            return Gate(row.now, True, frozenset(latest), "changes pending", latest=latest)
        if since is None:
            # no pending change; a first call still cannot vouch for views it never saw
            return Gate(row.now, True, None, "first look at the slot")
        return Gate(row.now, False, frozenset(), "no change in the slot")

    def position(self) -> str:
        """The slot's confirmed position (see the module docstring); CaptureLost without a slot."""
        with self._autocommit() as conn:
            _now, confirmed, status = self._slot_state(conn)
        if confirmed is None or status == "lost":
            raise CaptureLost(f"slot {self.slot} is {'missing' if confirmed is None else 'lost'}")
        return confirmed

    def changes(self, since: str, *, limit: int | None = CHANGES_PER_BATCH) -> ChangeSet:
        """Every row change committed after ``since`` (peeked, not consumed). O(changes)."""
        with self._autocommit() as conn:
            now, confirmed, status = self._slot_state(conn)
            if confirmed is None or status == "lost":
                what = "missing" if confirmed is None else "lost (wal_status lost)"
                raise CaptureLost(f"slot {self.slot} is {what}: changes since {since} are gone")
            if lsn_to_int(since) < lsn_to_int(confirmed):
                # the slot went past us: fine only if it was advanced by us (release or an
                # idle gate never pass a pending change); a recreated slot is caught by the
                # caller, which clears every position when it creates a new one
                since = confirmed
            if lsn_to_int(now) > lsn_to_int(since):
                now = self._flushed_upto(conn, now)
            kept, more = self._peek_after(conn, now, lsn_to_int(since), limit)
        upto = int_to_lsn(kept[-1].end_lsn) if more else max(now, since, key=lsn_to_int)
        with gc_paused():
            changes = tuple(c for tx in kept for c in self._row_changes(tx))
        return ChangeSet(since=since, upto=upto, changes=changes, transactions=len(kept), more=more)

    def _peek_after(
        self, conn: sa.Connection, upto: str, floor: int, limit: int | None
    ) -> tuple[list[Transaction], bool]:
        """The whole transactions committed at or after ``floor`` (up to ``upto``), about
        ``limit`` changes of them, and whether the peek stopped short of ``upto``.

        A peek always starts at the slot's confirmed position, and its limit counts the
        messages it returns (begin, relation, each change, commit), the transactions
        before ``floor`` included: while the slot is behind ``floor`` (another view holds
        it back, or the batches of one apply), those are decoded again and skipped, and
        the limit grows past them. A limit that stopped the peek is never taken for the
        end of the changes: everything after a batch comes in a later one."""
        n = limit
        while True:
            rows = self._retry_busy(lambda n=n: self._peek(conn, upto, n))
            cut = n is not None and len(rows) >= n  # stopped by the limit, maybe before upto
            with gc_paused():
                txs = parse_messages(rows, {})  # relations are sent again by every peek
            kept = [tx for tx in txs if tx.commit_lsn >= floor]
            if not cut or sum(len(tx.changes) for tx in kept) >= (limit or 0):
                return kept, cut
            n = len(rows) + (limit or 0)

    def _flushed_upto(self, conn: sa.Connection, flushed: str) -> str:
        """Where to decode up to without waiting (:data:`_FLUSHED_UPTO`), else ``flushed``.

        The flush position alone is not enough: the WAL writer flushes whole pages, so it
        often ends inside a record (autovacuum's, another database's), and the decoding
        function then polls until that record is flushed, which with no commit behind it
        can take until the next running-xacts record (up to 15 s; seen at 8-14 s)."""
        try:
            return conn.execute(_FLUSHED_UPTO, {"prefix": self.slot}).scalar_one()
        except sa.exc.DBAPIError as exc:
            log.info(
                "slot %s: no flush marker (%s); decoding up to the flush position",
                self.slot,
                exc.orig,
            )
            return flushed

    def _row_changes(self, tx: Transaction) -> Iterable[RowChange]:
        for ch in tx.changes:
            table = self._by_name.get(ch.relation.name)
            if table is None:
                continue
            new = typed(table, ch.new) if ch.new else None
            old = typed(table, ch.old) if ch.old else None
            if ch.op == "D" and old is not None and not ch.old_is_full:
                old = {k: v for k, v in old.items() if v is not None}  # the key columns only
            if ch.op == "U" and old is None and ch.relation.replica_identity != "f":
                # default identity: the key did not change, so the old key is the new one's
                pk = [c.name for c in table.primary_key]
                old = {k: new[k] for k in pk} if new else None
            yield RowChange(ch.relation.name, ch.op, new, old, old_complete=ch.old_is_full)  # type: ignore[arg-type]

    def release(self, applied: Iterable[str]) -> None:
        """Advance the slot to the minimum applied position (after the apply committed)."""
        positions = list(applied)
        if not positions:
            return
        target = min(positions, key=lsn_to_int)
        with self._autocommit() as conn:
            _now, confirmed, status = self._slot_state(conn)
            if confirmed is None or status == "lost":
                return
            if lsn_to_int(target) > lsn_to_int(confirmed):
                self._retry_busy(lambda: self._advance(conn, target))

    def _advance(self, conn: sa.Connection, lsn: str) -> None:
        try:
            conn.execute(
                sa.text("SELECT pg_replication_slot_advance(:slot, CAST(:lsn AS pg_lsn))"),
                {"slot": self.slot, "lsn": lsn},
            )
        except sa.exc.DBAPIError as exc:
            if _sqlstate(exc) != _OBJECT_IN_USE:
                raise
            # the apply is reading it: the next release or idle gate advances it

    def ensure(self) -> list[str]:
        """Create the publication (if missing and allowed) and the slot (if missing or lost).

        Returns what it did, one line each; raises :class:`CaptureUnavailable` when the
        publication is missing and this account may not create it."""
        done: list[str] = []
        self.restarted = False
        names = sorted(self._by_name)
        with self._autocommit() as conn:
            if problem := logical_decoding_problem(conn):
                raise CaptureUnavailable(problem)
            have = set(
                conn.execute(
                    sa.text("SELECT tablename FROM pg_publication_tables WHERE pubname = :p"),
                    {"p": self.publication},
                ).scalars()
            )
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_publication WHERE pubname = :p"), {"p": self.publication}
            ).first()
            prep = conn.dialect.identifier_preparer
            table_list = ", ".join(prep.quote(n) for n in names)
            try:
                if not exists:
                    conn.exec_driver_sql(
                        f"CREATE PUBLICATION {prep.quote(self.publication)} FOR TABLE {table_list}"
                    )
                    done.append(f"created publication {self.publication} on {len(names)} tables")
                elif have != set(names):
                    conn.exec_driver_sql(
                        f"ALTER PUBLICATION {prep.quote(self.publication)} SET TABLE {table_list}"
                    )
                    done.append(f"publication {self.publication} set to the {len(names)} tables")
            except sa.exc.ProgrammingError as exc:
                raise CaptureUnavailable(
                    f"publication {self.publication} missing and not creatable by this account "
                    f"({str(exc.orig).strip().splitlines()[0]}); run "
                    "deploy/sql/postgresql_logical_decoding.sql"
                ) from exc
            _now, confirmed, status = self._slot_state(conn)
            if status == "lost":
                conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": self.slot})
                done.append(f"dropped lost slot {self.slot}")
                confirmed = None
            if confirmed is None:
                conn.execute(
                    sa.text("SELECT pg_create_logical_replication_slot(:s, 'pgoutput')"),
                    {"s": self.slot},
                )
                done.append(f"created logical replication slot {self.slot} (pgoutput)")
                self.restarted = True
            partial = conn.execute(
                sa.text(
                    "SELECT c.relname FROM pg_class c WHERE c.relname = ANY(:names) "
                    "AND c.relkind = 'r' AND c.relreplident <> 'f' "
                    "AND pg_table_is_visible(c.oid) ORDER BY 1"
                ),
                {"names": names},
            ).scalars()
            if partial := list(partial):
                done.append(
                    "REPLICA IDENTITY is not FULL on "
                    + ", ".join(partial)
                    + ": their deletes name keys only, the apply reconciles those views"
                )
        for line in done:
            log.info("capture %s: %s", self.mode, line)
        return done

    def retained_wal_bytes(self) -> int | None:
        """WAL the slot keeps on the server (``pg_current_wal_lsn() - restart_lsn``)."""
        with self._autocommit() as conn:
            return conn.execute(
                sa.text(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name = :s"
                ),
                {"s": self.slot},
            ).scalar()
