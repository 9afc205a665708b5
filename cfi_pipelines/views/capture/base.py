"""The change-capture interface: how the sensor and the refresh learn what changed in CFI's source.

One :class:`Capture` per source engine (chosen by :func:`cfi_pipelines.views.capture.capture_for`),
behind two questions:

1. **gate** — "may anything have changed since position ``p``?" One query whatever the
   size of the tables (O(1) in the data), run every sensor tick. Returns a new opaque
   :class:`Gate` position and, when it can tell, *which* followed tables moved.
2. **changes** (exact modes only) — "what exactly changed between positions ``a`` and
   ``b``?" The row images (:class:`RowChange`) of every insert, update and delete of the
   followed tables, in commit order. O(changes): never a scan of a source table.

Positions are opaque strings (JSON-safe, stored in ``cfi_capture_state`` and in sensor
cursors); only the capture that made one compares or parses it. A position *covers*
every change committed at or before it.

Contract for implementers (``sqlite.py``, ``pg_counters.py``, ``pg_logical.py``,
``mssql.py``, ``timestamp.py``):

- never write to CFI's tables; the only source-side state allowed is the engine's own
  capture object (a PostgreSQL slot/publication, nothing for SQL Server CT);
- nothing at import time and nothing in ``__init__`` that touches a database: connect
  lazily, on the first call;
- :meth:`Capture.gate` and :meth:`Capture.position` may be called concurrently from
  several processes (the sensor's daemon and runs) and must tolerate that;
- raise :class:`CaptureLost` (never return partial data) when the changes since a
  position are no longer available (SQL Server: ``CHANGE_TRACKING_MIN_VALID_VERSION``
  past it; PostgreSQL: slot lost or invalidated): the caller then does a full refresh,
  which takes a new position with :meth:`Capture.position` *before* reading the source;
- SQL Server (``mssql.py``): expose ``change_tracking_capture(engine, tables) -> Capture``
  that checks Change Tracking is usable (database, every followed table, VIEW CHANGE
  TRACKING for the account) and raises :class:`CaptureUnavailable` with one line naming
  what the DBA should run (``deploy/sql/sqlserver_change_tracking.sql``) otherwise;
  ``capture_for`` then falls back to the timestamp path and shows that line. Positions
  are the version as text; ``changes`` gives ``new`` (the current row, read by key in the
  same snapshot as the version) for I/U and ``old`` = the primary key only
  (``old_complete=False``) for U/D;
- row values come back as the Python types of the source table's SQLAlchemy columns
  (at least: ``int`` for ids and foreign keys), keyed by column name.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import sqlalchemy as sa

Op = Literal["I", "U", "D", "T"]
"""Insert, update, delete, or truncate (the whole table emptied: the views following it
need a full refresh)."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block that makes many short-lived,
    acyclic objects (a batch of row changes: tens of thousands of messages, images and
    keys, freed by reference counting). Its generation scans, triggered by those
    allocations, took as long as the parsing itself (0.12 of 0.23 s at 20k changes)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class CaptureLost(Exception):
    """The changes since the stored position are gone (slot lost or invalidated, change
    tracking cleaned up past the version): the views following them need a full refresh.
    The message says why, in one line, for the log."""


class CaptureUnavailable(Exception):
    """The mode cannot run on this server/account (e.g. wal_level is not logical, no
    REPLICATION attribute). ``capture_for`` catches it and picks a weaker mode; the
    message says what the DBA would enable."""


@dataclass(frozen=True)
class RowChange:
    """One row of one followed source table, as it changed.

    ``new``: the row after the change (I, U); None for D and T.
    ``old``: the row before the change (U, D) when the engine gives it, else None.
    ``old_complete``: True when ``old`` holds every column (PostgreSQL with REPLICA
    IDENTITY FULL); False when it holds only the primary key (SQL Server Change
    Tracking, PostgreSQL's default identity) or nothing. A child row whose old image is
    incomplete may have left a parent that the apply cannot name: the apply then falls
    back to the aggregate reconciliation for the views that need the old parent, and
    says so in the log.
    """

    table: str
    op: Op
    new: Mapping[str, Any] | None = None
    old: Mapping[str, Any] | None = None
    old_complete: bool = False

    @property
    def images(self) -> tuple[Mapping[str, Any], ...]:
        """The images the apply should look at: the new row, and the old one if any."""
        return tuple(r for r in (self.new, self.old) if r is not None)


@dataclass(frozen=True)
class Gate:
    """The answer of one idle-gate query.

    ``position``: where the source is now (to pass back as ``since`` next tick, and,
    for exact modes, the upper bound of :meth:`Capture.changes`).
    ``changed``: False only when the mode *knows* nothing it follows moved since
    ``since``; True when something may have (and on a first call, with no ``since``).
    ``tables``: the followed tables that may have changed; ``None`` when the mode
    cannot tell which (then every followed table is a suspect).
    ``note``: one line for logs/status ("data_version unchanged", "counters reset: maybe
    changed", …).
    """

    position: str
    changed: bool
    tables: frozenset[str] | None = None
    note: str = ""
    latest: Mapping[str, str] | None = None
    """Exact modes, optional: per table in ``tables``, the position of its newest pending
    change, so that a view already applied past it is not refreshed again."""

    busy: bool = False
    """The change log is being read by someone else (an apply): no verdict this time."""

    def suspects(self, followed: Iterable[str]) -> set[str]:
        """The followed tables this gate says may have changed."""
        if not self.changed:
            return set()
        followed = set(followed)
        return followed if self.tables is None else followed & set(self.tables)


@dataclass(frozen=True)
class ChangeSet:
    """The changes of the followed tables after ``since`` up to and including ``upto``,
    in commit order. After applying them, ``upto`` is the view's new position."""

    since: str
    upto: str
    changes: tuple[RowChange, ...] = ()
    transactions: int = 0
    more: bool = False
    """True when a size limit cut the batch short: call again from ``upto``."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def tables(self) -> set[str]:
        return {c.table for c in self.changes}


class Capture(ABC):
    """How one source engine reports its changes (see the module docstring).

    Subclasses set :attr:`mode` (a short stable name shown in status, doctor and the
    UI, e.g. ``"pg_logical"``), :attr:`exact` (True: :meth:`changes` returns every row
    change, deletes and silent updates included; False: only the gate, and the
    incremental refresh by ``updated_at`` does the rest) and :attr:`guarantee` (one line:
    what a quiet gate proves, e.g. "no change by updated_at").
    """

    mode: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    guarantee: ClassVar[str] = ""
    restarted: bool = False
    """Set by :meth:`ensure` when it (re)created the change log (a new slot): every stored
    position of this mode is then meaningless, and the caller forgets them."""

    def __init__(self, engine: sa.Engine, tables: Sequence[sa.Table], *, why: str = "") -> None:
        self.engine = engine
        self.tables = tuple(tables)
        self.why = why  # one line: why capture_for picked this mode on this engine

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    @abstractmethod
    def gate(self, since: str | None) -> Gate:
        """One cheap query: may anything followed have changed since ``since``?

        O(1) in the size of the tables (≤ a few ms on an idle source). ``since`` is a
        position this capture returned earlier (a gate's or :meth:`position`'s), or None
        on a first call (then ``changed`` is True unless the mode can prove otherwise).
        """

    def sort_key(self, position: str) -> Any:
        """A value that orders positions of this capture (LSN as int, version as int)."""
        return position

    def position(self) -> str:
        """The position a full refresh records, taken *before* it reads the source: every
        change after it will be returned by :meth:`changes` (exact modes), so a full
        refresh followed by the changes since this position is the source, exactly.
        Default: the gate's position."""
        return self.gate(None).position

    def changes(self, since: str, *, limit: int | None = None) -> ChangeSet:
        """Every row change of the followed tables after ``since`` (exact modes only).

        O(changes). Does not consume anything on the source: a second call returns the
        same changes (until :meth:`release`). ``limit``: stop after about that many row
        changes, at a transaction boundary (``more`` says so). Raises
        :class:`CaptureLost` when ``since`` is no longer available.
        """
        raise NotImplementedError(f"capture mode {self.mode} is not exact: it has no changes()")

    def release(self, applied: Iterable[str]) -> None:
        """Every consumer has applied up to the *minimum* of ``applied``: the source may
        forget the changes at or before it (PostgreSQL: advance the slot). Called after
        the apply committed, never before. Default: nothing to release."""
        return None

    def ensure(self) -> list[str]:
        """Create the source-side capture objects this mode needs (idempotent), before a
        full refresh takes its position. Returns one line per thing it did (for the log).
        Default: nothing to create."""
        return []

    def describe(self) -> str:
        """One line for status/doctor: the mode and why it was chosen."""
        return f"{self.mode}: {self.why}" if self.why else self.mode

    def close(self) -> None:
        """Release connections this capture holds across calls (sqlite's data_version)."""
        return None
